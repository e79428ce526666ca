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
    return run_document(parts, frames, writer_counters, extra, virtual)
