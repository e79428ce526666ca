"""Crashes of ``neurohand run``: kill -9 at random moments, SIGTERM/SIGINT (docs/safety.md).

A real subprocess ``neurohand run --record FILE`` decodes a virtual chip (a
thread here, streaming known int16 samples on a pseudo-terminal) into a
virtual hand (another pseudo-terminal here), so what was sent and what the
hand received are known exactly.

* kill -9: the recording still loads, holds exactly the samples the chip sent
  (a prefix of them), and lacks at most ~100 ms of what had reached the run
  (docs/runtime.md: 20 ms drain + 80 ms chunks).  Nothing can be sent to the
  hand after a kill -9: the hand's own keep-alive watchdog notices (the
  virtual hand counts one timeout), which is why a real hand must have one.
  The virtual hand's watchdog runs on a clock the test moves (``FakeClock``), so
  a loaded machine can neither fake a timeout during the run nor hide one after.
* SIGTERM / SIGINT: exit 0, the last frame the hand received is the safe
  posture (open), the recording is complete.
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.cli import main as cli
from neurohand.deploy.bundle import make_bundle
from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.recording.file_format import RecordingTruncatedWarning, open_recording
from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip
from neurohand.firmware_bridge.virtual.hand import VirtualHand

from timing import FakeClock, wait_until

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")
RATE = 2000.0
N_CHANNELS = 4
SPF = cp.DEFAULT_SAMPLES_PER_FRAME
SOURCE_S = 60.0
#: Most signal a kill -9 may lose (docs/runtime.md) ...
MAX_LOSS_S = 0.1
#: ... plus one frame and the reader -> decoder -> recorder hand-over on a loaded machine.
SLACK_S = 0.03
FRAME_BYTES = len(cp.encode_data_frame(0, 0, np.zeros((SPF, N_CHANNELS), dtype=np.int16)))




def hand_has_read_everything(hand):
    """The writer is gone: once the terminal holds nothing unread and a whole pass of the
    hand's thread followed, every command it was sent is in ``received()``."""
    return hand.unread_bytes() == 0 and hand.sync()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("crash") / "bundle")
    make_bundle(RUN_DIR, path)
    assert cli.main(["selftest", path, "--backend", "numpy"]) == 0
    return path


@pytest.fixture(scope="module")
def source_samples():
    """int16 (n, 4): a nerve-like noise the decoder can chew on, and distinct enough to compare."""
    rng = np.random.RandomState(12)
    return rng.randint(-2000, 2000, size=(int(SOURCE_S * RATE), N_CHANNELS)).astype(np.int16)


class Bench(object):
    """A streaming virtual chip (thread) and a virtual hand, both on pseudo-terminals."""

    def __init__(self, samples):
        self.chip = VirtualChip(ArraySource(samples, RATE, 0.195))
        self.chip_path = self.chip.open()
        self._stop = threading.Event()
        self._serving = threading.Thread(target=self.chip.serve, args=(self._stop,), daemon=True)
        self._serving.start()
        self.hand_clock = FakeClock()
        self.hand = VirtualHand("neurohand", clock=self.hand_clock).start()

    def samples_reached_the_run(self):
        """Samples the chip sent that had left its buffer and the pty (read by the run), approximately."""
        in_transit = (len(self.chip._out) + self.chip.unread_bytes()) // FRAME_BYTES
        return self.chip.counters["samples_sent"] - SPF * in_transit

    def close(self):
        self._stop.set()
        self._serving.join(5.0)
        self.chip.close()
        self.hand.stop()


@pytest.fixture
def bench(source_samples):
    bench = Bench(source_samples)
    try:
        yield bench
    finally:
        bench.close()


