"""Faults injected into ``replay --realtime``, each with its expected outcome (docs/safety.md).

Every test streams a short simulated recording through a virtual chip on a
pseudo-terminal into exactly the loop of ``neurohand run`` (in process:
``deploy.replay.replay_realtime``), which drives a virtual hand on another
pseudo-terminal.  The faults come from the virtual chip (FaultInjector,
unplug), from the test (the hand's port closed mid-run) or from small
test-only wrappers around the backend and the feature pipeline (a 200 ms
stall, non-finite features, out-of-range outputs) -- never from product flags.

Two conventions make the assertions exact:

* The run outlasts the stream by OUTLAST_S: the chip finishes its recording
  and the host reads every byte it sent, so the parser's counters can be
  compared with the injector's exactly; and the end of the stream is itself a
  "data stops" fault, whose timing every test checks (``check_data_stop``).
* Every frame the virtual hand received is checked (valid CRC, as many as the
  runtime sent, the driver refused nothing).  The neurohand hand protocol
  carries 16-bit positions, so a received value is in 0..1 by construction:
  what the tests prove is that nothing non-finite or out of range ever reached
  the driver (it would have refused it and counted it).

Timing bounds allow JITTER_S for thread scheduling on a loaded 2-core machine;
the exact rule (safe posture at most one writer period after the data
timeout) is proved on a virtual clock in test_runtime_safety.py.
"""
import json
import os
import threading
import time

import numpy as np
import pytest

from neurohand.deploy import replay as replay_module
from neurohand.deploy.bundle import make_bundle
from neurohand.deploy.demo import write_session_parts
from neurohand.deploy.replay import StampedVirtualChip, replay_realtime
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.session import load_decoder, run_on_chip
from neurohand.firmware_bridge.virtual import hand as virtual_hand_module
from neurohand.firmware_bridge.shared.errors import ConfigError
from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig
from neurohand.firmware_bridge.virtual.chip import ArraySource, FaultInjector, VirtualChip
from neurohand.firmware_bridge.virtual.hand import VirtualHand

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")
STREAM_S = 3.0          # recording streamed per run (the unplug test streams LONG_STREAM_S)
LONG_STREAM_S = 4.5
OUTLAST_S = 0.4         # the run lasts this much longer than the stream
JITTER_S = 0.06         # thread scheduling allowance on a loaded machine
RATE = 2000.0
SPF = 20                # samples per chip frame
FRAME_S = SPF / RATE
STRIDE_S = 0.02
CONFIG = RuntimeConfig()                 # defaults: open posture, 100 ms timeout, 20 ms writer, 5 windows, slew 10/s
TIMEOUT_S = CONFIG.data_timeout_ms / 1000.0
WRITER_PERIOD_S = 0.02                   # min(writer_period_ms, half the neurohand hand's 50 ms keep-alive)
SLEW_STEP = CONFIG.max_slew_per_s * STRIDE_S
WIRE_EPS = 1.0 / 65535


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Bundle, the held-out recordings (short, long) and a saturated copy of the short one."""
    folder = tmp_path_factory.mktemp("faults")
    bundle = str(folder / "bundle")
    make_bundle(RUN_DIR, bundle)
    with open(os.path.join(RUN_DIR, "config.json")) as handle:
        fixture = json.load(handle)["fixture"]
    start = fixture["train_s"]
    short, long_ = str(folder / "short.nhr"), str(folder / "long.nhr")
    write_session_parts(SimulatorConfig(**fixture["session"]),
                        [(short, start, start + STREAM_S), (long_, start, start + LONG_STREAM_S)])
    saturated = str(folder / "saturated.nhr")
    write_saturated_copy(short, saturated, 1.2, 1.7)
    return {"bundle": bundle, "short": short, "long": long_, "saturated": saturated}


def write_saturated_copy(source, target, from_s, to_s):
    """``source`` with every channel at the int16 rails, alternating +-32767 per sample, in [from_s, to_s)."""
    with open_recording(source) as recording:
        signals = recording.read_signals().copy()
        first, last = int(from_s * RATE), int(to_s * RATE)
        rails = np.where(np.arange(last - first) % 2 == 0, 32767, -32767).astype(np.int16)
        signals[first:last] = rails[:, None]
        stream = recording.label_streams["fingers"]
        with RecordingWriter(target, recording.signal_rate, recording.channel_names, dtype="int16",
                             scale_uv=list(recording.scale_uv),
                             label_streams={"fingers": {"rate": stream.rate, "names": list(stream.names)}}) as out:
            out.append_signals(signals)
            out.append_labels("fingers", stream.data)


# --- the harness ------------------------------------------------------------------

class WatchedChip(StampedVirtualChip):
    """The replay's virtual chip, also stamping (time.monotonic) its last frame and its unplug and replug."""

    last_frame_s = None
    unplugged_s = None
    replugged_s = None

    def _start_stream(self):
        StampedVirtualChip._start_stream(self)
        # The unplug timer (disconnect_after_s) counts from the stream's start, so the unplug
        # lands while decoding however long the run's start-up took on a loaded machine.
        self._connected_at = self._clock()

    def _emit_frame(self):
        sent = self.counters["frames_sent"]
        StampedVirtualChip._emit_frame(self)
        if self.counters["frames_sent"] != sent:
            self.last_frame_s = self._clock()

    def _maybe_unplug_or_replug(self, now):
        was_connected = self.connected
        StampedVirtualChip._maybe_unplug_or_replug(self, now)
        if was_connected and not self.connected:
            self.unplugged_s = now
        elif self.connected and not was_connected and self.unplugged_s is not None:
            self.replugged_s = now


