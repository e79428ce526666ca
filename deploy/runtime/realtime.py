"""Threads, queues and the shutdown path around the pure stages (``neurohand run``, ``replay --realtime``).

Where a window is decoded is the setting ``decode_in``.  ``"reader"`` (the default)::

    chip link reader thread                                       writer thread
    bytes -> ChipReceiver: stamp arrival (perf_counter),          keep-alive / watchdog every period,
      ChipParser.feed, ChunkBatch.put((event, t)),                and the safe posture at once on a
      then on_chunk: DecodeStage.process(chunk)                   fault (LatestSlot.nudge)
        -> HandWriterStage.step(command, now): hand.send
    ThreadedRecorder (own thread, bounded backlog)
    main thread: signal handlers, status line, safety-event lines, shutdown.

The command is written by the thread that read its last byte: no hand-over
between threads on the way, each of which costs a wake-up (measured in
docs/latency.md).  A backlog (the reader was held up) arrives as one chunk,
of which only the newest window is decoded (catch_up "newest").  The writer
lock keeps the reader's writes and the writer thread's apart.

``"thread"`` (the design before issue 18)::

    chip link reader thread          decode thread                 writer thread
    bytes -> ChipReceiver            BatchQueue.take_all()         LatestSlot.get(timeout)
      stamp arrival (perf_counter)   DecodeStage.process(batch)    HandWriterStage.step(cmd|None, now)
      ChipParser.feed                  -> emit(command) ---------->  hand.send (new command at once,
      BatchQueue.put((event, t)) ->                                  keep-alive / watchdog every period)

Queues (:mod:`.queues`): the frame queue is bounded (``frame_queue_events``; a
full queue drops the frame, counts it and tells the decoder the samples are
missing); the command queue is one slot holding only the newest command.
Nothing blocks without a timeout, and a stop wakes every thread that waits for
one (the main thread and the chip's restart thread sleep longer, up to 0.5
and 1 s, because nothing but a stop or a reconnect gives them work).

Garbage collection (:mod:`.garbage`): automatic collection is off while the
threads run; the thread that wrote a new command runs the collections that
are due right after it, so a collector's pause never lands inside a decode
step or a hand write (timed as the ``gc`` stage).
"""
import contextlib
import signal
import threading
import time
import traceback

from neurohand.deploy.runtime.assemble import run_document, write_stats_json
from neurohand.deploy.runtime.garbage import IdleCollector
from neurohand.deploy.runtime.queues import BatchQueue, ChunkBatch, LatestSlot
from neurohand.deploy.runtime.recorder import ThreadedRecorder
from neurohand.deploy.runtime.signals import StopSignals
from neurohand.deploy.runtime.stats import Distribution, format_status_line
from neurohand.firmware_bridge.chip.parser import ChipParser
from neurohand.firmware_bridge.chip.receiver import ChipReceiver
from neurohand.firmware_bridge.shared.outputs import describe_os_error

#: Longest a thread blocks before it looks at the stop flag again.
WAKE_S = 0.1
#: The main thread's longest sleep.  Every wake takes the interpreter lock, and one that lands in a
#: window's decode delays its command (docs/latency.md, "third pass"): it sleeps until the next
#: status line or the end of the run, but not longer than this (safety lines are printed by then).
SUPERVISE_WAKE_S = 0.5
#: How long shutdown waits for each thread.
JOIN_TIMEOUT_S = 2.0


