"""Links that come back: the hand's port reopened with backoff, the chip re-started after a reconnect.

The realtime tests run exactly the loop of ``neurohand run`` (``deploy.session.run_on_chip``) on
real pseudo-terminals, with the bundle and recordings of test_faults_realtime.py; the writer's
backoff and its "safe posture first, then the recovery rule" are proved on a virtual clock.
(A chip that resets on unplug and streams again only after START: test_faults_realtime.py
``test_chip_unplug_and_replug``.)
"""
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.runtime.safety import SafetySupervisor
from neurohand.deploy.runtime.stats import RuntimeStats
from neurohand.deploy.runtime.writer import HandWriterStage
from neurohand.deploy.runtime.decode import DecodedCommand
from neurohand.deploy.session import load_decoder, run_on_chip
from neurohand.firmware_bridge.chip.parser import ChipParser, SampleFrame
from neurohand.firmware_bridge.shared.errors import LinkError
from neurohand.firmware_bridge.hands.base import HandDriver
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.link import SerialLink
from neurohand.firmware_bridge.virtual.chip import ArraySource, RecordingSource, VirtualChip
from neurohand.firmware_bridge.virtual.hand import VirtualHand

from test_faults_realtime import CONFIG, JITTER_S, SLEW_STEP, STRIDE_S, WIRE_EPS, bench  # noqa: F401 (fixture)

N_FINGERS = 5


# --- the writer on a virtual clock ---------------------------------------------------------------

class VanishingHand(HandDriver):
    """A hand whose port is gone while ``present`` is False (writes and reopen raise LinkError)."""

    def __init__(self):
        super(VanishingHand, self).__init__(N_FINGERS)
        self.present = True
        self.sent = []          # (time, positions) written
        self.reopen_times = []
        self.now = 0.0

    def _write_positions(self, positions):
        if not self.present:
            self.counters["write_errors"] += 1
            raise LinkError("hand port 'test' vanished")
        self.sent.append((self.now, positions.copy()))

    def reopen(self):
        self.reopen_times.append(self.now)
        if not self.present:
            raise LinkError("cannot open hand port 'test': no such file")
        return self


def command(value, t):
    return DecodedCommand(0, t, t, np.full(N_FINGERS, value), np.full(N_FINGERS, value))


def test_writer_reopens_a_vanished_hand_with_backoff_then_sends_the_safe_posture_first():
    hand = VanishingHand()
    supervisor = SafetySupervisor("open", 0.1, 3, N_FINGERS, 0.0)
    writer = HandWriterStage(hand, supervisor, RuntimeStats(), lambda: hand.now, N_FINGERS,
                             measure_latency=False)
    period = 0.02

    def step(t, value=None):
        hand.now = t
        supervisor.on_valid_data(t, 0)          # fresh data throughout: only the hand fails
        if value is not None:
            supervisor.on_good_window(t)
        return writer.step(None if value is None else command(value, t), t)

    t = 0.0
    for _ in range(5):                           # ready after 3 good windows, then following
        step(t, 0.5)
        t += period
    assert np.allclose(hand.sent[-1][1], 0.5)
    hand.present = False
    vanished_s = t
    while t < vanished_s + 3.0:                  # 3 s outage; the decoder goes on
        assert step(t, 0.6) is None
        t += period
    # Reopen tries 50 ms after the failure, then waits doubling to 1 s (on the writer's 20 ms grid).
    waits = np.diff([vanished_s] + hand.reopen_times)
    expected = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert len(waits) == len(expected) and np.all(waits >= np.array(expected) - 1e-9)
    assert np.all(waits <= np.array(expected) + period + 1e-9), waits
    assert hand.counters["write_errors"] == 1            # nothing is written while the port is gone
    assert writer.counters["hand_reopen_failures"] == len(expected) and writer.counters["hand_reconnects"] == 0
    assert writer.counters["hand_errors"] == int(round(3.0 / period))
    events = [e["kind"] for e in supervisor.events]
    assert events.count("hand_error") == 1               # logged once per outage
    hand.present = True
    sent_before = len(hand.sent)
    back_s = t
    while t < back_s + 1.2:
        step(t, 0.6)
        t += period
    after = hand.sent[sent_before:]
    assert after[0][0] - back_s <= 1.0 + period + 1e-9   # found within the longest backoff
    assert writer.counters["hand_reconnects"] == 1 and "hand_reconnected" in [e["kind"] for e in supervisor.events]
    # The safe posture first, then decoded commands only after recovery_windows good windows.
    assert not after[0][1].any()
    first_command = next(i for i, (_, p) in enumerate(after) if p.any())
    assert first_command == 3                            # 3 good windows: the 3rd step goes out again
    assert not np.array([p for _, p in after[:first_command]]).any()
    assert [e["kind"] for e in supervisor.events][-1] == "recovered"
    # A second outage is logged again, and the backoff starts over from 50 ms.
    hand.present = False
    hand.reopen_times = []
    second_s = t
    for _ in range(10):
        step(t, 0.6)
        t += period
    assert [e["kind"] for e in supervisor.events].count("hand_error") == 2
    assert hand.reopen_times[0] - second_s <= 0.05 + period + 1e-9