class Run(object):
    """One replay: the outcome, the chip, the virtual hand and every frame it received."""

    def __init__(self, outcome, chip, hand):
        self.outcome = outcome
        self.document = outcome.document
        self.summary = outcome.summary
        self.chip = chip
        self.hand = hand
        self.received = hand.received()
        self.times = np.array([c.t_monotonic for c in self.received])
        self.raw = np.array([c.raw for c in self.received], dtype=np.int64).reshape(len(self.received), -1)

    @property
    def frames(self):
        return self.document["frames"]

    @property
    def faults(self):
        return self.chip.faults.counters

    def events(self, kind):
        return [e for e in self.document["safety_events"]["events"] if e["kind"] == kind]

    def safe(self, after_s):
        """Index of the first frame received after ``after_s`` that is the safe posture (open), or None."""
        for index in np.flatnonzero(self.times > after_s):
            if not self.raw[index].any():
                return index
        return None


def replay(bench, monkeypatch, recording="short", faults=None, disconnect_after_s=None, wrap=None, during=None,
           chip_options=None):
    """Replay ``recording`` with a run OUTLAST_S longer than it; return a Run.

    chip_options: more keyword arguments for the virtual chip (e.g. reset_on_unplug=False).
    wrap(decoder) may replace ``decoder.backend`` / ``decoder.pipeline`` with test wrappers.
    during(chip, hand) runs in a thread once the chip streams (e.g. to close the hand's port).
    """
    made = {}

    def chip_class(*args, **kwargs):
        kwargs.update(chip_options or {})
        made["chip"] = WatchedChip(*args, **kwargs)
        return made["chip"]

    def hand_class(*args, **kwargs):
        made["hand"] = VirtualHand(*args, **kwargs)
        return made["hand"]

    monkeypatch.setattr(replay_module, "StampedVirtualChip", chip_class)
    monkeypatch.setattr(virtual_hand_module, "VirtualHand", hand_class)
    helper = None
    if during is not None:
        def wait_then_act():
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                chip = made.get("chip")
                if chip is not None and chip.stream_started_s is not None:
                    during(chip, made["hand"])
                    return
                time.sleep(0.01)
        helper = threading.Thread(target=wait_then_act, daemon=True)
        helper.start()
    decoder = load_decoder(bench["bundle"], "numpy")
    if wrap is not None:
        wrap(decoder)
    with open_recording(bench[recording]) as source:
        outcome = replay_realtime(decoder, source, OutlastingRange(source), CONFIG, faults=faults,
                                  disconnect_after_s=disconnect_after_s, install_signals=False)
    if helper is not None:
        helper.join(5.0)
    run = Run(outcome, made["chip"], made["hand"])
    check_every_frame(run)
    return run


class OutlastingRange(object):
    """The whole recording, with a run OUTLAST_S longer than the stream (the ReplayRange interface)."""

    def __init__(self, recording):
        self.start = 0
        self.rate = float(recording.signal_rate)
        self.stop = recording.n_samples + int(round(OUTLAST_S * self.rate))

    @property
    def seconds(self):
        return (self.stop - self.start) / self.rate


