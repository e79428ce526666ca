"""Safety of the decode stages: safe posture on stale data, decoder failures and
bad values, recovery, skips -- driven synchronously on a virtual clock.

The decoder is the real numpy backend on the golden GRU (6 features -> 5
outputs) behind a real feature pipeline (envelope mode: numpy only); faults
are injected by a thin wrapper around that backend.
"""
import os

import numpy as np
import pytest

from neurohand.decoder.backends import create_backend
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.runtime.decode import DecodedCommand
from neurohand.deploy.runtime.assemble import build_runtime
from neurohand.deploy.runtime.fast import VirtualClock, run_fast
from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.errors import LinkError
from neurohand.firmware_bridge.hands.base import HandDriver

MODEL = os.path.join(os.path.dirname(__file__), "data", "golden_gru.onnx")
RATE = 1000.0          # Hz
SPF = 10               # samples per frame = the stride: one window per frame
STRIDE_S = 0.01
PIPELINE = {"format": "neurohand-feature-pipeline", "version": 1, "signal_rate": RATE, "n_channels": 3,
            "mode": "envelope", "dtype": "float64", "window_samples": 50, "stride_samples": 10,
            "car": False, "sos": [], "features": ["mean", "std"], "bandpower_bands_hz": [],
            "threshold_uv": 0.0, "log": False, "log_epsilon": 1e-6,
            "normalisation": {"mean": [0.0] * 6, "std": [50.0] * 6}}


class RecordingHand(HandDriver):
    """A hand that refuses anything unsafe (the real driver check) and logs what it got, when."""

    def __init__(self, clock, n_outputs=5, fail=False):
        super(RecordingHand, self).__init__(n_outputs)
        self.clock = clock
        self.fail = fail
        self.sent = []      # (time, positions)
        self.closed = False

    def _write_positions(self, positions):
        assert np.all(np.isfinite(positions)) and np.all((positions >= 0) & (positions <= 1))
        if self.fail:
            raise LinkError("hand port 'test' vanished")
        self.sent.append((self.clock(), positions.copy()))

    def close(self):
        self.closed = True


class FaultyBackend(object):
    """The real backend, with faults on chosen steps: {step_index: "raise" | "nan" | "big"}."""

    def __init__(self, faults=None):
        self.inner = create_backend("numpy", MODEL)
        self.n_features, self.n_outputs = self.inner.n_features, self.inner.n_outputs
        self.faults = dict(faults or {})
        self.steps = 0
        self.resets = 0

    def initial_state(self):
        self.resets += 1
        return self.inner.initial_state()

    def step(self, features, state):
        index, self.steps = self.steps, self.steps + 1
        fault = self.faults.get(index)
        if fault == "raise":
            raise RuntimeError("injected failure")
        outputs, state = self.inner.step(features, state)
        if fault == "nan":
            outputs = outputs.copy()
            outputs[2] = np.nan
        return outputs, state

    def close(self):
        self.inner.close()


def frames(start_s, count, seed=0, first_sequence=0):
    """``count`` frames of SPF samples, the first ending at ``start_s`` + one frame."""
    rng = np.random.RandomState(seed)
    items = []
    for i in range(count):
        samples = rng.randint(-200, 200, size=(SPF, 3)).astype(np.int16)
        items.append((SampleFrame(first_sequence + i, 0, samples), start_s + (i + 1) * SPF / RATE))
    return items


def build(config=None, faults=None, catch_up="all", fail_hand=False):
    clock = VirtualClock()
    hand = RecordingHand(clock, fail=fail_hand)
    backend = FaultyBackend(faults)
    parts = build_runtime(FeaturePipeline.from_config(PIPELINE), backend, hand, config or RuntimeConfig(),
                          [0.5, 0.5, 0.5], clock, catch_up=catch_up, measure_latency=False)
    return parts, hand, backend, clock


def sends_between(hand, start, stop):
    return [(t, p) for t, p in hand.sent if start <= t < stop]


def test_hand_is_open_until_decoding_is_ready_then_follows_the_decoder():
    parts, hand, _, clock = build(RuntimeConfig(max_slew_per_s=None))
    run_fast(parts, frames(0.0, 40), clock)
    # Windows complete from 0.05 s (window 50 samples); 5 good windows -> ready at 0.09 s.
    events = parts.supervisor.summary()["events"]
    assert events[0]["kind"] == "ready" and events[0]["time_s"] == pytest.approx(0.09)
    before = sends_between(hand, 0.0, 0.09)
    assert before and all(np.all(p == 0) for _, p in before)
    after = [p for t, p in sends_between(hand, 0.09, 1.0)]
    assert any(np.any(p > 0) for p in after)
    assert parts.decode.counters["windows_decoded"] == 36
    assert parts.writer.counters["new_commands_sent"] == 36 - 4


