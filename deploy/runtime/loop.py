"""Threads, queues and the shutdown path around the pure stages.

Real time (``neurohand run``, ``replay --realtime``)::

    chip link reader thread          decode thread                 writer thread
    bytes -> ChipReceiver            BatchQueue.take_all()         LatestSlot.get(timeout)
      stamp arrival (perf_counter)   DecodeStage.process(batch)    HandWriterStage.step(cmd|None, now)
      ChipParser.feed                  -> emit(command) ---------->  hand.send (new command at once,
      BatchQueue.put((event, t)) ->                                  keep-alive / watchdog every period)
                                     ThreadedRecorder (own thread, bounded backlog)
    main thread: signal handlers, status line, safety-event lines, shutdown.

Queues: the frame queue is bounded (``frame_queue_events``; a full queue drops
the frame, counts it and tells the decoder the samples are missing); the
command queue is one slot holding only the newest command (an unsent older
one is superseded and counted).  Nothing blocks without a timeout, so every
thread notices a stop within ~0.1 s.

Fast replay (``replay --fast``): :func:`run_fast` drives the same stage
objects from one thread with a virtual clock, at CPU speed.
"""
import collections
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback

from neurohand.deploy.runtime.decode import DecodeStage
from neurohand.deploy.runtime.postprocess import PostProcessor
from neurohand.deploy.runtime.recorder import ThreadedRecorder
from neurohand.deploy.runtime.safety import SafetySupervisor
from neurohand.deploy.runtime.stats import RuntimeStats, build_stats_document, format_status_line
from neurohand.deploy.runtime.writer import HandWriterStage
from neurohand.firmware_bridge.chip.parser import ChipParser, ChipReply, SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.errors import ConfigError

#: Longest a thread blocks before it looks at the stop flag again.
WAKE_S = 0.1
#: How long shutdown waits for each thread.
JOIN_TIMEOUT_S = 2.0
#: The chip's frame counter is uint32 (docs/chip-protocol.md): "backwards" is less than half a turn back.
_SEQUENCE_MASK = 0xFFFFFFFF
_HALF_SEQUENCE = 1 << 31