def test_a_driver_refusal_is_not_a_vanished_port():
    """HandError (a refused value) is counted and logged but never triggers a reopen."""
    hand = VanishingHand()
    supervisor = SafetySupervisor("open", 0.1, 1, N_FINGERS, 0.0)
    writer = HandWriterStage(hand, supervisor, RuntimeStats(), lambda: 0.0, N_FINGERS, measure_latency=False)
    hand.n_outputs = N_FINGERS + 1                       # every send now has the wrong shape: refused
    for i in range(5):
        writer.step(None, 0.02 * i)
    assert writer.counters["hand_errors"] == 5 and hand.counters["refused"] == 5
    assert hand.reopen_times == [] and writer.counters["hand_reopen_failures"] == 0


# --- the virtual chip that resets on unplug ----------------------------------------------------

class Collector(object):
    def __init__(self):
        self.parser = ChipParser()
        self.frames = []
        self.opens = 0
        self.on_reply = None

    def connection_made(self, link):
        self.opens += 1

    def data_received(self, data):
        for event in self.parser.feed(data):
            if isinstance(event, SampleFrame):
                self.frames.append(event)
            elif self.on_reply is not None:
                self.on_reply(event)

    def connection_lost(self, exc):
        self.parser.flush()


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("autostart", [False, True])
def test_the_virtual_chip_waits_for_start_after_a_replug_unless_autostart(tmp_path, autostart):
    from neurohand.firmware_bridge.chip.protocol import ChipCommandChannel
    # 4 s at 2 kHz; every sample holds its own row index, so a frame tells where in the signal it is.
    samples = np.repeat(np.arange(8000, dtype=np.int16)[:, None], 4, axis=1)
    chip = VirtualChip(ArraySource(samples, 2000.0), disconnect_after_s=0.3, reconnect_pause_s=0.2,
                       link_path=str(tmp_path / "chip"), autostart=autostart)
    chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    host = Collector()
    link = SerialLink(str(tmp_path / "chip"), host, backoff_initial_s=0.02, backoff_max_s=0.05).open()
    try:
        channel = ChipCommandChannel(link.write)
        host.on_reply = channel.handle_reply
        channel.start_streaming()
        assert wait_until(lambda: link.counters["reconnects"] == 1)
        time.sleep(0.3)
        starts = host.parser.counters
        if autostart:
            # Streaming again without a START; its first frames may have been sent before the host
            # reopened the port (opening flushes the input), so the restart shows as a stream start
            # or as a sequence going backwards.
            count = len(host.frames)
            assert wait_until(lambda: len(host.frames) > count + 10)
            sequences = [f.sequence for f in host.frames]
            restarts = [i for i in range(1, len(sequences))
                        if host.frames[i].stream_start or sequences[i] < sequences[i - 1]]
            assert len(restarts) == 1 and starts["gaps"] == 0
            assert min(f.sequence for f in host.frames[count:]) < 0.5 * 2000 / 20
        else:
            assert starts["stream_starts"] == 1 and not channel.get_config().streaming
            count = len(host.frames)
            assert count < 0.4 * 2000 / 20                    # nothing since the unplug
            channel.start_streaming()
            assert wait_until(lambda: len(host.frames) > count + 10)
            first = host.frames[count]
            assert first.stream_start and first.sequence == 0 and first.device_time_us == 0
            assert starts["stream_starts"] == 2 and starts["sequence_restarts"] == 0
            # The signal went on while the chip was off: the new stream carries later samples.
            # (at least every frame received and skipped before it; more if frames died in the pty)
            skipped_to = 20 * (count + chip.counters["frames_lost_unplugged"])
            assert skipped_to <= first.samples[0, 0] <= skipped_to + 20 * 10
        assert chip.counters["frames_lost_unplugged"] >= 0.9 * 0.2 * 2000 / 20
    finally:
        link.close()
        stop.set()
        serving.join(5.0)
        chip.close()