@pytest.mark.parametrize("posture", ["open", "hold"])
def test_data_stop_gives_safe_posture_within_one_writer_period(posture):
    config = RuntimeConfig(safe_posture=posture, data_timeout_ms=100, writer_period_ms=20)
    parts, hand, _, clock = build(config)
    before = frames(0.0, 50)                       # data until t = 0.5 s
    last_data = before[-1][1]
    after = frames(1.0, 20, seed=1, first_sequence=100)
    run_fast(parts, before + after, clock)
    last_good = [p for t, p in hand.sent if t <= last_data][-1]
    silent = sends_between(hand, last_data + 1e-9, 1.0)
    timeout_at = last_data + 0.1
    # Keep-alives of the last command until the timeout, the safe posture after it.
    safe = [(t, p) for t, p in silent if t > timeout_at]
    assert safe and safe[0][0] <= timeout_at + config.writer_period_ms / 1000.0 + 1e-9
    expected = np.zeros(5) if posture == "open" else last_good
    assert all(np.array_equal(p, expected) for _, p in safe)
    assert all(np.array_equal(p, last_good) for t, p in silent if t <= timeout_at)
    summary = parts.supervisor.summary()
    assert summary["by_kind"]["data_timeout"] == 1
    kinds = [e["kind"] for e in summary["events"]]
    assert kinds[:3] == ["ready", "data_timeout", "recovered"]


def test_a_lost_source_is_a_fault_of_its_own_safe_at_once_and_not_counted_twice():
    from neurohand.deploy.runtime.safety import SafetySupervisor
    supervisor = SafetySupervisor("open", 0.1, 2, 5, 0.0)
    # While starting (the hand safe already) it is counted and logged, and starting goes on.
    supervisor.on_fault("source_lost", 0.01, "LSL stream lsl:x lost: gone")
    assert supervisor.state == "starting"
    for t in (0.02, 0.03):
        supervisor.on_good_window(t)
    assert supervisor.is_ok and supervisor.check(0.035)
    supervisor.on_command(0.03)
    # Lost while ok: the safe posture at once, well within the data timeout.
    supervisor.on_fault("source_lost", 0.04, "LSL stream lsl:x lost: gone")
    assert not supervisor.is_ok and not supervisor.check(0.041)
    # The silence that follows is the same outage: the watchdog adds no data_timeout.
    assert not supervisor.check(1.0)
    supervisor.on_good_window(1.5)
    supervisor.on_good_window(1.51)
    summary = supervisor.summary()
    assert summary["by_kind"]["source_lost"] == 2 and summary["by_kind"]["data_timeout"] == 0
    assert summary["count"] == 2 and summary["state"] == "ok"
    assert [e["kind"] for e in summary["events"]] == ["source_lost", "ready", "source_lost", "recovered"]
    with pytest.raises(ValueError):
        supervisor.on_fault("stream_gone", 2.0, "no such kind")


def test_recovery_needs_n_good_windows_and_starts_from_the_posture_at_the_slew_limit():
    config = RuntimeConfig(recovery_windows=3, max_slew_per_s=2.0)   # 0.02 per 10 ms window
    parts, hand, _, clock = build(config)
    run_fast(parts, frames(0.0, 50) + frames(1.0, 20, seed=1, first_sequence=100), clock)
    recovered = [e for e in parts.supervisor.summary()["events"] if e["kind"] == "recovered"][0]
    # No gap was reported (a silent link, not lost frames), so every resumed frame
    # completes a window: the third good window ends at 1.03 s.
    assert recovered["time_s"] == pytest.approx(1.03)
    resumed = sends_between(hand, 1.0, 2.0)
    while_recovering = [p for t, p in resumed if t < 1.03 - 1e-9]
    assert while_recovering and all(np.all(p == 0) for p in while_recovering)
    first = [p for t, p in resumed if t >= 1.03 - 1e-9][0]
    assert np.all(first <= 0.02 + 1e-12) and np.any(first > 0)


def test_decoder_exception_gives_safe_posture_at_once_and_resets_the_state():
    parts, hand, backend, clock = build(RuntimeConfig(max_slew_per_s=None), faults={10: "raise"})
    run_fast(parts, frames(0.0, 40), clock)
    # Step 10 is the window ending at 0.05 + 10 * 0.01 = 0.15 s.
    fault = [e for e in parts.supervisor.summary()["events"] if e["kind"] == "decoder_error"]
    assert len(fault) == 1 and "injected failure" in fault[0]["reason"]
    assert fault[0]["time_s"] == pytest.approx(0.15)
    at_fault = [p for t, p in hand.sent if t >= 0.15 - 1e-9][0]
    assert np.all(at_fault == 0)
    assert backend.resets == 2                # initial state, then again after the failure
    assert parts.decode.counters["decoder_errors"] == 1
    # Recovered after 5 good windows (0.16 .. 0.20 s) and decoding again.
    assert parts.supervisor.state == "ok"
    assert any(np.any(p > 0) for t, p in hand.sent if t > 0.2)


