"""Soak: an hour of stream through both paths; memory, threads and descriptors must not grow.

Not in the default run: ``make soak`` (``pytest -m soak tests --run-soak``).
NEUROHAND_SOAK_S sets the seconds of stream per path (default 3600):

* pseudo-terminal path: a virtual chip looping a minute of int16 noise at
  SOAK_SPEED x its true rate (1 h in 3 min), decoded by exactly ``neurohand
  run``'s loop (``session.run_on_chip``) into a virtual hand;
* fast path: the runtime's ``replay_fast`` over a recording of that length
  (written here, 4 channels x 2 kHz like the fixture bundle).

Pass criteria: resident memory (VmRSS, /proc/self/status) grows by at most
MAX_RSS_GROWTH_MB from the end of the warm-up to the end of the stream; the
threads (threading.enumerate) and open descriptors (/proc/self/fd) after the
run equal those before it; the runtime lost nothing it should not have.
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


def test_soak_pseudo_terminal_path(decoder_bundle):
    from neurohand.deploy.session import load_decoder, run_on_chip
    from neurohand.firmware_bridge.virtual_chip import ArraySource, VirtualChip
    from neurohand.firmware_bridge.virtual_hand import VirtualHand

    wall_s = SOAK_S / SOAK_SPEED
    threads_before, fds_before = thread_names(), open_fds()
    chip = VirtualChip(ArraySource(noise(60.0, 1), RATE, 0.195), speed=SOAK_SPEED, loop=True)
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), name="soak-chip", daemon=True)
    serving.start()
    hand = VirtualHand("neurohand").start()
    samples = []
    sampling = threading.Event()

    def sample_rss():
        started = time.monotonic()
        while not sampling.wait(1.0):
            samples.append((time.monotonic() - started, rss_mb()))

    sampler = threading.Thread(target=sample_rss, name="soak-rss", daemon=True)
    sampler.start()
    try:
        document = run_on_chip(load_decoder(decoder_bundle, "numpy"), chip_path, "neurohand:" + hand.slave_path,
                               RuntimeConfig(status_interval_s=0), duration_s=wall_s, quiet=True,
                               install_signals=False)
    finally:
        sampling.set()
        sampler.join(5.0)
        stop.set()
        serving.join(5.0)
        chip.close()
        hand.stop()
    hand_frames = len(hand.received())
    del hand, chip
    warm = [rss for t, rss in samples if t >= warmup_s(wall_s)]
    growth = warm[-1] - warm[0]
    streamed_s = document["frames"]["received"] * 20 / RATE
    print("\nsoak pty: {:.0f} s of stream in {:.0f} s; RSS {:.1f} MB after warm-up, {:.1f} MB at the end "
          "(growth {:+.2f} MB, max {:.1f}); frames {}; windows decoded {} skipped {}; commands {}; "
          "latency p50 {} p99 {} max {} us; safety events {}".format(
              streamed_s, document["duration_s"], warm[0], warm[-1], growth, max(r for _, r in samples),
              document["frames"], document["windows"]["decoded"], document["skips"], document["commands_sent"],
              document["latency_us"]["p50"], document["latency_us"]["p99"], document["latency_us"]["max"],
              document["safety_events"]["by_kind"]))
    assert growth <= MAX_RSS_GROWTH_MB
    assert thread_names() == threads_before
    assert open_fds() == fds_before
    # The stream went through: nothing missing, no fault, the hand got every command.
    assert streamed_s >= 0.8 * SOAK_S
    assert document["frames"]["missing"] == 0 and document["frames"]["dropped_queue_full"] == 0
    assert document["safety_events"]["count"] == 0 and document["thread_errors"] == []
    assert hand_frames == document["commands_sent"]


def test_soak_fast_path(decoder_bundle, tmp_path):
    from neurohand.deploy.runtime import replay_fast
    from neurohand.deploy.runtime.replay import recording_items
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.recording import RecordingWriter, open_recording

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
        document = replay_fast(decoder.pipeline, decoder.backend, items(recording), recording.scale_uv,
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