class BatchQueue(object):
    """Bounded FIFO filled item by item and drained all at once.

    One lock round per batch on the consumer side; ``put`` never blocks (a
    full queue returns False and the caller decides what was lost).
    """

    def __init__(self, capacity):
        self.capacity = int(capacity)
        self._items = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self.high_water = 0

    def put(self, item):
        """Append ``item``; False (nothing added) when the queue is full or closed."""
        with self._cond:
            items = self._items
            if self._closed or len(items) >= self.capacity:
                return False
            items.append(item)
            if len(items) == 1:
                # The consumer only ever waits on an empty queue.
                self._cond.notify()
            if len(items) > self.high_water:
                self.high_water = len(items)
            return True

    def take_all(self, out, timeout_s):
        """Move every queued item to list ``out``, waiting up to ``timeout_s`` for one.

        Returns True once the queue is closed and empty (the consumer should stop).
        """
        with self._cond:
            items = self._items
            if not items and not self._closed:
                self._cond.wait(timeout_s)
            out.extend(items)
            items.clear()
            return self._closed and not out

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class LatestSlot(object):
    """A one-item mailbox: ``put`` replaces, ``get`` waits with a timeout.

    ``superseded`` counts items replaced before anyone took them (the writer
    fell behind the decoder, which only happens when the hand link stalls).
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._item = None
        self._nudged = False
        self.superseded = 0

    def put(self, item):
        with self._cond:
            if self._item is not None:
                self.superseded += 1
            self._item = item
            self._cond.notify()

    def nudge(self):
        """Wake the consumer without an item (e.g. a fault: send the safe posture now)."""
        with self._cond:
            self._nudged = True
            self._cond.notify()

    def get(self, timeout_s):
        """The newest item, or None after ``timeout_s`` or a nudge."""
        with self._cond:
            if self._item is None and not self._nudged and timeout_s > 0:
                self._cond.wait(timeout_s)
            item, self._item, self._nudged = self._item, None, False
            return item


class ChipReceiver(object):
    """Protocol object for the chip link's reader thread (transport apart from protocol).

    The link calls :meth:`data_received` (alias :meth:`feed`) with each chunk
    of bytes it read, from its own thread.  Each chunk is stamped with the
    monotonic clock the moment it is handed over, parsed, and its sample
    frames and gaps are queued for the decoder with that stamp; chip replies
    go to ``on_reply`` (e.g. ``ChipCommandChannel.handle_reply``).

    Stage timings: ``parse`` is ``ChipParser.feed``; ``read`` is the rest of
    the reader thread's work per chunk (queueing), or, where the link reports
    it, the duration of its read call (``data_received(data, read_s=...)``).
    Waiting for bytes is idle time and is never counted.

    Reconnects: when the link reopens its port after a loss and
    ``on_reconnect`` is set (by ``chip_opener``), data frames are held back
    (dropped, counted in ``frames_held_after_reconnect``, and told to the
    decoder as a gap) until :meth:`release_frames`: the chip's configuration
    is checked again first, by another thread (``on_reconnect`` must return
    at once).  A chip that reset starts a new stream (STREAM_START, sequence
    0; or, if those first frames were flushed when the port reopened, a
    sequence that went backwards), so the samples it missed cannot be
    counted from sequence numbers; with
    ``sample_rate`` given, the receiver tells the decoder a gap estimated from
    the arrival clock (``stream_restarts``, ``restart_gap_samples``), so the
    DSP's time axis stays right.  ``on_fault(kind, reason)`` (set by the
    runner) reports a fault found on the link side (``chip_config``).
    """

    def __init__(self, parser, frames, stats, clock, on_reply=None, sample_rate=None):
        self.parser = parser
        self._frames = frames
        self._parse_timer = stats.stages["parse"]
        self._read_timer = stats.stages["read"]
        self._clock = clock
        self.on_reply = on_reply
        self.on_reconnect = None
        self.on_fault = None
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self._lost_frames = 0
        self._lost_samples = 0
        self._lost_first = None
        self._holding = False
        self._last_queued_s = None      # arrival of the last frame handed to the decoder
        self._last_sequence = None
        self.counters = {"chunks": 0, "bytes": 0, "frames_dropped_queue_full": 0,
                         "link_opens": 0, "link_losses": 0, "replies": 0,
                         "frames_held_after_reconnect": 0, "stream_restarts": 0, "restart_gap_samples": 0}

    def data_received(self, data, read_s=None):
        arrival = self._clock()
        events = self.parser.feed(data)
        parsed = self._clock()
        self._parse_timer.add(parsed - arrival)
        counters = self.counters
        counters["chunks"] += 1
        counters["bytes"] += len(data)
        for event in events:
            kind = type(event)
            if kind is SampleFrame:
                if self._holding:
                    self._last_sequence = event.sequence
                    self.counters["frames_held_after_reconnect"] += 1
                    self._lose(event, counter=None)
                    continue
                last, self._last_sequence = self._last_sequence, event.sequence
                went_back = last is not None and 0 < (last - event.sequence) & _SEQUENCE_MASK < _HALF_SEQUENCE
                if self._last_queued_s is not None and (event.stream_start or went_back):
                    # A new stream: flagged, or (its first frames flushed when the port was
                    # reopened) a sequence that went backwards.
                    self._stream_restarted(event, arrival)
                self._enqueue(event, arrival)
            elif kind is SampleGap:
                self._enqueue(event, arrival)
            elif kind is ChipReply:
                counters["replies"] += 1
                if self.on_reply is not None:
                    self.on_reply(event)
        self._read_timer.add(read_s if read_s is not None else self._clock() - parsed)

    feed = data_received

    def connection_made(self, link):
        """The link (re)opened its port.  On a reopen, hold frames and ask for a re-start."""
        self.counters["link_opens"] += 1
        on_reconnect = self.on_reconnect
        if self.counters["link_opens"] > 1 and on_reconnect is not None:
            self._holding = True
            on_reconnect()

    def release_frames(self):
        """The chip's configuration was checked again: decode its frames again (any thread)."""
        self._holding = False

    def report_fault(self, kind, reason):
        """A fault found on the link side (e.g. ``chip_config``); passed to ``on_fault``."""
        if self.on_fault is not None:
            self.on_fault(kind, reason)

    def _stream_restarted(self, frame, arrival):
        # A new stream after a chip reset: the samples missed since the last frame we
        # queued cannot be counted from sequence numbers, so estimate them from the
        # arrival clock (what is pending from dropped frames is part of that time).
        self.counters["stream_restarts"] += 1
        if self.sample_rate is None:
            return
        missing = int(round((arrival - self._last_queued_s) * self.sample_rate)) - frame.samples.shape[0]
        self._lost_frames = self._lost_samples = 0
        self._lost_first = None
        if missing > 0:
            self.counters["restart_gap_samples"] += missing
            self._lost_frames = None
            self._lost_samples = missing

    def connection_lost(self, exc=None):
        """The link lost the port (it may reconnect): a partial frame is discarded."""
        self.counters["link_losses"] += 1
        self.parser.flush()

    def _enqueue(self, event, arrival):
        frames = self._frames
        if self._lost_samples:
            # Samples dropped (full queue, held after a reconnect, a chip reset)
            # reach the decoder as a gap, first.
            gap = SampleGap(self._lost_first, self._lost_frames, self._lost_samples)
            if not frames.put((gap, arrival)):
                self._lose(event)
                return
            self._lost_frames = self._lost_samples = 0
            self._lost_first = None
        if not frames.put((event, arrival)):
            self._lose(event)
        elif type(event) is SampleFrame:
            self._last_queued_s = arrival

    def _lose(self, event, counter="frames_dropped_queue_full"):
        if type(event) is SampleGap:
            frames, samples, first = event.missing_frames, event.missing_samples, event.first_missing_sequence
        else:
            frames, samples, first = 1, event.samples.shape[0], event.sequence
            if counter is not None:
                self.counters[counter] += 1
        if self._lost_first is None:
            self._lost_first = first
        if self._lost_frames is not None and frames is not None:
            self._lost_frames += frames
        else:
            self._lost_frames = None        # a count of frames is unknown once an estimate is in
        self._lost_samples += samples


