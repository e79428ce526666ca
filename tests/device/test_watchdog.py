"""The watchdog's rule (docs/safety.md): no trustworthy decoded command for
``data_timeout_ms`` -> the safe posture, whatever the cause.

Three causes, each driven on a clock the test moves itself:

* frames missing: the chip goes silent, or its frames are reported lost;
* windows dropped for gaps: frames keep arriving, but every window touches a
  gap and the feature pipeline drops it (what 6 % dropped chip frames do);
* decoding too slow: every window is decoded, each too late.

Both ways of running the stages are covered: fast replay (``run_fast``, a
virtual clock, every window decoded) and the real-time stages (``catch_up=
"newest"``) stepped by hand as the decode and writer threads would, on a
FakeClock.  The realtime end-to-end case (6 % dropped frames through
pseudo-terminals) is in test_faults_realtime.py.
"""
import numpy as np
import pytest

from neurohand.deploy.runtime.assemble import build_runtime
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.runtime.fast import VirtualClock, run_fast
from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap

from test_runtime_safety import PIPELINE, FaultyBackend, RecordingHand, frames, sends_between
from timing import FakeClock
from neurohand.decoder.pipeline import FeaturePipeline

RATE = 1000.0
SPF = 10                # samples per frame = the stride; windows of 50 samples (5 frames)
FRAME_S = SPF / RATE
TIMEOUT_S = 0.1
WRITER_S = 0.02


def build(clock, catch_up, config=None, backend=None):
    hand = RecordingHand(clock)
    parts = build_runtime(FeaturePipeline.from_config(PIPELINE), backend or FaultyBackend(), hand,
                          config or RuntimeConfig(max_slew_per_s=None), [0.5, 0.5, 0.5], clock,
                          catch_up=catch_up, measure_latency=False)
    return parts, hand


def gappy_frames(start_s, count, every=4, first_sequence=0):
    """Frames every FRAME_S from ``start_s``, one in ``every`` reported lost (a SampleGap in its place):
    every 50-sample window touches a gap, yet frames keep arriving."""
    items = []
    for i, (frame, t) in enumerate(frames(start_s, count, seed=3, first_sequence=first_sequence)):
        if i % every == every - 1:
            items.append((SampleGap(frame.sequence, 1, SPF), t))
        else:
            items.append((frame, t))
    return items


def first_safe_after(hand, after_s):
    for t, positions in hand.sent:
        if t > after_s and not positions.any():
            return t
    return None


def data_timeouts(parts):
    return [e for e in parts.supervisor.summary()["events"] if e["kind"] == "data_timeout"]


# --- fast replay (virtual clock) -------------------------------------------------------------

def test_frames_missing_trip_the_watchdog_one_writer_period_after_the_timeout():
    parts, hand = build(VirtualClock(), "all")
    clock = parts.decode._clock
    good = frames(0.0, 50)                                   # windows until 0.5 s
    lost = [(SampleGap(50, 30, 30 * SPF), 0.8)]                # 0.3 s of frames never arrived
    after = frames(0.8, 30, seed=1, first_sequence=80)
    run_fast(parts, good + lost + after, clock)
    assert parts.supervisor.summary()["by_kind"]["data_timeout"] == 1
    safe = first_safe_after(hand, 0.5)
    assert 0.5 + TIMEOUT_S - 1e-9 <= safe <= 0.5 + TIMEOUT_S + WRITER_S + 1e-9
    assert "no valid chip data" in data_timeouts(parts)[0]["reason"]
    # Recovered after 5 good windows, the first one ending a full window after the gap.
    recovered = [e for e in parts.supervisor.summary()["events"] if e["kind"] == "recovered"]
    assert len(recovered) == 1 and recovered[0]["time_s"] == pytest.approx(0.8 + 0.05 + 4 * FRAME_S)


def test_windows_dropped_for_gaps_trip_the_watchdog_although_frames_keep_arriving():
    """The defect of issue 14: frames arrive, every window is dropped, the hand held a stale command."""
    parts, hand = build(VirtualClock(), "all")
    clock = parts.decode._clock
    items = frames(0.0, 50) + gappy_frames(0.5, 100, first_sequence=50) + frames(1.5, 30, seed=2,
                                                                                 first_sequence=150)
    run_fast(parts, items, clock)
    assert parts.decode.stream_counters["windows_dropped_for_gaps"] >= 90
    timeouts = data_timeouts(parts)
    assert len(timeouts) == 1
    assert "although chip data arrive" in timeouts[0]["reason"]
    # The last good window ends at 0.5 s + 3 frames (the first gap is the 4th frame after 0.5 s).
    last_good_s = 0.5 + 3 * FRAME_S
    safe = first_safe_after(hand, last_good_s)
    assert last_good_s + TIMEOUT_S - 1e-9 <= safe <= last_good_s + TIMEOUT_S + WRITER_S + 1e-9
    # Held in the safe posture while the gappy frames lasted, recovered on clean data.
    assert all(not p.any() for t, p in sends_between(hand, safe, 1.5))
    assert parts.supervisor.state == "ok"
    assert any(p.any() for t, p in sends_between(hand, 1.6, 2.0))


