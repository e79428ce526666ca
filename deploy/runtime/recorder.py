"""On-device recording of a run: raw chip data, decoded outputs, events.

Written in the crash-safe recording format (firmware_bridge/recording/file_format.py):

* signals: the chip's int16 counts with their per-channel ``scale_uv``; samples
  that never arrived (a ``SampleGap``) are written as zeros and marked with a
  ``missing`` event (sample = first missing sample, value = how many), so the
  sample axis stays the time axis;
* label stream ``decoded`` (the backend's raw outputs) and ``command`` (the
  post-processed positions, or the safe posture while the supervisor is not
  ``ok``), both at the stride rate: row ``j`` is the value in force at signal
  sample ``j * stride`` (a window ending at sample ``e`` fills row
  ``ceil(e / stride)``, never earlier than it was known).  Rows with no
  decoded window (before the first, skipped windows, decoder faults) are NaN;
* events ``safety_<kind>`` (value 0) at the last sample received when a
  safety event happened, and ``record_overflow`` (value = samples) where the
  recording thread fell behind and data had to be dropped.

:class:`RecordingSink` writes synchronously (fast replay).
:class:`ThreadedRecorder` puts the same calls on a bounded list that its own
thread drains every ``DRAIN_PERIOD_S``; with the writer's
``flush_interval_s`` of ``FLUSH_INTERVAL_S`` a ``kill -9`` loses at most
about 0.1 s of data.  The list never holds more than ``max_backlog_samples``
of signal: beyond that frames are dropped and counted, and the decoder
never waits for the disk.
"""
import threading

import numpy as np

from neurohand.firmware_bridge.shared.errors import NeurohandError

#: How often the recording thread wakes to write what has been queued.
DRAIN_PERIOD_S = 0.02
#: Signal time the recording writer buffers before writing a chunk; with
#: the drain period, at most ~0.1 s is held in memory.
FLUSH_INTERVAL_S = 0.08
#: Longest block of zeros or NaN rows written at once when filling a gap.
MAX_FILL_SECONDS = 1.0