def reader_write_grace_s(period_s, data_timeout_s):
    """How much later than one writer period after a command the reader wrote the writer wakes next.

    The reader writes one command per stride, and the stride is usually the
    writer period: a writer due exactly one period after the reader's write
    wakes in the middle of the reader's next decode and takes the interpreter
    lock from it (docs/latency.md, "third pass").  Half a period later
    it wakes between two decodes.  At most ``data_timeout_s - period_s``: the
    writer still wakes at the latest one period after the data timeout expires
    (from then on every period), and the hand still hears from it within 1.5
    periods, at most 0.75 of its keep-alive limit (the period is at most half of it).
    """
    return max(0.0, min(0.5 * period_s, data_timeout_s - period_s))


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
    warning_stream : file for the warning that the recording stopped (stderr, even
        when quiet: a lost recording is data loss); None = silent
    stats_path : str or None, where :meth:`shutdown` writes the stats JSON

    The runner owns the hand, the backend and the recorder of ``parts`` and
    closes them in :meth:`shutdown`.  It installs no signal handlers; see
    :func:`installed_signal_handlers`.
    """

    def __init__(self, parts, open_chip, parser=None, clock=time.perf_counter, status_stream=None,
                 stats_path=None, warning_stream=None):
        self.parts = parts
        self._open_chip = open_chip
        self.parser = ChipParser() if parser is None else parser
        self._clock = clock
        self._status = status_stream
        self._warnings = warning_stream
        self._recording_warned = False
        self._stats_path = stats_path
        self.decode_in = parts.config.decode_in
        self.frames = ChunkBatch() if self.decode_in == "reader" else BatchQueue(parts.config.frame_queue_events)
        self.commands = LatestSlot()
        self.receiver = ChipReceiver(self.parser, self.frames, parts.stats, clock,
                                     sample_rate=parts.sample_rate)
        self.receiver.on_fault = self._on_chip_fault
        if self.decode_in == "reader":
            self.receiver.on_chunk = self._decode_chunk
        self._write_lock = threading.Lock()
        self._writes_closed = False         # set with the final safe posture: nothing may follow it
        self._next_write_due = 0.0
        self._reader_write_grace_s = reader_write_grace_s(parts.writer_period_s, parts.config.data_timeout_ms / 1000.0)
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
        parts.stats.stages["gc"] = Distribution()
        self.collector = IdleCollector(parts.stats.stages["gc"], clock)

    # -- life cycle

    def start(self):
        """Start the recorder, writer and decoder threads, then open the chip link."""
        self.collector.start()
        # The run's duration counts from here: the start-up collection above takes ~0.1 s when the process
        # holds 140,000 objects (Python 3.6, after a test suite), which a short run would otherwise lose.
        self._started_s = self._clock()
        recorder = self.parts.recorder
        if isinstance(recorder, ThreadedRecorder):
            recorder.start()
        threads = [("writer", self._writer_loop)]
        if self.decode_in == "thread":
            threads.append(("decoder", self._decode_loop))
        for name, body in threads:
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
            if not self._stop.is_set():
                self.start()
                self._supervise(duration_s)
            # else: stopped before it started (a signal during start-up): nothing to
            # supervise, but the shutdown still sends the safe posture and closes the recording.
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
                ("safe posture", self._final_safe_posture),
                ("chip link", self._close_link),
                ("decoder thread", self._stop_decoder),
                ("hand", parts.hand.close),
                ("recording", parts.recorder.close if parts.recorder is not None else None),
                ("backend", getattr(parts.backend, "close", None)),
                ("garbage collector", self.collector.stop),
            )
            for name, step in steps:
                if step is None:
                    continue
                try:
                    step()
                except Exception as exc:  # keep shutting down; report at the end
                    problems.append("{}: {!r}".format(name, exc))
            self._print_safety_events()
            self._warn_if_recording_stopped()
            self.document = self.stats_document(problems)
            if self._stats_path is not None:
                write_stats_json(self._stats_path, self.document)
            return self.document

    # -- threads

    def _guard(self, name, body):
        try:
            body()
        except BaseException as exc:  # a bug: record it, make the hand safe, stop the run
            self._crashed(name, exc)

    def _crashed(self, name, exc):
        self.thread_errors.append((name, exc, traceback.format_exc()))
        self.parts.supervisor.on_fault("decoder_error", self._clock(), "{} thread crashed: {!r}".format(name, exc))
        self.commands.nudge()
        self.request_stop("{} thread crashed".format(name))

    def _decode_chunk(self):
        # decode_in "reader": called by the receiver in the chip link's reader thread after each chunk.
        items = self.frames.items
        if not items:
            return
        try:
            # Also while stopping: every frame received is decoded and recorded until the link closes;
            # a command after the final safe posture is not written (_write_now).
            self.parts.decode.process(items, self._write_now)
            outlets = self.parts.outlets
            if outlets is not None and outlets.signals:
                self._publish_signals(items)    # --lsl-outlet: once the chunk's command is on its way
        except BaseException as exc:  # a bug: the link's thread must live on to be closed; the run stops
            if not self.thread_errors:
                self._crashed("reader", exc)
        finally:
            del items[:]

    def _write_now(self, command):
        # decode_in "reader": the reader thread writes the command it decoded, then collects garbage if due.
        with self._write_lock:
            if self._writes_closed:
                return
            now = self._clock()
            self.parts.writer.step(command, now)
            self._next_write_due = now + self.parts.writer_period_s + self._reader_write_grace_s
        self.collector.collect_if_due()

    def _final_safe_posture(self):
        with self._write_lock:
            self._writes_closed = True
            self.parts.writer.send_safe_posture(self._clock())

    def _decode_loop(self):
        items = []
        process = self.parts.decode.process
        emit = self.commands.put
        take_all = self.frames.take_all
        outlets = self.parts.outlets
        if outlets is not None and outlets.signals:
            self._decode_and_publish_loop(items, process, emit, take_all, outlets.publish_frames)
            return
        while True:
            finished = take_all(items, WAKE_S)
            if items:
                process(items, emit)
                del items[:]
            if finished:
                return

    def _decode_and_publish_loop(self, items, process, emit, take_all, publish):
        # --lsl-outlet with the signals: after each batch is decoded (its command is on its way
        # to the hand), its samples are published.  A loop of its own: the usual one stays as it was.
        while True:
            finished = take_all(items, WAKE_S)
            if items:
                process(items, emit)
                self._publish_signals(items)
                del items[:]
            if finished:
                return

    def _publish_signals(self, items):
        start = self._clock()
        self.parts.outlets.publish_frames(items)
        self.parts.stats.stages["publish_signals"].add(self._clock() - start)

    def _writer_loop(self):
        # New commands: from the decode thread through the slot (decode_in "thread"), or written by the
        # reader itself ("reader", where the slot only ever wakes this thread for a fault). Either way this
        # thread writes when nothing was written for a period (keep-alive, watchdog) and at once on a fault.
        clock = self._clock
        period = self.parts.writer_period_s
        step = self.parts.writer.step
        get = self.commands.get
        stopping = self._writer_stop.is_set
        supervisor = self.parts.supervisor
        self._next_write_due = clock()
        while not stopping():
            command = get(self._next_write_due - clock())
            if stopping():
                return
            with self._write_lock:
                now = clock()
                if self._writes_closed or (command is None and now < self._next_write_due and supervisor.is_ok):
                    continue  # woken early for nothing new (or the reader wrote meanwhile)
                step(command, now)
                self._next_write_due = now + period
            if command is not None:
                self.collector.collect_if_due()

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
        end = None if duration_s is None else self._started_s + duration_s
        while True:
            now = clock()
            sleep = SUPERVISE_WAKE_S
            if interval and self._status is not None:
                sleep = min(sleep, next_status - now)
            if end is not None:
                sleep = min(sleep, end - now)
            if self._stop.wait(max(sleep, 0.0)):
                return
            now = clock()
            self._print_safety_events()
            self._warn_if_recording_stopped()
            if interval and now >= next_status and self._status is not None:
                print(self.status_line(now), file=self._status)
                next_status = now + interval
            if duration_s is not None and now - self._started_s >= duration_s:
                self.request_stop("duration of {:g} s reached".format(duration_s))

    def recording_error(self):
        """Why the recording stopped (one phrase), or None while it records (or there is none)."""
        error = getattr(self.parts.recorder, "error", None)
        if error is None:
            return None
        cause = error if isinstance(error, OSError) else getattr(error, "__cause__", None)
        return describe_os_error(cause) if isinstance(cause, OSError) else str(error)

    def _warn_if_recording_stopped(self):
        if self._recording_warned:
            return
        reason = self.recording_error()
        if reason is None:
            return
        self._recording_warned = True
        if self._warnings is not None:
            path = self.parts.recorder.summary().get("path")
            print("neurohand run: warning: recording stopped: {}: {}; the hand is still driven, the data "
                  "from here on are not recorded".format(path, reason), file=self._warnings)

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
        # The receiver's parser: a signal source other than the chip puts its own in (firmware_bridge/streams).
        counters = self.receiver.parser.counters
        return {"received": counters["frames_good"], "missing": counters["frames_missing"],
                "corrupt": counters["crc_errors"] + counters["malformed"], "resyncs": counters["resyncs"],
                "bad_headers": counters["bad_headers"], "bytes_discarded": counters["bytes_discarded"],
                "dropped_queue_full": self.receiver.counters["frames_dropped_queue_full"],
                "queue_high_water": self.frames.high_water}

    def status_line(self, now):
        parts = self.parts
        classes = parts.writer.class_summary()
        return format_status_line(now - self._started_s, parts.stats, self.frames_summary(),
                                  parts.decode.counters, parts.writer.counters, parts.supervisor.state,
                                  recording_error=self.recording_error(),
                                  decided_class=None if classes is None else classes["current"])

    def stats_document(self, problems=()):
        parts = self.parts
        writer_counters = dict(parts.writer.counters)
        writer_counters["commands_superseded"] = self.commands.superseded
        link = self._link if self._link is not None else self._closed_link
        chip_link = dict(self.receiver.counters)
        chip_link.update(getattr(link, "counters", None) or {})
        extra = {"mode": "realtime", "decode_in": self.decode_in, "stop_reason": self.stop_reason,
                 "chip_link": chip_link, "shutdown_problems": list(problems),
                 "thread_errors": ["{}: {!r}".format(name, exc) for name, exc, _ in self.thread_errors]}
        return run_document(parts, self.frames_summary(), writer_counters, extra,
                         None if self._started_s is None else self._clock() - self._started_s)


@contextlib.contextmanager
def installed_signal_handlers(runner, signals=(signal.SIGINT, signal.SIGTERM)):
    """SIGINT/SIGTERM ask ``runner`` to stop (its main loop then shuts down);
    the previous handlers come back on exit.  Main thread only.  (A command
    that must survive a signal during its start-up installs
    :class:`~.signals.StopSignals` itself, before loading anything.)"""
    with StopSignals(signals) as stop:
        stop.attach(runner)
        yield runner