class RuntimeParts(object):
    """The stage objects of one run (built by :func:`build_runtime`)."""

    def __init__(self, **parts):
        self.__dict__.update(parts)


def build_runtime(pipeline, backend, hand, config, scale_uv, clock, timer=None, catch_up="newest",
                  recorder=None, measure_latency=True, stream=None):
    """Check that the pieces fit and build the stage objects.

    Parameters
    ----------
    pipeline : FeaturePipeline (with normalisation)
    backend : decoder backend (``n_features``, ``n_outputs``, ``initial_state``, ``step``)
    hand : hand driver (``n_outputs``, ``send``, optional ``keepalive_period_s``, ``close``)
    config : RuntimeConfig
    scale_uv : sequence of float, µV per count, one per channel
    clock : callable, time of events (perf_counter, or a VirtualClock in fast replay)
    timer : callable or None, durations (None = clock)
    catch_up : "newest" (real time) or "all" (fast replay)
    recorder : RecordingSink / ThreadedRecorder or None
    stream : the feature stream, or None for ``pipeline.stream()`` (fast replay
        with a feature worker passes its PrefetchedStream)

    Raises ConfigError when the model, the pipeline, the hand, the scales
    and the settings do not fit together (refuse to start on nonsense).
    """
    n_outputs = int(backend.n_outputs)
    if int(backend.n_features) != int(pipeline.n_features):
        raise ConfigError("the model takes {} features but the feature pipeline makes {}".format(
            backend.n_features, pipeline.n_features))
    hand_outputs = getattr(hand, "n_outputs", n_outputs)
    if int(hand_outputs) != n_outputs:
        raise ConfigError("the model has {} outputs but the hand driver takes {}".format(n_outputs, hand_outputs))
    scale = [float(s) for s in scale_uv]
    if len(scale) != pipeline.n_channels or not all(s > 0 and s != float("inf") for s in scale):
        raise ConfigError("scale_uv needs {} finite positive values (one per channel), got {!r}".format(
            pipeline.n_channels, scale_uv))
    rate = float(pipeline.signal_rate)
    if config.stride_ms is not None:
        wanted = int(round(config.stride_ms * rate / 1000.0))
        if wanted != pipeline.stride_samples:
            raise ConfigError("runtime stride_ms {} ({} samples) differs from the bundle's feature pipeline "
                              "stride of {} samples ({:g} ms); build the pipeline with that stride".format(
                                  config.stride_ms, wanted, pipeline.stride_samples,
                                  1000.0 * pipeline.stride_samples / rate))
    config.check_outputs(n_outputs)
    timer = clock if timer is None else timer
    stats = RuntimeStats()
    supervisor = SafetySupervisor.from_config(config, n_outputs, clock())
    postprocessor = PostProcessor.from_config(config, n_outputs)
    decode = DecodeStage(pipeline.stream() if stream is None else stream, backend, postprocessor, supervisor, stats, scale, rate,
                         pipeline.stride_samples, pipeline.n_features, n_outputs, clock, timer=timer,
                         catch_up=catch_up, recorder=recorder)
    writer = HandWriterStage(hand, supervisor, stats, timer, n_outputs, measure_latency=measure_latency)
    if recorder is not None:
        supervisor.listeners.append(recorder.on_safety_event)
    period = config.writer_period_ms / 1000.0
    keepalive = getattr(hand, "keepalive_period_s", None)
    if keepalive:
        # Half the hand's limit: a late wake-up must not let the hand time out.
        period = min(period, 0.5 * float(keepalive))
    return RuntimeParts(pipeline=pipeline, backend=backend, hand=hand, config=config, stats=stats,
                        supervisor=supervisor, postprocessor=postprocessor, decode=decode, writer=writer,
                        recorder=recorder, writer_period_s=period, n_outputs=n_outputs,
                        sample_rate=rate, stride_samples=pipeline.stride_samples)