def test_nan_output_never_reaches_the_hand():
    faults = {i: "nan" for i in range(8, 30, 3)}
    parts, hand, _, clock = build(faults=faults)
    run_fast(parts, frames(0.0, 60), clock)
    assert parts.decode.counters["non_finite_outputs"] == len(faults)
    assert parts.supervisor.counts["non_finite_output"] == len(faults)
    assert hand.counters["refused"] == 0      # nothing unsafe was even offered
    for _, positions in hand.sent:
        assert np.all(np.isfinite(positions)) and np.all((positions >= 0) & (positions <= 1))


@pytest.mark.parametrize("bad", [[0.1, np.nan, 0.2, 0.3, 0.4], [0.1, 1.5, 0.2, 0.3, 0.4],
                                 [-0.01, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2]])
def test_writer_blocks_invalid_positions_right_before_the_hand(bad):
    parts, hand, _, clock = build(RuntimeConfig(recovery_windows=1))
    run_fast(parts, frames(0.0, 10), clock)      # state ok, hand following the decoder
    assert parts.supervisor.is_ok
    command = DecodedCommand(100, 0.1, 0.1, np.array(bad, dtype=np.float64), np.zeros(5))
    sent = parts.writer.step(command, 0.2)
    assert np.array_equal(sent, np.zeros(5)) and np.array_equal(hand.sent[-1][1], np.zeros(5))
    assert parts.writer.counters["invalid_blocked"] == 1
    assert parts.supervisor.summary()["by_kind"]["invalid_command"] == 1
    assert not parts.supervisor.is_ok
    assert hand.counters["refused"] == 0


def test_skips_are_counted_when_decoding_falls_behind():
    parts, hand, _, clock = build(catch_up="newest")
    commands = []
    batch = frames(0.0, 20)
    parts.decode.process(batch[:12], commands.append)       # windows at 0.05 .. 0.12 s
    assert parts.decode.counters["windows_decoded"] == 1
    assert parts.decode.counters["windows_skipped"] == 7
    assert commands[0].sample == 120 and commands[0].arrival_s == pytest.approx(0.12)
    parts.decode.process(batch[12:13], commands.append)
    assert parts.decode.counters["windows_skipped"] == 7 and len(commands) == 2


def test_gap_is_pushed_as_missing_samples():
    parts, hand, _, clock = build()
    items = frames(0.0, 20)
    items.insert(10, (SampleGap(10, 3, 30), 0.13))
    run_fast(parts, items, clock)
    assert parts.decode.counters["missing_samples"] == 30
    assert parts.decode.stream_counters["samples_missing"] == 30
    # Windows touching the 30 missing samples are not emitted by the pipeline.
    assert parts.decode.stream_counters["windows_dropped_for_gaps"] > 0


def test_wrong_channel_count_frames_are_rejected_not_decoded():
    parts, hand, _, clock = build()
    bad = (SampleFrame(0, 0, np.zeros((SPF, 4), dtype=np.int16)), 0.01)
    parts.decode.process([bad], lambda command: None)
    assert parts.decode.counters["frames_rejected"] == 1
    assert parts.decode.counters["frames"] == 0


def test_hand_failure_is_logged_once_and_the_writer_keeps_going():
    parts, hand, _, clock = build(fail_hand=True)
    run_fast(parts, frames(0.0, 20), clock)
    assert parts.writer.counters["hand_errors"] > 1
    hand_events = [e for e in parts.supervisor.summary()["events"] if e["kind"] == "hand_error"]
    assert len(hand_events) == 1 and "vanished" in hand_events[0]["reason"]


def test_build_refuses_pieces_that_do_not_fit():
    from neurohand.firmware_bridge.shared.errors import ConfigError
    clock = VirtualClock()
    pipeline = FeaturePipeline.from_config(PIPELINE)
    with pytest.raises(ConfigError, match="scale_uv"):
        build_runtime(pipeline, FaultyBackend(), RecordingHand(clock), RuntimeConfig(), [1.0, 1.0], clock)
    with pytest.raises(ConfigError, match="hand driver takes 6"):
        build_runtime(pipeline, FaultyBackend(), RecordingHand(clock, n_outputs=6), RuntimeConfig(),
                      [1.0] * 3, clock)
    with pytest.raises(ConfigError, match="stride"):
        build_runtime(pipeline, FaultyBackend(), RecordingHand(clock), RuntimeConfig(stride_ms=20),
                      [1.0] * 3, clock)
    other = dict(PIPELINE, features=["mean"], normalisation={"mean": [0.0] * 3, "std": [1.0] * 3})
    with pytest.raises(ConfigError, match="6 features"):
        build_runtime(FeaturePipeline.from_config(other), FaultyBackend(), RecordingHand(clock),
                      RuntimeConfig(), [1.0] * 3, clock)