class RecordingSink(object):
    """Writes a run's data through a ``RecordingWriter`` (synchronously).

    Parameters
    ----------
    writer : RecordingWriter
        Opened with ``dtype="int16"``, the chip's ``scale_uv`` and label streams
        from :func:`label_streams`.
    stride_samples : int
        Samples between decoded windows (one label row per stride).
    n_outputs : int
    """

    def __init__(self, writer, stride_samples, n_outputs):
        self.writer = writer
        self.stride = int(stride_samples)
        self.n_outputs = int(n_outputs)
        self._n_channels = len(writer.channel_names)
        self._next_row = 0
        self._max_fill = max(1, int(writer.signal_rate * MAX_FILL_SECONDS))
        self._zeros = np.zeros((min(self._max_fill, 4096), self._n_channels), dtype=np.int16)
        self._row = np.zeros((1, self.n_outputs), dtype=np.float32)
        self._nan_rows = np.full((64, self.n_outputs), np.nan, dtype=np.float32)

    def on_frame(self, samples):
        """Append a frame's samples, int16 (n, n_channels)."""
        self.writer.append_signals(samples)

    def on_gap(self, first_sample, n_missing, kind="missing"):
        """``n_missing`` samples from ``first_sample`` never arrived: event + zeros."""
        self.writer.add_event(int(first_sample), kind, int(n_missing))
        left = int(n_missing)
        while left > 0:
            n = min(left, self._zeros.shape[0])
            self.writer.append_signals(self._zeros[:n])
            left -= n

    def on_window(self, end_sample, outputs, command):
        """A window ending at ``end_sample`` decoded to ``outputs``; ``command`` went to the hand."""
        row = -(-int(end_sample) // self.stride)
        if row < self._next_row:
            return  # at most one row per stride: a later window in the same row wins nothing
        self._fill_nan(row - self._next_row)
        self._row[0] = outputs
        self.writer.append_labels("decoded", self._row)
        self._row[0] = command
        self.writer.append_labels("command", self._row)
        self._next_row = row + 1

    def on_event(self, sample, kind, value=0):
        self.writer.add_event(int(sample), kind, int(value))

    def on_safety_event(self, event):
        """Listener for SafetySupervisor events."""
        self.on_event(event["sample"], "safety_" + event["kind"], 0)

    def _fill_nan(self, n_rows):
        while n_rows > 0:
            n = min(n_rows, self._nan_rows.shape[0])
            self.writer.append_labels("decoded", self._nan_rows[:n])
            self.writer.append_labels("command", self._nan_rows[:n])
            n_rows -= n

    def close(self):
        self.writer.close()


def label_streams(sample_rate, stride_samples, output_names):
    """The ``label_streams`` argument for a run's RecordingWriter."""
    rate = float(sample_rate) / int(stride_samples)
    return {"decoded": {"rate": rate, "names": list(output_names)},
            "command": {"rate": rate, "names": list(output_names)}}


def open_run_recording(path, sample_rate, channel_names, scale_uv, stride_samples, output_names,
                       metadata=None):
    """Create the RecordingWriter + RecordingSink for ``--record PATH``."""
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter

    writer = RecordingWriter(path, sample_rate, channel_names, dtype="int16",
                             scale_uv=[float(s) for s in scale_uv], metadata=metadata or {},
                             label_streams=label_streams(sample_rate, stride_samples, output_names),
                             flush_interval_s=FLUSH_INTERVAL_S)
    return RecordingSink(writer, stride_samples, len(output_names))


class ThreadedRecorder(object):
    """The sink's calls queued for a recording thread, with a bounded backlog.

    Same methods as :class:`RecordingSink` (``on_frame``, ``on_gap``,
    ``on_window``, ``on_event``, ``on_safety_event``), callable from any
    thread, never blocking on the disk.  :meth:`start` starts the thread,
    :meth:`close` drains, closes the file and joins.

    A write error (disk full, ...) stops recording, is kept in ``error`` and
    counted; the run itself goes on (the hand matters more than the file).
    """

    def __init__(self, sink, max_backlog_samples):
        self._sink = sink
        self._max_backlog = int(max_backlog_samples)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._items = []
        self._queued_samples = 0
        self._sample = 0             # producer's count of samples (frames + gaps)
        self._dropping_from = None   # first sample of a run of dropped frames
        self._dropped_run = 0
        self.error = None
        self.counters = {"frames_written": 0, "samples_dropped": 0, "overflows": 0, "items_lost": 0}
        self._thread = threading.Thread(target=self._run, name="neurohand-recorder", daemon=True)

    def start(self):
        self._thread.start()
        return self

    # -- producer side (decode / writer threads)

    def on_frame(self, samples):
        n = samples.shape[0]
        with self._lock:
            first = self._sample
            self._sample += n
            if self.error is not None:
                self.counters["items_lost"] += 1
                return
            if self._queued_samples + n > self._max_backlog:
                if self._dropping_from is None:
                    self._dropping_from = first
                    self.counters["overflows"] += 1
                self._dropped_run += n
                self.counters["samples_dropped"] += n
                return
            if self._dropping_from is not None:
                self._items.append(("gap", (self._dropping_from, self._dropped_run, "record_overflow")))
                self._dropping_from, self._dropped_run = None, 0
            # The parser gives every frame its own array, so no copy is needed.
            self._items.append(("frame", (samples,)))
            self._queued_samples += n

    def on_gap(self, first_sample, n_missing, kind="missing"):
        with self._lock:
            self._sample += int(n_missing)
            self._put(("gap", (first_sample, n_missing, kind)))

    def on_window(self, end_sample, outputs, command):
        with self._lock:
            self._put(("window", (end_sample, outputs, np.array(command, dtype=np.float64))))

    def on_event(self, sample, kind, value=0):
        with self._lock:
            self._put(("event", (sample, kind, value)))

    def on_safety_event(self, event):
        self.on_event(event["sample"], "safety_" + event["kind"], 0)

    def _put(self, item):
        # Windows and events are small and rare (one per stride at most);
        # only signal frames need the backlog bound.
        if self.error is not None:
            self.counters["items_lost"] += 1
        else:
            self._items.append(item)

    # -- recording thread

    def _run(self):
        while True:
            self._wake.wait(DRAIN_PERIOD_S)
            self._wake.clear()
            with self._lock:
                items, self._items = self._items, []
                self._queued_samples = 0
                stopping = self._stopping
            if items and self.error is None:
                self._write(items)
            if stopping:
                return

    def _write(self, items):
        sink = self._sink
        try:
            for kind, args in items:
                if kind == "frame":
                    sink.on_frame(*args)
                    self.counters["frames_written"] += 1
                elif kind == "gap":
                    sink.on_gap(*args)
                elif kind == "window":
                    sink.on_window(*args)
                else:
                    sink.on_event(*args)
        except (NeurohandError, OSError) as exc:
            with self._lock:
                self.error = exc
                self._items = []

    def close(self):
        """Write what is queued, close the file, stop the thread.  Safe to call twice."""
        with self._lock:
            self._stopping = True
            if self._dropping_from is not None:
                # Dropped samples at the very end still occupy their place on the time axis.
                self._items.append(("gap", (self._dropping_from, self._dropped_run, "record_overflow")))
                self._dropping_from, self._dropped_run = None, 0
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        elif self._items and self.error is None:
            # Never started (or already stopped): write synchronously.
            items, self._items = self._items, []
            self._write(items)
        try:
            self._sink.close()
        except (NeurohandError, OSError) as exc:
            if self.error is None:
                self.error = exc

    def summary(self):
        result = dict(self.counters)
        result["path"] = getattr(self._sink.writer, "path", None)
        result["error"] = None if self.error is None else str(self.error)
        return result