class RealtimeRunner(object):
    """Threads around the stages; see the module docstring.

    Parameters
    ----------
    parts : RuntimeParts (built with catch_up="newest" and this runner's clock)
    open_chip : callable(receiver) -> link
        Opens the chip link with ``receiver`` as its protocol object, starts
        streaming, and returns an object whose ``close()`` stops streaming
        and closes the port.  Called from :meth:`start`.
    parser : ChipParser or None (a new one)
    clock : callable, the monotonic clock (time.perf_counter)
    status_stream : file for the status and safety lines (stderr); None = silent
    stats_path : str or None, where :meth:`shutdown` writes the stats JSON

    The runner owns the hand, the backend and the recorder of ``parts`` and
    closes them in :meth:`shutdown`.  It installs no signal handlers; see
    :func:`installed_signal_handlers`.
    """

    def __init__(self, parts, open_chip, parser=None, clock=time.perf_counter, status_stream=None,
                 stats_path=None):
        self.parts = parts
        self._open_chip = open_chip
        self.parser = ChipParser() if parser is None else parser
        self._clock = clock
        self._status = status_stream
        self._stats_path = stats_path
        self.frames = BatchQueue(parts.config.frame_queue_events)
        self.commands = LatestSlot()
        self.receiver = ChipReceiver(self.parser, self.frames, parts.stats, clock,
                                     sample_rate=parts.sample_rate)
        self.receiver.on_fault = self._on_chip_fault
        self._stop = threading.Event()
        self._writer_stop = threading.Event()
        self._shutdown_lock = threading.Lock()
        self.stop_reason = None
        self.thread_errors = []
        self.document = None
        self._link = None
        self._closed_link = None
        self._started_s = None
        self._threads = []
        self._events_printed = 0
        parts.supervisor.listeners.append(self._on_safety_event)

    # -- life cycle

    def start(self):
        """Start the recorder, writer and decoder threads, then open the chip link."""
        self._started_s = self._clock()
        recorder = self.parts.recorder
        if isinstance(recorder, ThreadedRecorder):
            recorder.start()
        for name, body in (("writer", self._writer_loop), ("decoder", self._decode_loop)):
            thread = threading.Thread(target=self._guard, args=(name, body),
                                      name="neurohand-{}".format(name), daemon=True)
            thread.start()
            self._threads.append(thread)
        self._link = self._open_chip(self.receiver)
        return self

    def run(self, duration_s=None):
        """Start, supervise until stopped (signal, ``duration_s``, a crashed thread), shut down.

        Returns the stats document.  A crashed thread (a bug) is re-raised
        after the shutdown has put the hand in its safe posture.
        """
        try:
            self.start()
            self._supervise(duration_s)
        finally:
            document = self.shutdown()
        if self.thread_errors:
            name, exc, text = self.thread_errors[0]
            raise RuntimeError("the {} thread crashed:\n{}".format(name, text)) from exc
        return document

    def request_stop(self, reason):
        """Ask the run to end (signal handlers call this); returns at once."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def shutdown(self, reason=None):
        """Stop everything, safe posture, close files, write stats.  Idempotent.

        Order: stop the writer thread, send the safe posture from here (so
        nothing can follow it), close the chip link, stop the decoder, close
        the hand, the recording and the backend, write ``--stats-json``.
        Every step runs even if an earlier one failed.
        """
        with self._shutdown_lock:
            if self.document is not None:
                return self.document
            self.request_stop(reason or "shutdown")
            parts = self.parts
            parts.supervisor.note("shutdown", self._clock(), str(self.stop_reason))
            problems = []
            steps = (
                ("writer thread", self._stop_writer),
                ("safe posture", lambda: parts.writer.send_safe_posture(self._clock())),
                ("chip link", self._close_link),
                ("decoder thread", self._stop_decoder),
                ("hand", parts.hand.close),
                ("recording", parts.recorder.close if parts.recorder is not None else None),
                ("backend", getattr(parts.backend, "close", None)),
            )
            for name, step in steps:
                if step is None:
                    continue
                try:
                    step()
                except Exception as exc:  # keep shutting down; report at the end
                    problems.append("{}: {!r}".format(name, exc))
            self._print_safety_events()
            self.document = self.stats_document(problems)
            if self._stats_path is not None:
                write_stats_json(self._stats_path, self.document)
            return self.document

    # -- threads

    def _guard(self, name, body):
        try:
            body()
        except BaseException as exc:  # a bug: record it, make the hand safe, stop the run
            self.thread_errors.append((name, exc, traceback.format_exc()))
            self.parts.supervisor.on_fault("decoder_error", self._clock(),
                                           "{} thread crashed: {!r}".format(name, exc))
            self.commands.nudge()
            self.request_stop("{} thread crashed".format(name))

    def _decode_loop(self):
        items = []
        process = self.parts.decode.process
        emit = self.commands.put
        take_all = self.frames.take_all
        while True:
            finished = take_all(items, WAKE_S)
            if items:
                process(items, emit)
                del items[:]
            if finished:
                return

    def _writer_loop(self):
        clock = self._clock
        period = self.parts.writer_period_s
        step = self.parts.writer.step
        get = self.commands.get
        stopping = self._writer_stop.is_set
        next_due = clock()
        while not stopping():
            command = get(next_due - clock())
            if stopping():
                return
            now = clock()
            if command is None and now < next_due and self.parts.supervisor.is_ok:
                continue  # woken early for nothing new: wait for the rest of the period
            step(command, now)
            next_due = now + period

    def _stop_writer(self):
        self._writer_stop.set()
        self.commands.nudge()
        self._join("writer")

    def _stop_decoder(self):
        self.frames.close()
        self._join("decoder")

    def _close_link(self):
        link, self._link = self._link, None
        if link is not None:
            self._closed_link = link
            link.close()

    def _join(self, name):
        for thread in self._threads:
            if thread.name == "neurohand-{}".format(name):
                thread.join(JOIN_TIMEOUT_S)
                if thread.is_alive():
                    raise RuntimeError("{} thread did not stop within {} s".format(name, JOIN_TIMEOUT_S))

    # -- main thread

    def _supervise(self, duration_s):
        clock = self._clock
        interval = self.parts.config.status_interval_s
        next_status = self._started_s + interval
        while not self._stop.wait(WAKE_S):
            now = clock()
            self._print_safety_events()
            if interval and now >= next_status and self._status is not None:
                print(self.status_line(now), file=self._status)
                next_status = now + interval
            if duration_s is not None and now - self._started_s >= duration_s:
                self.request_stop("duration of {:g} s reached".format(duration_s))

    def _on_chip_fault(self, kind, reason):
        # From the chip restart thread: the safe posture at once, and the reason in the event log.
        self.parts.supervisor.on_fault(kind, self._clock(), reason)

    def _on_safety_event(self, event):
        if event["kind"] != "ready":
            # Wake the writer so a fault's safe posture goes out now, not at the next period.
            self.commands.nudge()

    def _print_safety_events(self):
        if self._status is None:
            return
        events = self.parts.supervisor.events
        while self._events_printed < len(events):
            event = events[self._events_printed]
            self._events_printed += 1
            print("neurohand run: safety: {} at {:.3f} s (sample {}): {}".format(
                event["kind"], event["time_s"], event["sample"], event["reason"]), file=self._status)

    def frames_summary(self):
        counters = self.parser.counters
        return {"received": counters.frames_good, "missing": counters.frames_missing,
                "corrupt": counters.crc_errors + counters.malformed, "resyncs": counters.resyncs,
                "bad_headers": counters.bad_headers, "bytes_discarded": counters.bytes_discarded,
                "dropped_queue_full": self.receiver.counters["frames_dropped_queue_full"],
                "queue_high_water": self.frames.high_water}

    def status_line(self, now):
        parts = self.parts
        return format_status_line(now - self._started_s, parts.stats, self.frames_summary(),
                                  parts.decode.counters, parts.writer.counters, parts.supervisor.state)

    def stats_document(self, problems=()):
        parts = self.parts
        writer_counters = dict(parts.writer.counters)
        writer_counters["commands_superseded"] = self.commands.superseded
        link = self._link if self._link is not None else self._closed_link
        chip_link = dict(self.receiver.counters)
        chip_link.update(getattr(link, "counters", None) or {})
        extra = {"mode": "realtime", "stop_reason": self.stop_reason, "chip_link": chip_link,
                 "shutdown_problems": list(problems),
                 "thread_errors": ["{}: {!r}".format(name, exc) for name, exc, _ in self.thread_errors]}
        return _document(parts, self.frames_summary(), writer_counters, extra,
                         None if self._started_s is None else self._clock() - self._started_s)


def _document(parts, frames, writer_counters, extra, duration_s):
    recorder = parts.recorder
    more = {"duration_s": None if duration_s is None else round(duration_s, 3),
            "writer_period_s": parts.writer_period_s,
            "stride_ms": 1000.0 * parts.stride_samples / parts.sample_rate,
            "runtime_config": parts.config.to_dict(),
            "feature_stream": dict(getattr(parts.decode, "stream_counters", {}) or {}),
            "hand": dict(getattr(parts.hand, "counters", {}) or {}),
            "recording": recorder.summary() if hasattr(recorder, "summary") else None}
    more.update(extra)
    return build_stats_document(parts.stats, frames, parts.decode.counters, writer_counters,
                                parts.supervisor.summary(), more)


def write_stats_json(path, document):
    """Write ``document`` to ``path`` atomically (temporary file, then rename)."""
    temporary = "{}.tmp{}".format(path, os.getpid())
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, sort_keys=True, allow_nan=False)
        handle.write("\n")
    os.replace(temporary, path)


@contextlib.contextmanager
def installed_signal_handlers(runner, signals=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT/SIGTERM ask ``runner`` to stop (its main loop then shuts down);
    the previous handlers come back on exit.  Main thread only."""
    previous = {}

    def handler(signum, frame):
        runner.request_stop(signal.Signals(signum).name)

    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
        yield runner
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class VirtualClock(object):
    """A clock that only moves when told (fast replay): ``clock()`` -> ``clock.now``."""

    def __init__(self, start_s=0.0):
        self.now = float(start_s)

    def __call__(self):
        return self.now