# --- through the real loop ---------------------------------------------------------------------

def run_with(bench, chip, during, duration_s):
    """run_on_chip on ``chip`` (a VirtualChip, opened here) into a virtual neurohand-protocol hand
    behind a symlink; ``during(chip, hand)`` runs in a thread once the chip streams."""
    folder = tempfile.mkdtemp(prefix="neurohand-reconnect-")
    hand = VirtualHand("neurohand", link_path=os.path.join(folder, "hand")).start()
    stop = threading.Event()
    chip.link_path = os.path.join(folder, "chip")
    chip.open()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()

    def act():
        wait_until(lambda: chip.streaming, 30.0)
        during(chip, hand)
    helper = threading.Thread(target=act, daemon=True)
    helper.start()
    decoder = load_decoder(bench["bundle"], "numpy")
    try:
        document = run_on_chip(decoder, chip.link_path, "neurohand:" + hand.link_path, CONFIG,
                               duration_s=duration_s, quiet=True, install_signals=False)
        hand.wait_for(document["commands_sent"], 2.0)
    finally:
        helper.join(10.0)
        stop.set()
        serving.join(5.0)
        chip.close()
        hand.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return document, hand


def test_the_hand_port_comes_back_safe_posture_first_then_the_decoder(bench):
    moments = {}

    def unplug_then_replug(chip, hand):
        time.sleep(1.2)
        moments["unplug"] = time.monotonic()
        hand.unplug()
        time.sleep(0.5)
        moments["replug"] = time.monotonic()
        hand.replug()

    with open_recording(bench["short"]) as recording:
        chip = VirtualChip(RecordingSource(recording))
        document, hand = run_with(bench, chip, unplug_then_replug, 2.8)
    writer = document["writer"]
    events = [e["kind"] for e in document["safety_events"]["events"]]
    assert events.count("hand_error") == 1 and events.count("hand_reconnected") == 1
    assert writer["hand_reconnects"] == 1 and writer["hand_reopen_failures"] >= 2
    assert document["thread_errors"] == [] and document["shutdown_problems"] == []
    received = hand.received()
    times = np.array([c.t_monotonic for c in received])
    raw = np.array([c.raw for c in received])
    back = np.flatnonzero(times > moments["replug"])
    assert len(back), "nothing reached the hand after its port came back"
    first = back[0]
    # Found again within the writer's backoff (0.5 s outage: next try within ~0.4 s of the replug).
    assert times[first] - moments["replug"] <= 0.4 + 0.02 + JITTER_S
    # The safe posture first, held until recovery_windows good windows, then at most one slew step.
    assert not raw[first].any()
    moving = first + np.flatnonzero(raw[first:].any(axis=1))
    assert len(moving), "the hand never followed the decoder again"
    resumed = moving[0]
    assert not raw[first:resumed].any()
    assert times[resumed] - times[first] >= (CONFIG.recovery_windows - 1) * STRIDE_S - JITTER_S
    assert np.max(received[resumed].positions) <= SLEW_STEP + WIRE_EPS
    assert len({tuple(r) for r in raw[resumed:]}) > 10          # following the decoder
    # No command of the old port's writer thread leaked: nothing was received while unplugged.
    assert not np.any((times > moments["unplug"] + 0.05) & (times < moments["replug"]))
    assert hand.counters["bad_checksums"] == 0 and hand.counters["framing_errors"] == 0
    assert document["hand"]["refused"] == 0 and writer["invalid_blocked"] == 0


class ReconfiguredChip(VirtualChip):
    """Comes back from its replug with another scale (someone reflashed it): must never be decoded."""

    def open(self):
        if self.counters["disconnects"]:
            self.source.scale_uv = 2.0 * self.source.scale_uv
        return VirtualChip.open(self)


