"""What every signal source other than the chip shares (LSL inlet, BrainFlow board).

A source is used exactly as a :class:`~neurohand.firmware_bridge.chip.session.ChipSession`::

    source = LslSource("lsl:MyAmp").open()      # finds it, reads channels, rate and units
    source.chip_config                          # ChipConfig: n_channels, sample_rate_hz, scale_uv = 1.0
    source.check(n_channels, sample_rate_hz)    # ConfigError unless the bundle fits
    source.start_streaming(receiver, check)     # reader thread -> receiver (a ChipReceiver)
    source.close()

Samples leave a source in microvolts (float), so its ``scale_uv`` is 1.0.
The reader thread hands each chunk to the run's ChipReceiver through its
parser slot: :class:`BlockParser` turns a :class:`SampleChunk` into the
``SampleGap`` / ``SampleFrame`` events the chip's parser makes, so the
receiver stamps the arrival, queues, counts drops and estimates a restart's
gap exactly as it does for the chip, and the decoder, the watchdog and the
safety rules are the chip's.

**Gaps** are found from timestamps (:class:`GapDetector`): a chunk whose
first sample comes later after the previous chunk's last one than one sample
period plus :data:`GAP_TOLERANCE_S` is preceded by a gap of the samples that
fit in between.  The tolerance absorbs the jitter of timestamps taken when a
chunk was sent or received (LSL apps, a USB-serial adapter's latency timer);
a loss shorter than it goes unnoticed and shifts the decoder's time axis by
at most that much.  A source whose samples carry a counter that steps by one
per sample (BrainFlow's package number on the boards that have one) is
judged by the counter instead: exact, with the timestamps only telling how
many times the counter wrapped during a long gap.
"""
import threading

from neurohand.firmware_bridge.chip.parser import PARSER_COUNTERS, SampleFrame, SampleGap
from neurohand.firmware_bridge.chip.protocol import ChipConfig
from neurohand.firmware_bridge.chip.session import check_chip_config
from neurohand.firmware_bridge.shared.counters import new_counters
from neurohand.firmware_bridge.shared.errors import LinkError

#: A jump between two chunks' timestamps longer than one sample period plus
#: this is a gap (seconds); see the module docstring.
GAP_TOLERANCE_S = 0.02
#: ... and never less than this many samples (slow streams).
MIN_GAP_SAMPLES = 2
#: Longest a reader thread blocks before it looks at its stop flag (seconds).
READER_WAKE_S = 0.1
#: How long close() waits for the reader thread.
JOIN_TIMEOUT_S = 3.0


class SampleChunk(object):
    """Samples one read of a source returned, and what was missing before them.

    samples : ndarray (n, n_channels), microvolts, owned by the chunk
    first_s : float, the source's timestamp of the first sample (seconds)
    missing_before : int, samples missing between the previous chunk and this one
    stream_start : bool, the first chunk after (re)connecting
    ``len(chunk)`` is the size of the samples in bytes (the receiver counts bytes).
    """
    __slots__ = ("samples", "first_s", "missing_before", "stream_start")

    def __init__(self, samples, first_s, missing_before=0, stream_start=False):
        self.samples = samples
        self.first_s = first_s
        self.missing_before = int(missing_before)
        self.stream_start = bool(stream_start)

    def __len__(self):
        return self.samples.nbytes


class BlockParser(object):
    """The parser slot of a ChipReceiver fed by a source: chunk in, chip events out.

    Its counters have the chip parser's names (the run's frame summary reads
    them): a chunk is a frame; gaps count in ``gaps``; ``frames_missing``
    stays 0 (how many chunks a gap swallowed is unknown, its samples are in
    the SampleGap and the decoder's ``missing_samples``).
    """

    def __init__(self):
        self.counters = new_counters(PARSER_COUNTERS)
        self._sequence = 0

    def feed(self, chunk):
        events = []
        counters = self.counters
        if chunk.missing_before > 0:
            counters["gaps"] += 1
            events.append(SampleGap(self._sequence, None, chunk.missing_before))
        if chunk.stream_start:
            counters["stream_starts"] += 1
        events.append(SampleFrame(self._sequence, int(round(chunk.first_s * 1e6)), chunk.samples, chunk.stream_start))
        counters["frames_good"] += 1
        self._sequence = (self._sequence + 1) & 0xFFFFFFFF
        return events

    def flush(self):
        """Nothing is ever buffered (the receiver calls this when the source is lost)."""