def test_sparse_good_windows_do_not_add_up_to_a_recovery():
    """Good windows that come further apart than the data timeout are not consecutive."""
    parts, hand = build(VirtualClock(), "all")
    clock = parts.decode._clock
    # After the gaps: one clean stretch of 6 frames (window 50 samples: 2 good windows)
    # every 0.2 s, never 5 good windows in a row.
    items = frames(0.0, 50)
    t, sequence = 0.5, 50
    for _ in range(5):
        items += gappy_frames(t, 14, every=2, first_sequence=sequence)
        t, sequence = t + 14 * FRAME_S, sequence + 14
        items += frames(t, 6, seed=sequence, first_sequence=sequence)
        t, sequence = t + 6 * FRAME_S, sequence + 6
    run_fast(parts, items, clock)
    kinds = [e["kind"] for e in parts.supervisor.summary()["events"]]
    assert kinds[:2] == ["ready", "data_timeout"] and "recovered" not in kinds
    assert all(not p.any() for t, p in sends_between(hand, 0.7, t))


# --- the real-time stages, stepped on a FakeClock ----------------------------------------------

class Stepper(object):
    """The decode and writer threads of realtime.py, by hand: frames arrive at their times, the
    decoder takes each as its own batch, the writer runs on every command and every period."""

    def __init__(self, parts, clock):
        self.parts, self.clock = parts, clock
        self.pending = []
        self.next_tick = clock()

    def emit(self, command):
        self.pending.append(command)

    def tick_until(self, t):
        while self.next_tick <= t:
            self.clock.now = self.next_tick
            self.parts.writer.step(None, self.clock.now)
            self.next_tick += self.parts.writer_period_s

    def feed(self, items, offset):
        for event, t in items:
            self.tick_until(offset + t)
            self.clock.now = offset + t
            self.parts.decode.process([(event, offset + t)], self.emit)
            for command in self.pending:
                self.parts.writer.step(command, self.clock.now)
                self.next_tick = self.clock.now + self.parts.writer_period_s
            del self.pending[:]


def test_realtime_stages_windows_dropped_for_gaps_trip_the_watchdog():
    clock = FakeClock()
    parts, hand = build(clock, "newest")
    stepper = Stepper(parts, clock)
    start = clock()
    stepper.feed(frames(0.0, 50) + gappy_frames(0.5, 60, first_sequence=50), start)
    timeouts = data_timeouts(parts)
    assert len(timeouts) == 1 and "although chip data arrive" in timeouts[0]["reason"]
    last_good_s = start + 0.5 + 3 * FRAME_S
    safe = first_safe_after(hand, last_good_s)
    assert last_good_s + TIMEOUT_S - 1e-9 <= safe <= last_good_s + TIMEOUT_S + WRITER_S + 1e-9


class SlowBackend(FaultyBackend):
    """Every step from ``from_step`` on takes ``seconds`` of the fake clock."""

    def __init__(self, clock, seconds, from_step):
        FaultyBackend.__init__(self)
        self.clock, self.seconds, self.from_step = clock, seconds, from_step

    def step(self, features, state):
        if self.steps >= self.from_step:
            self.clock.advance(self.seconds)
        return FaultyBackend.step(self, features, state)


def test_realtime_stages_decoding_too_slow_trips_the_watchdog():
    """Each window decoded 150 ms after its data arrived: commands keep coming, all of them stale."""
    clock = FakeClock()
    backend = SlowBackend(clock, 0.15, from_step=10 ** 9)
    parts, hand = build(clock, "newest", backend=backend)
    stepper = Stepper(parts, clock)
    start = clock()
    # A slow decoder falls behind: frames are queued and decoded a batch at a time, newest window only.
    stepper.feed(frames(0.0, 30), start)
    assert parts.supervisor.state == "ok"
    backend.from_step = 0
    t = start + 0.3
    sequence = 30
    for _ in range(10):
        batch = frames(t - start, 15, seed=sequence, first_sequence=sequence)
        clock.now = t + 15 * FRAME_S
        stepper.tick_until(clock.now)
        parts.decode.process([(e, start + s) for e, s in batch], stepper.emit)
        for command in stepper.pending:
            assert clock() - command.arrival_s > TIMEOUT_S          # stale when it is ready
            parts.writer.step(command, clock())
            assert not hand.sent[-1][1].any()                         # never sent: the safe posture is
        del stepper.pending[:]
        t, sequence = clock(), sequence + 15
    assert len(data_timeouts(parts)) == 1
    assert parts.supervisor.state == "safe"
    assert parts.decode.counters["windows_decoded"] >= 30
    # Fast again: recovery after recovery_windows good windows.
    backend.from_step = 10 ** 9
    stepper.next_tick = clock()
    stepper.feed(frames(clock() - start, 20, seed=99, first_sequence=sequence), start)
    assert parts.supervisor.state == "ok"
    assert any(p.any() for _, p in hand.sent[-10:])


def test_a_normal_run_never_trips_the_watchdog():
    """With no fault, decoding every stride is well inside the data timeout."""
    clock = FakeClock()
    parts, hand = build(clock, "newest")
    Stepper(parts, clock).feed(frames(0.0, 300), clock())
    assert parts.supervisor.summary()["count"] == 0 and parts.supervisor.state == "ok"
    parts, hand = build(VirtualClock(), "all")
    run_fast(parts, frames(0.0, 300), parts.decode._clock)
    assert parts.supervisor.summary()["count"] == 0


def test_a_data_timeout_shorter_than_two_strides_is_refused():
    from neurohand.firmware_bridge.shared.errors import ConfigError
    with pytest.raises(ConfigError, match="two decoding strides"):
        build(VirtualClock(), "all", RuntimeConfig(data_timeout_ms=15, writer_period_ms=10))