def start_run(bundle, bench, tmp_path, *extra):
    record = str(tmp_path / "run.nhr")
    stats = str(tmp_path / "stats.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "neurohand.deploy", "run", "--bundle", bundle, "--chip", bench.chip_path,
         "--hand", "neurohand:" + bench.hand.slave_path, "--backend", "numpy", "--record", record,
         "--stats-json", stats, "--status-interval", "0", "--quiet"] + list(extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if not bench.hand.wait_for(1, 30.0):
        process.kill()
        raise AssertionError("the run never sent a command: {}".format(process.communicate()[1]))
    return process, record, stats


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_moment_loses_at_most_100_ms(bundle, bench, source_samples, tmp_path, seed):
    moment_s = random.Random(seed).uniform(0.05, 1.5)      # after the first command reached the hand
    process, record, _ = start_run(bundle, bench, tmp_path)
    try:
        time.sleep(moment_s)
        reached = bench.samples_reached_the_run()
        sent = bench.chip.counters["samples_sent"]
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    with pytest.warns(RecordingTruncatedWarning, match="without an end chunk"):     # reported, still loads
        recording = open_recording(record)
    with recording:
        assert not recording.integrity["complete"]
        n = recording.n_samples
        # Exactly what the chip sent, in order, as far as it goes: nothing corrupted by the kill.
        assert 0 < n <= sent
        assert np.array_equal(recording.read_signals(), source_samples[:n])
        lost_s = (reached - n) / RATE
        assert lost_s <= MAX_LOSS_S + SLACK_S, (moment_s, lost_s)
        assert "command" in recording.label_streams and "decoded" in recording.label_streams
    # Nobody is sending to the hand any more: its own watchdog must notice (the only protection left).
    hand, limit = bench.hand, bench.hand.keepalive_timeout_s
    assert wait_until(lambda: hand_has_read_everything(hand))
    count = len(hand.received())
    assert hand.counters["timeouts"] == 0             # the hand's clock stood still during the run
    bench.hand_clock.advance(limit - 0.001)
    assert hand.sync()
    assert hand.counters["timeouts"] == 0             # not before the limit ...
    bench.hand_clock.advance(0.002)
    assert hand.sync()
    assert hand.counters["timeouts"] == 1             # ... but after it
    # And it stays silent: no late writer (a surviving child of the run, say) shows up.
    time.sleep(limit)
    assert hand_has_read_everything(hand)
    assert len(hand.received()) == count
    assert hand.counters["timeouts"] == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_leaves_the_hand_in_its_safe_posture(bundle, bench, source_samples, tmp_path, signum):
    process, record, stats = start_run(bundle, bench, tmp_path)
    try:
        time.sleep(random.Random(signum).uniform(0.3, 1.2))
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    with open(stats) as handle:
        document = json.load(handle)
    assert document["stop_reason"] == signal.Signals(signum).name
    assert bench.hand.wait_for(document["commands_sent"], 5.0)
    received = bench.hand.received()
    assert len(received) == document["commands_sent"]
    assert any(max(c.positions) > 0 for c in received)              # it had moved the hand
    assert all(p == 0 for p in received[-1].positions)               # the last word is the safe posture
    assert wait_until(lambda: hand_has_read_everything(bench.hand))  # the run is gone: all it wrote is in
    assert len(bench.hand.received()) == len(received)               # and nothing followed it
    with open_recording(record) as recording:
        assert recording.integrity["complete"]
        assert recording.n_samples == SPF * document["frames"]["received"]
        assert np.array_equal(recording.read_signals(), source_samples[:recording.n_samples])
        assert [e.kind for e in recording.events if e.kind.startswith("safety_")][-1] == "safety_shutdown"


def sigterm_is_caught(pid):
    """True once process ``pid`` has a handler for SIGTERM (the command's first act)."""
    try:
        with open("/proc/{}/status".format(pid)) as handle:
            for line in handle:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        return False
    return False


@pytest.mark.parametrize("when", ["handlers installed", "recording opened"])
def test_a_sigterm_during_start_up_ends_the_run_cleanly(bundle, bench, tmp_path, when):
    """Loading the bundle and opening the ports take a while: a SIGTERM then (a systemd stop
    right after a start) ends the command with a message, exit 0, and any recording complete."""
    record = str(tmp_path / "run.nhr")
    stats = str(tmp_path / "stats.json")
    process = subprocess.Popen(
        [sys.executable, "-m", "neurohand.deploy", "run", "--bundle", bundle, "--chip", bench.chip_path,
         "--hand", "neurohand:" + bench.hand.slave_path, "--backend", "numpy", "--record", record,
         "--stats-json", stats, "--status-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        if when == "handlers installed":
            assert wait_until(lambda: sigterm_is_caught(process.pid), 30.0)
        else:
            assert wait_until(lambda: os.path.exists(record), 30.0)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("neurohand run: stopped")]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0], err
    if os.path.exists(record):
        # Started: the run's own shutdown closed it, end chunk and all, and the hand's last word
        # (if it heard any) is the safe posture.
        with open_recording(record) as recording:
            assert recording.integrity["complete"]
        with open(stats) as handle:
            assert json.load(handle)["stop_reason"] == "SIGTERM"
        assert wait_until(lambda: hand_has_read_everything(bench.hand))
        received = bench.hand.received()
        assert not received or all(p == 0 for p in received[-1].positions)
    else:
        assert "during start-up" in stopped[0] and not os.path.exists(stats)
    if when == "recording opened":
        assert os.path.exists(record)
