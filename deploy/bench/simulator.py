"""Speed of ``neurohand simulate`` on this machine (a ``neurohand bench`` target).

``run(quick) -> dict``: wall-clock seconds to generate, and to generate and
write, a 16-channel 10 kHz recording (60 s, or 5 s when ``quick``), realistic
preset at the top level and the easy preset under ``easy``.
"""
import os
import shutil
import tempfile
import time


def run(quick):
    result = _run(quick, "realistic")
    result["easy"] = _run(quick, "easy")
    return result


def _run(quick, difficulty):
    from neurohand.firmware_bridge.virtual.simulator import NerveSimulator, SimulatorConfig, write_recording

    seconds = 5.0 if quick else 60.0
    config = SimulatorConfig(seconds=seconds, n_channels=16, rate=10000.0, seed=0, difficulty=difficulty)
    begin = time.perf_counter()
    sim = NerveSimulator.from_config(config)
    for _ in sim.iter_blocks(10000):
        pass
    generate_s = time.perf_counter() - begin

    folder = tempfile.mkdtemp(prefix="neurohand-bench-")
    try:
        begin = time.perf_counter()
        write_recording(os.path.join(folder, "bench.nh"), config)
        write_s = time.perf_counter() - begin
    finally:
        shutil.rmtree(folder)
    return {
        "recording_s": seconds, "channels": config.n_channels, "rate_hz": config.rate, "difficulty": difficulty,
        "generate_s": round(generate_s, 3), "generate_and_write_s": round(write_s, 3),
        "realtime_factor": round(seconds / max(write_s, 1e-9), 1),
    }
