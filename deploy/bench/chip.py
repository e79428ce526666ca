"""``neurohand bench parser``: how fast ChipParser turns bytes into frames.

The stream is the default one (16 channels, 10 kHz, 20 samples per frame) fed
in 4 kB chunks, as a serial read would deliver it.  ``realtime_multiple`` is the
parsed byte rate divided by the default stream's byte rate (334 000 bytes/s);
the goal is at least 50 on one core of a Jetson Nano.
"""
import platform
import statistics
import time

import numpy as np

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipParser

CHUNK_BYTES = 4096


def make_stream(n_frames, seed=0):
    """Bytes of ``n_frames`` default-geometry data frames with random samples."""
    rng = np.random.RandomState(seed)
    spf, n_channels = cp.DEFAULT_SAMPLES_PER_FRAME, cp.DEFAULT_N_CHANNELS
    return b"".join(
        cp.encode_data_frame(k, k * spf * 100, rng.randint(-2000, 2000, (spf, n_channels)).astype(np.int16))
        for k in range(n_frames))


def parse_once(stream):
    parser = ChipParser()
    view = memoryview(stream)
    frames = 0
    start = time.perf_counter()
    for offset in range(0, len(stream), CHUNK_BYTES):
        frames += len(parser.feed(view[offset:offset + CHUNK_BYTES]))
    elapsed = time.perf_counter() - start
    return elapsed, frames, parser.counters


def run(quick):
    """Measure; returns a JSON-ready dict (see the module docstring)."""
    spf, n_channels, rate = cp.DEFAULT_SAMPLES_PER_FRAME, cp.DEFAULT_N_CHANNELS, cp.DEFAULT_SAMPLE_RATE_HZ
    frame_bytes = cp.frame_size(cp.data_body_size(n_channels, spf))
    stream_bytes_per_s = frame_bytes * rate / spf
    n_frames = 500 if quick else 10000          # 1 s or 20 s of the default stream
    repeats = 3 if quick else 9
    stream = make_stream(n_frames)
    multiples = []
    for _ in range(repeats):
        elapsed, frames, counters = parse_once(stream)
        if frames != n_frames or counters["frames_good"] != n_frames or counters["bytes_discarded"]:
            raise RuntimeError("parser lost frames in the benchmark: {}".format(dict(counters)))
        multiples.append(len(stream) / elapsed / stream_bytes_per_s)
    median = statistics.median(multiples)
    return {
        "realtime_multiple": round(median, 1),
        "realtime_multiple_min": round(min(multiples), 1),
        "realtime_multiple_max": round(max(multiples), 1),
        "spread_percent": round(100.0 * (max(multiples) - min(multiples)) / median, 1),
        "bytes_per_s": round(median * stream_bytes_per_s),
        "frames_per_s": round(median * rate / spf),
        "stream_bytes_per_s": stream_bytes_per_s,
        "frame_bytes": frame_bytes,
        "chunk_bytes": CHUNK_BYTES,
        "frames_per_repeat": n_frames,
        "repeats": repeats,
        "statistic": "median over repeats",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "quick": bool(quick),
        "goal_realtime_multiple": 50,
        "meets_goal": median >= 50,
    }