class GapDetector(object):
    """Samples missing before each chunk, from the timestamps (and counters) of consecutive chunks.

    ``rate`` in Hz; ``modulus``: the sample counter wraps at this value (None: no counter).
    Counters: ``gaps``, ``gap_samples``, ``timestamp_reversals`` (a chunk that
    starts earlier than the previous one ended by more than the tolerance: a
    clock reset or a replayed stream; no gap is made of it).
    """

    def __init__(self, rate, tolerance_s=GAP_TOLERANCE_S, modulus=None):
        self.rate = float(rate)
        self.tolerance = max(float(MIN_GAP_SAMPLES), tolerance_s * self.rate)
        self.modulus = None if modulus is None else int(modulus)
        self._last_s = None
        self._last_count = None
        self.counters = {"gaps": 0, "gap_samples": 0, "timestamp_reversals": 0}

    def missing_before(self, first_s, last_s, first_count=None, last_count=None):
        """Samples missing before a chunk whose samples are stamped ``first_s`` .. ``last_s``
        (and counted ``first_count`` .. ``last_count`` when the detector has a modulus)."""
        previous, self._last_s = self._last_s, last_s
        previous_count, self._last_count = self._last_count, last_count
        if previous is None:
            return 0
        # Measured from the previous chunk's end, not from the stream's start: a
        # source whose clock runs a little fast or slow never accumulates a false gap.
        missing = (first_s - previous) * self.rate - 1.0
        if self.modulus is not None and previous_count is not None and first_count is not None:
            counted = int(round(first_count - previous_count - 1)) % self.modulus
            # The counter is exact modulo its wrap; the clock says how many wraps fit in the gap.
            missing = counted + self.modulus * max(0, int(round((missing - counted) / self.modulus)))
            return self._count(missing) if missing > 0 else 0
        if missing > self.tolerance:
            return self._count(int(round(missing)))
        if missing < -self.tolerance:
            self.counters["timestamp_reversals"] += 1
        return 0

    def _count(self, samples):
        self.counters["gaps"] += 1
        self.counters["gap_samples"] += samples
        return samples

    def reset(self):
        """A new stream (after a reconnect): its first chunk is not compared with the old one."""
        self._last_s = self._last_count = None


class SignalSource(object):
    """Base of the sources: the reader thread, delivery to the receiver, the bundle check.

    A subclass sets ``chip_config`` in ``open()`` and implements
    ``_stream()`` (the reader thread's body: read, then :meth:`_deliver`,
    until :meth:`stopping`) and ``_release()`` (free the library's handles).
    :attr:`counters` reach the run's stats document under ``chip_link``.  An
    exception that escapes ``_stream`` (a library failing) is kept in
    ``error``, counted and reported like a lost source: the hand goes to its
    safe posture and stays there.
    """

    #: What the source is called in messages ("LSL stream", "BrainFlow board").
    noun = "signal source"

    def __init__(self, url):
        self.url = url
        self.chip_config = None
        self.labels = None
        self._counters = {"chunks": 0, "samples": 0, "reader_errors": 0}
        self.error = None
        self._receiver = None
        self._check_config = None
        self._gaps = None
        self._stop = threading.Event()
        self._thread = None
        self._closed = False

    def _configured(self, n_channels, sample_rate_hz, labels=None, counter_modulus=None):
        """Set ``chip_config`` from what the source says about itself (samples in µV: scale 1);
        ``counter_modulus``: its samples carry a counter stepping by one that wraps there."""
        self.chip_config = ChipConfig(int(n_channels), 0, float(sample_rate_hz), False, 1.0)
        self.labels = list(labels) if labels is not None else None
        previous, self._gaps = self._gaps, GapDetector(sample_rate_hz, modulus=counter_modulus)
        if previous is not None:   # reconfigured after a reconnect: the counts go on
            self._gaps.counters = previous.counters

    def check(self, n_channels, sample_rate_hz, scale_uv=None):
        """ConfigError unless the source delivers what the decoder needs."""
        check_chip_config(self.url, self.chip_config, n_channels, sample_rate_hz, scale_uv)

    def start_streaming(self, receiver, check_config=None):
        """Start the reader thread feeding ``receiver`` (a ChipReceiver); returns this source.

        ``check_config(ChipConfig)`` (raises ConfigError) is what a source that
        reconnects checks again before it decodes the new stream.
        """
        if self.chip_config is None:
            raise LinkError("{} {} is not open".format(self.noun, self.url))
        receiver.parser = BlockParser()
        receiver.connection_made(self)
        self._receiver = receiver
        self._check_config = check_config
        self._thread = threading.Thread(target=self._guarded, name="neurohand-source", daemon=True)
        self._thread.start()
        return self

    def _guarded(self):
        try:
            self._stream()
        except Exception as exc:  # the library failed: safe posture, said once, never a dead silence
            self.error = exc
            self._counters["reader_errors"] += 1
            self._lost("its reader failed: {!r}".format(exc), exc)

    def stopping(self):
        return self._stop.is_set()

    def _deliver(self, samples, first_s, last_s, stream_start=False, first_count=None, last_count=None):
        """Hand ``samples`` (n, n_channels) µV, owned from here on, to the receiver, gap first."""
        missing = self._gaps.missing_before(first_s, last_s, first_count, last_count)
        self._counters["chunks"] += 1
        self._counters["samples"] += samples.shape[0]
        self._receiver.data_received(SampleChunk(samples, first_s, missing, stream_start))

    def _lost(self, reason, exc=None):
        """The source is gone: the safe posture now (not only when the data timeout runs out)."""
        receiver = self._receiver
        receiver.connection_lost(exc)
        # The watchdog's kind: no trustworthy data will come; the reason says why.
        # Its own kind: the source said it is gone (not a slow or gappy one).
        receiver.report_fault("source_lost", "{} {} lost: {}".format(self.noun, self.url, reason))
        self._gaps.reset()

    @property
    def counters(self):
        counters = dict(self._counters)
        if self._gaps is not None:
            counters.update(self._gaps.counters)
        return counters

    def close(self):
        """Stop the reader thread and release the source.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(JOIN_TIMEOUT_S)
                if self._thread.is_alive():
                    raise LinkError("the {} reader thread did not stop within {} s".format(self.noun, JOIN_TIMEOUT_S))
        finally:
            self._release()

    def _stream(self):
        raise NotImplementedError

    def _release(self):
        raise NotImplementedError
