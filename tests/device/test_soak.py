"""Soak: an hour of stream through both paths; memory, threads and descriptors must not grow.

Not in the default run: ``make soak`` (``pytest -m soak tests --run-soak``).
NEUROHAND_SOAK_S sets the seconds of stream per path (default 3600):

* pseudo-terminal path: a virtual chip looping a minute of int16 noise at
  SOAK_SPEED x its true rate (1 h in 3 min), decoded by ``neurohand run`` in
  its own process (as on the device) into a virtual hand; its memory, threads
  and descriptors are read from /proc/PID (the virtual hand keeps every
  command it receives, so this process's own memory grows by design);
* fast path: the runtime's ``run_fast_replay`` over a recording of that length
  (written here, 4 channels x 2 kHz like the fixture bundle).

Pass criteria: resident memory (VmRSS) grows by at most MAX_RSS_GROWTH_MB
from the end of the warm-up to the end of the stream; threads and open
descriptors stay constant while it runs (pty path) or are back to what they
were after it (fast path, in process: threading.enumerate, /proc/self/fd);
the runtime lost nothing it should not have.
The figures are printed (run with -s to see them).
"""
import os
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.bundle import make_bundle
from neurohand.deploy.runtime.config import RuntimeConfig

pytestmark = pytest.mark.soak

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")
SOAK_S = float(os.environ.get("NEUROHAND_SOAK_S", "3600"))
SOAK_SPEED = 20.0
RATE = 2000.0
N_CHANNELS = 4
MAX_RSS_GROWTH_MB = 5.0
#: The warm-up: the first 10 % of the stream, at least 60 s of it (buffers and caches filled).
WARMUP_FRACTION = 0.1


def rss_mb():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def thread_names():
    return sorted(t.name for t in threading.enumerate())


@pytest.fixture(scope="module")
def decoder_bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("soak") / "bundle")
    make_bundle(RUN_DIR, path)
    return path


def noise(seconds, seed):
    rng = np.random.RandomState(seed)
    return rng.randint(-2000, 2000, size=(int(seconds * RATE), N_CHANNELS)).astype(np.int16)


def warmup_s(total_s):
    return max(min(60.0, total_s / 2), WARMUP_FRACTION * total_s)


def process_figures(pid):
    """(VmRSS MB, threads, open descriptors) of process ``pid``, or None once it is gone."""
    try:
        with open("/proc/{}/status".format(pid)) as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 1024.0, int(fields["Threads"]),
                len(os.listdir("/proc/{}/fd".format(pid))))
    except (OSError, KeyError, ValueError):
        return None