def run_fast(parts, items, clock, on_command=None):
    """Fast replay: push ``(event, t_s)`` items through the stages in this thread.

    ``t_s`` is the virtual arrival time of each event (the time of its last
    sample, counted from the first replayed sample, as
    :func:`~neurohand.deploy.runtime.replay_source.recording_items` yields);
    ``clock`` is the :class:`VirtualClock` the parts were built with.

    Items may be large (many windows each): the DSP and features then run
    vectorised over the whole block, which is what makes replay fast, while
    the writer still sees the real-time timeline -- each decoded window is
    handed over at its own end time, and between windows the writer is
    stepped at its period (watchdog, keep-alive), as its thread would be.
    So a block is not mistaken for a pause in the data, and a real gap is.
    ``on_command(command)``, if given, sees every DecodedCommand.
    Returns the stats document (latency is not measured: time is virtual).
    """
    decode = parts.decode
    writer = parts.writer
    period = parts.writer_period_s
    rate = float(decode.sample_rate)
    batch = [None]
    ready = []
    emit = ready.append
    state = {"next_tick": None, "last_s": float("-inf")}

    def tick_until(t):
        while state["next_tick"] <= t:
            clock.now = state["next_tick"]
            writer.step(None, clock.now)
            state["next_tick"] += period

    first_s = None
    started = time.perf_counter()
    for item in items:
        t = item[1]
        if first_s is None:
            first_s = t
            state["next_tick"] = t
        # The block's samples arrive over its own duration: up to its first
        # sample the writer runs on what it had (a pause in the data shows).
        event = item[0]
        lead = event.samples.shape[0] / rate if isinstance(event, SampleFrame) else 0.0
        tick_until(t - lead)
        clock.now = t
        batch[0] = item
        decode.process(batch, emit)
        for command in ready:
            # The window's own end time: its last sample arrived this many
            # samples before the item's last one (never before the previous window).
            window_s = max(t - (decode.samples_seen - command.sample) / rate, state["last_s"])
            state["last_s"] = window_s
            tick_until(window_s)
            clock.now = window_s
            writer.step(command, window_s)
            state["next_tick"] = window_s + period
            if on_command is not None:
                on_command(command)
        del ready[:]
        tick_until(t)
        clock.now = t
    parts.supervisor.note("shutdown", clock.now, "end of replay")
    writer.send_safe_posture(clock.now)
    elapsed = time.perf_counter() - started
    frames = {"received": decode.counters["frames"], "missing": decode.counters["missing_frames"],
              "missing_samples": decode.counters["missing_samples"], "corrupt": 0, "resyncs": 0}
    virtual = 0.0 if first_s is None else clock.now - first_s
    extra = {"mode": "fast", "cpu_s": round(elapsed, 3), "replayed_s": round(virtual, 3),
             "speed_x": round(virtual / elapsed, 1) if elapsed > 0 else None}
    writer_counters = dict(writer.counters)
    return _document(parts, frames, writer_counters, extra, virtual)