def check_every_frame(run):
    """What every run must show, whatever was injected."""
    document, hand = run.document, run.hand.counters
    assert run.document["thread_errors"] == [] and run.document["shutdown_problems"] == []
    assert document["stop_reason"].startswith("duration")
    positions = np.array([c.positions for c in run.received])
    assert np.all(np.isfinite(positions)) and np.all((positions >= 0) & (positions <= 1))
    assert hand["bad_checksums"] == 0 and hand["framing_errors"] == 0
    assert document["hand"]["refused"] == 0                 # nothing invalid ever reached the driver
    assert document["writer"]["invalid_blocked"] == 0       # nor the writer's last check
    if document["writer"]["hand_errors"] == 0:
        assert len(run.received) == document["commands_sent"]
        assert not run.raw[-1].any()                         # the shutdown's safe posture came last


def check_data_stop(run, stopped_s, earliest_s=None):
    """The data stopped at ``stopped_s`` (monotonic): the hand reaches its safe posture after the data
    timeout, and at most one writer period (plus scheduling) later.  Returns the delay (s).

    earliest_s: the earliest arrival the last decoded command's data may have had (defaults to a
    stride before ``stopped_s``: the watchdog counts from the last command, docs/safety.md, and the
    last window may have ended up to a stride before the data stopped).
    """
    earliest_s = stopped_s - STRIDE_S if earliest_s is None else earliest_s
    before = np.flatnonzero(run.times <= stopped_s)
    assert len(before) and run.raw[before[-1]].any(), "the hand was already open: the test cannot see the fault"
    index = run.safe(stopped_s)
    assert index is not None, "the hand never reached its safe posture"
    # Until then the hand followed the decoder or held its last command (no early trip).
    assert run.raw[before[-1]:index].any(axis=1).all()
    delay = run.times[index] - stopped_s
    assert run.times[index] - earliest_s >= TIMEOUT_S - 1e-3, delay
    assert delay <= TIMEOUT_S + WRITER_PERIOD_S + JITTER_S, delay
    return delay


def check_link_counters_exact(run):
    """The parser counted exactly what the chip injected (docs/chip-protocol.md)."""
    frames, faults, chip = run.frames, run.faults, run.chip.counters
    assert run.chip.finished                                 # the host read every byte of the stream
    assert frames["received"] == chip["frames_sent"] - faults["frames_dropped"] - faults["frames_corrupted"]
    assert frames["corrupt"] == faults["frames_corrupted"]
    assert frames["missing"] == faults["expected_frames_missing"]
    assert frames["bytes_discarded"] == faults["expected_bytes_discarded"]
    assert frames["resyncs"] == faults["expected_resyncs"]
    assert frames["bad_headers"] == 0 and frames["dropped_queue_full"] == 0
    # The decoder was told of every lost sample (the DSP's time axis stays right).
    assert run.document["decoder"]["missing_frames"] == frames["missing"]
    assert run.document["decoder"]["missing_samples"] == SPF * frames["missing"]


def only_the_end_of_stream_fault(run):
    by_kind = run.document["safety_events"]["by_kind"]
    assert by_kind["data_timeout"] == 1 and sum(by_kind.values()) == 1, by_kind
    assert [e["kind"] for e in run.document["safety_events"]["events"]] == ["ready", "data_timeout", "shutdown"]


# --- link faults ------------------------------------------------------------------------

@pytest.mark.parametrize("name, settings", [
    ("1 % dropped frames", dict(drop_rate=0.01, seed=3)),
    ("corrupted frames", dict(corrupt_rate=0.02, seed=5)),
    ("garbage bursts", dict(garbage_probability=0.05, garbage_max_bytes=64, seed=7)),
])
def test_link_faults_are_counted_exactly_and_never_reach_the_hand(bench, monkeypatch, name, settings):
    run = replay(bench, monkeypatch, faults=FaultInjector(**settings))
    faults = run.faults
    # Each run injected what it says, and only that.
    injected = {"1 % dropped frames": faults["frames_dropped"], "corrupted frames": faults["frames_corrupted"],
                "garbage bursts": faults["garbage_bursts"]}
    assert injected[name] >= 3, faults.as_dict()
    assert sum(injected.values()) == injected[name]
    check_link_counters_exact(run)
    if name == "garbage bursts":
        assert run.frames["missing"] == 0 and run.frames["corrupt"] == 0
        assert run.frames["bytes_discarded"] == faults["garbage_bytes"]
    if name != "garbage bursts":
        # A lost (dropped or corrupted) frame drops every window overlapping it: with 100 ms windows
        # the hand gets no command for more than the 100 ms data timeout, which the watchdog must
        # not ignore (docs/safety.md): a brief safe posture, then recovery, each time.
        dropped_windows_timeouts(run, injected[name])
        last = np.flatnonzero(run.times <= run.chip.last_frame_s)[-1]
        if not run.raw[last].any():
            return          # a frame lost near the end: the hand was in its safe posture already
    else:
        # Nothing lost: no fault until the stream ends.
        only_the_end_of_stream_fault(run)
    check_data_stop(run, run.chip.last_frame_s)