def test_soak_pseudo_terminal_path(decoder_bundle, tmp_path):
    """``neurohand run`` as on the device (its own process, measured through /proc/PID)."""
    import json
    import subprocess
    import sys
    from neurohand.deploy.cli import main as cli
    from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip
    from neurohand.firmware_bridge.virtual.hand import VirtualHand

    assert cli.main(["selftest", decoder_bundle, "--backend", "numpy"]) == 0
    wall_s = SOAK_S / SOAK_SPEED
    chip = VirtualChip(ArraySource(noise(60.0, 1), RATE, 0.195), speed=SOAK_SPEED, loop=True)
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), name="soak-chip", daemon=True)
    serving.start()
    hand = VirtualHand("neurohand").start()
    stats = str(tmp_path / "stats.json")
    samples = []
    try:
        process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "run", "--bundle", decoder_bundle,
                                    "--chip", chip_path, "--hand", "neurohand:" + hand.slave_path, "--backend",
                                    "numpy", "--duration", str(wall_s), "--stats-json", stats,
                                    "--status-interval", "0", "--quiet"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        assert hand.wait_for(1, 60.0), "the run never drove the hand"
        started = time.monotonic()
        while process.poll() is None:
            figures = process_figures(process.pid)
            if figures is not None:
                samples.append((time.monotonic() - started,) + figures)
            time.sleep(1.0)
        _, err = process.communicate()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        stop.set()
        serving.join(5.0)
        chip.close()
        hand.stop()
    assert process.returncode == 0, err
    with open(stats) as handle:
        document = json.load(handle)
    # Steady state: from the end of the warm-up to 2 s before the duration ends (before the shutdown).
    steady = [s for s in samples if warmup_s(wall_s) <= s[0] <= wall_s - 2.0]
    assert len(steady) >= 2
    (_, rss_warm, threads_warm, fds_warm), (_, rss_end, threads_end, fds_end) = steady[0], steady[-1]
    growth = rss_end - rss_warm
    streamed_s = document["frames"]["received"] * 20 / RATE
    by_kind = document["safety_events"]["by_kind"]
    kinds = [e["kind"] for e in document["safety_events"]["events"]]
    print("\nsoak pty: {:.0f} s of stream in {:.0f} s; RSS {:.1f} MB after warm-up, {:.1f} MB at the end "
          "(growth {:+.2f} MB, max {:.1f}); threads {} -> {}; descriptors {} -> {}; frames {}; windows decoded {} "
          "skipped {}; commands {}; latency p50 {} p99 {} max {} us; safety events {}".format(
              streamed_s, document["duration_s"], rss_warm, rss_end, growth, max(s[1] for s in steady),
              threads_warm, threads_end, fds_warm, fds_end, document["frames"], document["windows"]["decoded"],
              document["skips"], document["commands_sent"], document["latency_us"]["p50"],
              document["latency_us"]["p99"], document["latency_us"]["max"], by_kind))
    assert growth <= MAX_RSS_GROWTH_MB
    assert threads_end == threads_warm and max(s[2] for s in steady) == threads_warm
    assert fds_end == fds_warm and max(s[3] for s in steady) == fds_warm
    # The stream went through: nothing lost on the link or in the queue.
    assert streamed_s >= 0.8 * SOAK_S
    assert document["frames"]["missing"] == 0 and document["frames"]["dropped_queue_full"] == 0
    assert document["thread_errors"] == [] and document["stop_reason"].startswith("duration")
    # At 20x on a loaded machine the decoder can fall more than the data timeout behind: such
    # timeouts are allowed (they are safe), but nothing else, and each one recovered.
    assert sum(by_kind.values()) == by_kind["data_timeout"]
    assert kinds.count("recovered") == kinds.count("data_timeout")


def test_soak_fast_path(decoder_bundle, tmp_path):
    from neurohand.deploy.runtime import run_fast_replay
    from neurohand.deploy.runtime.replay_source import recording_items
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording

    path = str(tmp_path / "long.nhr")
    names = ["ch{}".format(i) for i in range(N_CHANNELS)]
    written = time.perf_counter()
    with RecordingWriter(path, RATE, names, scale_uv=[0.195] * N_CHANNELS, flush_interval_s=10.0) as writer:
        block_s = 60.0
        for index in range(int(np.ceil(SOAK_S / block_s))):
            writer.append_signals(noise(min(block_s, SOAK_S - index * block_s), 100 + index))
    written = time.perf_counter() - written
    threads_before, fds_before = thread_names(), open_fds()
    decoder = load_decoder(decoder_bundle, "numpy")
    marks = {}

    def items(recording):
        for event, t in recording_items(recording, int(0.5 * RATE)):
            if "warm" not in marks and t >= warmup_s(SOAK_S):
                marks["warm"] = rss_mb()
            yield event, t
        marks["end"] = rss_mb()

    started = time.perf_counter()
    with open_recording(path) as recording:
        document = run_fast_replay(decoder.pipeline, decoder.backend, items(recording), recording.scale_uv,
                               names, RuntimeConfig())
    elapsed = time.perf_counter() - started
    decoder.close()
    growth = marks["end"] - marks["warm"]
    print("\nsoak fast: {:.0f} s of stream ({:.0f} s to write) decoded in {:.0f} s ({:.0f}x); RSS {:.1f} MB after "
          "warm-up, {:.1f} MB at the end (growth {:+.2f} MB); windows {}".format(
              SOAK_S, written, elapsed, SOAK_S / elapsed, marks["warm"], marks["end"], growth,
              document["windows"]["decoded"]))
    assert growth <= MAX_RSS_GROWTH_MB
    assert thread_names() == threads_before
    assert open_fds() == fds_before
    assert document["windows"]["decoded"] == pytest.approx((SOAK_S - 0.1) / 0.02 + 1, abs=2)
    assert document["safety_events"]["count"] == 0
