"""Fast replay (``replay --fast``): the same stage objects driven from one
thread with a virtual clock, at CPU speed, on the real-time timeline."""
import time

from neurohand.deploy.runtime.assemble import run_document
from neurohand.firmware_bridge.chip.parser import SampleFrame


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
    writer = _WriterTimeline(parts.writer, clock, parts.writer_period_s)
    rate = float(decode.sample_rate)
    batch = [None]
    ready = []
    emit = ready.append
    first_s = None
    started = time.perf_counter()
    for item in items:
        t = item[1]
        if first_s is None:
            first_s = t
            writer.next_tick_s = t
        # The block's samples arrive over its own duration: up to its first
        # sample the writer runs on what it had (a pause in the data shows).
        event = item[0]
        lead = event.samples.shape[0] / rate if isinstance(event, SampleFrame) else 0.0
        writer.tick_until(t - lead)
        clock.now = t
        batch[0] = item
        decode.process(batch, emit)
        for command in ready:
            # At the window's own end time (decode.py sets arrival_s per window).
            writer.hand_over(command, command.arrival_s)
            if on_command is not None:
                on_command(command)
        del ready[:]
        writer.tick_until(t)
        clock.now = t
    parts.supervisor.note("shutdown", clock.now, "end of replay")
    parts.writer.send_safe_posture(clock.now)
    elapsed = time.perf_counter() - started
    frames = {"received": decode.counters["frames"], "missing": decode.counters["missing_frames"],
              "missing_samples": decode.counters["missing_samples"], "corrupt": 0, "resyncs": 0}
    virtual = 0.0 if first_s is None else clock.now - first_s
    extra = {"mode": "fast", "cpu_s": round(elapsed, 3), "replayed_s": round(virtual, 3),
             "speed_x": round(virtual / elapsed, 1) if elapsed > 0 else None}
    return run_document(parts, frames, dict(parts.writer.counters), extra, virtual)


class _WriterTimeline(object):
    """The writer thread's timeline, replayed on the virtual clock: a step every
    period while nothing new arrives, and each command at its window's end time."""

    def __init__(self, writer, clock, period_s):
        self._writer = writer
        self._clock = clock
        self._period_s = period_s
        self.next_tick_s = None
        self._last_window_s = float("-inf")

    def tick_until(self, t):
        """Step the writer with nothing new at every period due by ``t``."""
        clock, step, period = self._clock, self._writer.step, self._period_s
        while self.next_tick_s <= t:
            clock.now = self.next_tick_s
            step(None, clock.now)
            self.next_tick_s += period

    def hand_over(self, command, window_s):
        """The writer gets ``command`` at ``window_s`` (never before the previous window's time)."""
        window_s = max(window_s, self._last_window_s)
        self._last_window_s = window_s
        self.tick_until(window_s)
        self._clock.now = window_s
        self._writer.step(command, window_s)
        self.next_tick_s = window_s + self._period_s