def test_a_chip_that_comes_back_configured_differently_is_not_decoded(bench):
    with open_recording(bench["short"]) as recording:
        chip = ReconfiguredChip(RecordingSource(recording), disconnect_after_s=1.2, reconnect_pause_s=0.3,
                                reset_on_unplug=False)
        document, hand = run_with(bench, chip, lambda chip, hand: None, 2.6)
    link = document["chip_link"]
    assert link["reconnects"] == 1 and link["chip_config_mismatches"] == 1 and link["chip_restarts"] == 0
    events = document["safety_events"]["events"]
    mismatch = [e for e in events if e["kind"] == "chip_config"]
    assert len(mismatch) == 1 and "scale" in mismatch[0]["reason"] and "after a reconnect" in mismatch[0]["reason"]
    # The chip kept streaming, but nothing of it reached the decoder: held, then the run ended.
    assert link["frames_held_after_reconnect"] > 0.5 / 0.01
    assert "recovered" not in [e["kind"] for e in events]
    received = hand.received()
    times = np.array([c.t_monotonic for c in received])
    raw = np.array([c.raw for c in received])
    # From the first safe frame after the unplug to the end, the hand is held in its safe posture.
    moving = np.flatnonzero(raw.any(axis=1))
    assert len(moving) > 10                                           # it did follow before the unplug
    last_moving = times[moving[-1]]
    assert times[-1] - last_moving > 0.9                              # and never again after it


# --- the receiver across a chip reset ----------------------------------------------------------

@pytest.mark.parametrize("flushed", [False, True])
def test_a_new_stream_after_a_reset_reaches_the_decoder_after_a_gap_estimated_from_the_clock(flushed):
    """1 s without frames, then a new stream: the decoder is told ~1 s of missing samples.  With
    ``flushed`` its flagged first frames were lost (flushed on reopen): the sequence goes backwards."""
    from neurohand.deploy.runtime.queues import BatchQueue
    from neurohand.firmware_bridge.chip.receiver import ChipReceiver
    from neurohand.firmware_bridge.chip import protocol as cp
    from neurohand.firmware_bridge.chip.parser import SampleGap
    clock = {"now": 0.0}
    queue = BatchQueue(100)
    receiver = ChipReceiver(ChipParser(), queue, RuntimeStats(), lambda: clock["now"], sample_rate=1000.0)
    block = np.zeros((10, 2), np.int16)
    for sequence in range(20):                          # 10 ms frames, 0.2 s
        clock["now"] = 0.01 * (sequence + 1)
        receiver.data_received(cp.encode_data_frame(sequence, 0, block, cp.FLAG_STREAM_START if sequence == 0 else 0))
    receiver.connection_lost(OSError("unplugged"))
    receiver.connection_made(None)                      # no on_reconnect: frames are not held
    first = 3 if flushed else 0
    clock["now"] = 0.2 + 1.0 + 0.01                     # the new stream's first frame ends 1 s later
    receiver.data_received(cp.encode_data_frame(first, 0, block, 0 if flushed else cp.FLAG_STREAM_START))
    items = []
    queue.take_all(items, 0.0)
    gaps = [event for event, _ in items if isinstance(event, SampleGap)]
    assert len(gaps) == 1 and gaps[0].missing_samples == 1000
    assert isinstance(items[-1][0], SampleFrame) and isinstance(items[-2][0], SampleGap)
    assert receiver.counters["stream_restarts"] == 1 and receiver.counters["restart_gap_samples"] == 1000


def test_frames_after_a_reconnect_are_held_until_released_and_reach_the_decoder_as_a_gap():
    from neurohand.deploy.runtime.queues import BatchQueue
    from neurohand.firmware_bridge.chip.receiver import ChipReceiver
    from neurohand.firmware_bridge.chip import protocol as cp
    from neurohand.firmware_bridge.chip.parser import SampleGap
    queue = BatchQueue(100)
    receiver = ChipReceiver(ChipParser(), queue, RuntimeStats(), time.monotonic, sample_rate=1000.0)
    asked = []
    receiver.on_reconnect = lambda: asked.append(True)
    block = np.zeros((10, 2), np.int16)
    receiver.connection_made(None)                      # the first open: nothing to re-check
    receiver.data_received(cp.encode_data_frame(0, 0, block, cp.FLAG_STREAM_START))
    receiver.connection_lost(OSError("unplugged"))
    receiver.connection_made(None)
    assert asked == [True]
    for sequence in range(1, 4):                        # a self-powered chip streams on: held
        receiver.data_received(cp.encode_data_frame(sequence, 0, block))
    receiver.release_frames()
    receiver.data_received(cp.encode_data_frame(4, 0, block))
    items = []
    queue.take_all(items, 0.0)
    kinds = [type(event) for event, _ in items]
    assert kinds == [SampleFrame, SampleGap, SampleFrame]
    assert items[1][0].missing_samples == 30 and items[2][0].sequence == 4
    assert receiver.counters["frames_held_after_reconnect"] == 3