def dropped_windows_timeouts(run, dropped):
    """Data timeouts while frames kept arriving, each followed by a recovery; then the end of the stream."""
    by_kind = run.document["safety_events"]["by_kind"]
    assert sum(by_kind.values()) == by_kind["data_timeout"], by_kind
    kinds = [e["kind"] for e in run.document["safety_events"]["events"]]
    assert kinds[0] == "ready" and kinds[-2:] == ["data_timeout", "shutdown"]
    middle = kinds[1:-2]
    assert middle == ["data_timeout", "recovered"] * (len(middle) // 2) and middle, kinds
    assert len(middle) // 2 <= dropped
    for event in run.events("data_timeout")[:-1]:
        assert "although chip data arrive" in event["reason"]
    assert run.document["feature_stream"]["windows_dropped_for_gaps"] > 0


def test_six_percent_of_frames_dropped_keep_the_hand_in_its_safe_posture(bench, monkeypatch):
    """Issue 14: almost every window touches a gap and is dropped while frames keep arriving; the hand
    must not hold a stale command (it held one for 2.2 s when frames fed the watchdog)."""
    run = replay(bench, monkeypatch, faults=FaultInjector(drop_rate=0.06, seed=7))
    check_link_counters_exact(run)
    document = run.document
    assert document["feature_stream"]["windows_dropped_for_gaps"] > 0.3 * STREAM_S / STRIDE_S
    assert run.events("data_timeout") and "although chip data arrive" in run.events("data_timeout")[0]["reason"]
    # The hand never held a decoded command (repeated unchanged by keep-alives) for longer than the
    # data timeout and a writer period: then came a new command or the safe posture.
    assert longest_hold(run) <= TIMEOUT_S + WRITER_PERIOD_S + JITTER_S


def longest_hold(run):
    """Longest time (s) the hand was sent the same non-safe positions again and again."""
    longest, since = 0.0, None
    for index in range(len(run.raw)):
        if not run.raw[index].any():
            since = None
            continue
        if since is None or (run.raw[index] != run.raw[index - 1]).any():
            since = run.times[index]
        longest = max(longest, run.times[index] - since)
    return longest


def check_recovery_after_replug(run):
    """Held in the safe posture from the unplug until ``recovery_windows`` good windows after the
    replug, then from the posture at the slew limit, then following the decoder again."""
    chip = run.chip
    # The watchdog counts from the data of the last decoded command (docs/safety.md), and the last
    # window before the unplug may have ended up to a stride before it.
    check_data_stop(run, chip.unplugged_s, earliest_s=chip.unplugged_s - STRIDE_S - 2 * FRAME_S)
    assert len(run.events("data_timeout")) == 2                       # the unplug, then the end of the stream
    assert len(run.events("recovered")) == 1
    first_safe = run.safe(chip.unplugged_s)
    after = np.flatnonzero((run.times > run.times[first_safe]) & run.raw.any(axis=1))
    assert len(after), "the hand never left the safe posture after the replug"
    resumed = after[0]
    assert run.times[resumed] > chip.replugged_s
    assert not run.raw[first_safe:resumed].any()
    assert np.max(run.received[resumed].positions) <= SLEW_STEP + WIRE_EPS
    # The hand followed the decoder again: several different commands after the recovery.
    assert len({tuple(r) for r in run.raw[resumed:]}) > 10
    check_data_stop(run, chip.last_frame_s)
    return resumed


def test_chip_unplug_and_replug(bench, monkeypatch):
    """A chip that resets on unplug (bus-powered): after the replug it streams only after a new START."""
    run = replay(bench, monkeypatch, recording="long", disconnect_after_s=1.5)
    chip, document = run.chip, run.document
    assert chip.unplugged_s is not None and chip.replugged_s is not None
    assert chip.unplugged_s - chip.stream_started_s > 0.5             # while decoding, not during start-up
    # The link noticed and reopened the new port (through the symlink); the runtime checked the
    # configuration again and sent START once; the chip started a new stream.
    link = document["chip_link"]
    assert link["disconnects"] == 1 and link["reconnects"] == 1 and link["link_losses"] >= 1
    assert link["chip_restarts"] == 1 and link["chip_config_mismatches"] == 0
    assert link["stream_restarts"] == 1
    # Samples due while unplugged and until START were never sent: the new stream's sequence starts
    # at 0, so the receiver told the decoder one gap estimated from its clock.
    lost = chip.counters["frames_lost_unplugged"]
    assert lost >= 0.9 * 1.0 / FRAME_S                                # ~1 s unplugged
    assert document["decoder"]["gaps"] == 1
    missing_samples = document["decoder"]["missing_samples"]
    assert missing_samples == link["restart_gap_samples"]
    # At least what the chip skipped; at most that plus frames that died in the pty and arrival jitter.
    assert lost * SPF - JITTER_S * RATE <= missing_samples <= lost * SPF + (0.1 + JITTER_S) * RATE
    assert run.frames["missing"] == 0
    assert chip.counters["frames_sent"] - 0.1 / FRAME_S <= run.frames["received"] <= chip.counters["frames_sent"]
    resumed = check_recovery_after_replug(run)
    # Recovery soon after the replug: the link's reopen backoff (a 1 s outage: next try within
    # ~0.8 s), the re-start, then recovery_windows windows.
    assert run.times[resumed] - chip.replugged_s < 0.8 + 0.2 + (CONFIG.recovery_windows + 3) * STRIDE_S + JITTER_S


def test_self_powered_chip_unplug_and_replug(bench, monkeypatch):
    """A chip that keeps streaming across the unplug: its frames are held until its configuration
    was checked again, and every sequence number is accounted for."""
    run = replay(bench, monkeypatch, recording="long", disconnect_after_s=1.5,
                 chip_options={"reset_on_unplug": False})
    chip, document = run.chip, run.document
    link = document["chip_link"]
    assert link["disconnects"] == 1 and link["reconnects"] == 1
    assert link["chip_restarts"] == 1 and link["stream_restarts"] == 0   # START again: harmless
    lost = chip.counters["frames_lost_unplugged"]
    assert lost >= 0.9 * 1.0 / FRAME_S
    assert document["decoder"]["gaps"] == 1
    # Every sequence number is accounted for: received or reported missing (frames held while the
    # configuration was checked again are received by the parser and handed on as part of the gap).
    assert run.frames["received"] + run.frames["missing"] == chip.counters["frames_sent"] + lost
    held = link["frames_held_after_reconnect"]
    assert document["decoder"]["missing_samples"] == SPF * (run.frames["missing"] + held)
    assert lost <= run.frames["missing"] <= lost + 2.5 / FRAME_S
    check_recovery_after_replug(run)


def test_hand_port_vanishing(bench, monkeypatch):
    vanished = {}

    def close_the_hand(chip, hand):
        time.sleep(1.2)
        vanished["sent_before"] = len(hand.received())
        vanished["at"] = time.monotonic()
        hand.stop()                                   # the pty is closed: the driver's port is gone

    run = replay(bench, monkeypatch, during=close_the_hand)
    document = run.document
    writer = document["writer"]
    # The runtime logged it once, counted every failed write and kept running to the end.
    events = run.events("hand_error")
    assert len(events) == 1 and "hand.send failed" in events[0]["reason"]
    assert document["safety_events"]["by_kind"]["hand_error"] == 1     # one outage
    remaining_s = STREAM_S + OUTLAST_S - 1.2
    # Every command due while the port is gone is counted as not delivered (at least once per
    # period, one period of slack per second of load); the driver saw the one write that failed.
    assert writer["hand_errors"] >= 0.5 * remaining_s / WRITER_PERIOD_S
    assert document["hand"]["write_errors"] == 1
    # The port was looked for again with backoff (50 ms doubling to 1 s: ~6 tries in 2.2 s), never found.
    assert 4 <= writer["hand_reopen_failures"] <= 10 and writer["hand_reconnects"] == 0
    # Decoding went on: windows kept being decoded after the hand vanished, to the end of the stream.
    assert document["windows"]["decoded"] >= 0.9 * (STREAM_S - 0.1) / STRIDE_S - 10
    assert run.frames["missing"] == 0
    # The port never came back: nothing reached the hand afterwards (its own keep-alive
    # watchdog, 300 ms, is what makes it safe; docs/safety.md; a port that comes back: test_reconnect.py).
    assert len(run.received) == vanished["sent_before"] or len(run.received) <= vanished["sent_before"] + 3
    assert all(t <= vanished["at"] + 0.05 for t in run.times)


# --- decoder faults ------------------------------------------------------------------------

class BackendWrapper(object):
    """A backend that behaves like ``inner`` except for the windows ``fault(step_index)`` changes."""

    def __init__(self, inner, fault):
        self._inner = inner
        self._fault = fault
        self.steps = 0
        self.resets = 0
        self.fault_times = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def initial_state(self):
        self.resets += 1
        return self._inner.initial_state()

    def step(self, features, state):
        self.steps += 1
        outputs, state = self._inner.step(features, state)
        changed = self._fault(self.steps, outputs)
        if changed is not None:
            self.fault_times.append(time.monotonic())
            return changed, state
        return outputs, state


def test_decoder_stalling_for_200_ms(bench, monkeypatch):
    wrapped = {}

    def stall(step, outputs):
        if step == 50:
            wrapped["stalled_at"] = time.monotonic()
            time.sleep(0.2)
        return None

    def wrap(decoder):
        decoder.backend = wrapped["backend"] = BackendWrapper(decoder.backend, stall)

    run = replay(bench, monkeypatch, wrap=wrap)
    document = run.document
    # No decoded command for longer than the data timeout: a data timeout, counted from the data of
    # the last command before the stall (a stride or so before it).
    timeouts = run.events("data_timeout")
    assert len(timeouts) == 2                                         # the stall, then the end of the stream
    assert document["safety_events"]["by_kind"]["decoder_error"] == 0
    stalled_at = wrapped["stalled_at"]
    check_data_stop(run, stalled_at, earliest_s=stalled_at - STRIDE_S - 2 * FRAME_S)
    # Nothing was lost: the reader queued the stalled frames, the decoder caught up on the newest window.
    assert run.frames["missing"] == 0 and run.frames["dropped_queue_full"] == 0
    assert run.frames["queue_high_water"] >= 0.2 / FRAME_S - 2
    assert document["skips"] >= 0.2 / STRIDE_S - 3
    assert len(run.events("recovered")) == 1
    first_safe = run.safe(stalled_at)
    resumed = np.flatnonzero((run.times > run.times[first_safe]) & run.raw.any(axis=1))[0]
    assert not run.raw[first_safe:resumed].any()
    assert np.max(run.received[resumed].positions) <= SLEW_STEP + WIRE_EPS
    # After the stall the decoder is back to real time: the recovery came within a few strides.
    assert run.times[resumed] - (stalled_at + 0.2) < (CONFIG.recovery_windows + 3) * STRIDE_S + 2 * JITTER_S


def test_non_finite_features_from_the_dsp_reach_the_safe_posture(bench, monkeypatch):
    """A DSP that produces NaN (e.g. an unstable filter): the backend then outputs NaN too."""
    bad_windows = (60, 63)              # pushes of the stream whose windows get NaN features
    state = {"pushes": 0, "windows": 0, "first_bad_s": None}

    class NaNStream(object):
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def push(self, block):
            features, ends = self._inner.push(block)
            if len(ends):
                state["windows"] += len(ends)
                if bad_windows[0] <= state["windows"] < bad_windows[1]:
                    features = np.array(features, dtype=np.float64)
                    features[:, 0] = np.nan
                    if state["first_bad_s"] is None:
                        state["first_bad_s"] = time.monotonic()
            return features, ends

    class NaNPipeline(object):
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def stream(self):
            return NaNStream(self._inner.stream())

    def wrap(decoder):
        decoder.pipeline = NaNPipeline(decoder.pipeline)
        decoder.backend = state["backend"] = BackendWrapper(decoder.backend, lambda step, outputs: None)

    run = replay(bench, monkeypatch, wrap=wrap)
    document = run.document
    bad = document["decoder"]["non_finite_outputs"]
    # Every NaN window was refused (no skip is possible at 1 frame per push), counted, and reset the RNN.
    assert 1 <= bad <= bad_windows[1] - bad_windows[0]
    assert document["safety_events"]["by_kind"]["non_finite_output"] == bad
    assert state["backend"].resets == 1 + bad
    assert len(run.events("non_finite_output")) == 1                  # logged once per outage
    # A decoder fault wakes the writer at once: the safe posture within one period of the first NaN.
    first_bad = state["first_bad_s"]
    first_safe = run.safe(first_bad)
    assert run.times[first_safe] - first_bad <= WRITER_PERIOD_S + JITTER_S
    resumed = np.flatnonzero((run.times > run.times[first_safe]) & run.raw.any(axis=1))[0]
    assert not run.raw[first_safe:resumed].any()
    # recovery_windows good windows (4 strides of data at least) before the hand moves again, gently.
    assert run.times[resumed] - run.times[first_safe] >= (CONFIG.recovery_windows - 1) * STRIDE_S - 0.01
    assert np.max(run.received[resumed].positions) <= SLEW_STEP + WIRE_EPS
    assert len(run.events("recovered")) == 1
    assert run.events("non_finite_output")[0]["reason"].startswith("decoder output [nan")


def test_out_of_range_outputs_are_clamped_not_sent(bench, monkeypatch):
    """A finite but absurd output (+-1e6) is not a fault: the post-processor clamps it into 0..1."""
    def absurd(step, outputs):
        if 40 <= step < 80:
            return np.where(np.arange(len(outputs)) % 2 == 0, 1e6, -1e6).astype(outputs.dtype)
        return None

    def wrap(decoder):
        decoder.backend = BackendWrapper(decoder.backend, absurd)

    run = replay(bench, monkeypatch, wrap=wrap)
    only_the_end_of_stream_fault(run)
    # The hand saw the clamped extremes (fully closed / open fingers), never beyond them.
    fingers = run.raw[:, ::2]
    assert (run.raw[:, 0] == 65535).any() and (run.raw[:, 1] == 0).any()
    assert fingers.max() <= 65535
    check_data_stop(run, run.chip.last_frame_s)


def test_saturated_input_samples_keep_the_runtime_decoding(bench, monkeypatch):
    """0.5 s of every channel at the int16 rails (+-32767, i.e. +-6.4 mV at 0.195 uV per count).

    Counts times a finite scale are finite, so the DSP sees large but finite
    microvolts: the outputs must stay finite (no fault), every window is still
    decoded and the hand keeps getting valid commands.  Whether those commands
    make sense is not guaranteed (docs/safety.md, limits).
    """
    run = replay(bench, monkeypatch, recording="saturated")
    document = run.document
    only_the_end_of_stream_fault(run)
    assert document["decoder"]["decoder_errors"] == 0 and document["decoder"]["non_finite_outputs"] == 0
    assert run.frames["missing"] == 0 and run.frames["corrupt"] == 0
    assert document["windows"]["decoded"] + document["skips"] >= (STREAM_S - 0.1) / STRIDE_S - 2
    # Commands kept flowing through the saturated stretch (1.2-1.7 s of stream).
    start = run.chip.stream_started_s
    during = (run.times > start + 1.25) & (run.times < start + 1.65)
    assert np.count_nonzero(during) >= 0.4 / WRITER_PERIOD_S * 0.5
    check_data_stop(run, run.chip.last_frame_s)


# --- a chip reporting a non-finite scale ------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -0.195])
def test_a_chip_reporting_a_non_finite_scale_is_refused_before_the_hand_is_opened(bench, scale):
    """The only way a non-finite microvolt value could enter: the chip's reported scale."""
    source = ArraySource(np.zeros((4000, 4), dtype=np.int16), RATE, 0.195)
    source.scale_uv = scale
    chip = VirtualChip(source)
    port = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    decoder = load_decoder(bench["bundle"], "numpy")
    try:
        with pytest.raises(ConfigError, match="must be finite and positive"):
            run_on_chip(decoder, port, "neurohand:/dev/nonexistent-hand", CONFIG, install_signals=False)
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
    assert not chip.streaming and chip.counters["frames_sent"] == 0
