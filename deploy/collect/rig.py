"""The bench rig of the collect step: a recording played at once by ``neurohand virtual-chip`` and
``neurohand virtual-glove`` (in processes of their own, started together) and collected with
``neurohand collect``'s own loop.  Shared by ``neurohand bench collect`` and the demo, so both
measure the same thing; the devices' schedules are the truth the alignment error is measured against
(docs/collect.md)."""
import json
import os
import subprocess
import sys
import time

import numpy as np

RATE, SPF, LABEL_RATE = 10000.0, 20, 100.0
START_DELAY_S = 4.0        # the devices start this long after they are launched: collect opens both first
# The session is started this long before the devices: collect opens both and sends START, then waits
# session.FIRST_DATA_TIMEOUT_S (3 s) for the first samples.  Started at once instead, devices that printed
# their terminals within a second left START more than 3 s before the first sample (docs/collect.md).
SESSION_LEAD_S = 1.0


def neurohand_command(*arguments):
    """The neurohand CLI in a fresh interpreter of this Python."""
    return [sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in arguments]


def _launch(command, what):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    path = process.stdout.readline().strip()
    if not path:
        process.kill()
        raise RuntimeError("{} printed no terminal: {}".format(what, process.stderr.read()[-2000:]))
    return process, path


def _stop(process):
    if process.poll() is None:
        process.terminate()
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    for line in reversed(stderr.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def collect_simulated(work, simulated, protocol, samples_per_frame=SPF, label_rate=LABEL_RATE):
    """Play the recording ``simulated`` through ``neurohand virtual-chip`` and ``virtual-glove`` (started
    together) and collect it into ``work``/collected.nh with ``protocol`` (a Protocol) and the virtual
    glove's calibration.  Returns (path, Outcome, the CollectSession with its alignment log, the
    virtual chip's counters).  RuntimeError when the collection did not complete.  (Also what a demo
    of the collect step can call.)"""
    from neurohand.deploy.collect.session import CollectSession, Settings
    from neurohand.firmware_bridge.virtual.glove import virtual_calibration

    start = time.monotonic() + START_DELAY_S
    chip, chip_path = _launch(neurohand_command("virtual-chip", simulated, "--start-at", repr(start),
                                                "--samples-per-frame", samples_per_frame), "virtual-chip")
    glove, glove_path = _launch(neurohand_command("virtual-glove", simulated, "--start-at", repr(start)),
                                "virtual-glove")
    out = os.path.join(work, "collected.nh")
    try:
        # Not before SESSION_LEAD_S ahead of the devices' start (where launching took longer, at once).
        wait_s = start - SESSION_LEAD_S - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        settings = Settings(chip_path, "virtual:{}:serial".format(glove_path), out, protocol,
                            label_rate=label_rate, calibration=virtual_calibration("serial").to_config())
        session = CollectSession(settings)
        session.alignment_log = []
        outcome = session.run()
    finally:
        chip_summary = _stop(chip)
        _stop(glove)
    if outcome.error is not None or outcome.stop_reason != "complete":
        raise RuntimeError("the collection ended early ({}): {}".format(outcome.stop_reason, outcome.error))
    return out, outcome, session, chip_summary


def alignment_error(session, collected_path, simulated, samples_per_frame=SPF, label_rate=LABEL_RATE):
    """Error (ms) of every glove sample's place on the chip's axis, against the devices' schedules.

    Returns (p50/p99/max/mean/n of the error, the simulated sample where the session starts, whether the
    collected signal equals the simulation sample for sample).  The rate is the simulation's own."""
    from neurohand.firmware_bridge.recording.file_format import open_recording
    with open_recording(collected_path) as rec, open_recording(simulated) as sim:
        rate = sim.signal_rate
        s0 = rec.metadata["collect"]["chip_sample_at_start"]
        head = rec.read_signals(0, 200)
        # The session's sample 0 is simulated sample `offset`: found in the data, not assumed.
        offset = None
        for frames_skipped in range(0, int(sim.n_samples / samples_per_frame)):
            candidate = frames_skipped * samples_per_frame
            if np.array_equal(sim.read_signals(candidate + s0, candidate + s0 + 200), head):
                offset = candidate
                break
        if offset is None:
            raise RuntimeError("the collected signal is not found in the simulation")
        identical = np.array_equal(rec.read_signals(), sim.read_signals(offset + s0, offset + s0 + rec.n_samples))
    log = np.array([(sequence, position) for _, sequence, _, position in session.alignment_log], dtype=np.float64)
    truth = log[:, 0] * rate / label_rate + samples_per_frame - offset       # session sample (see the module docstring)
    error_ms = (log[:, 1] - truth) / rate * 1000.0
    recorded = log[:, 1] >= s0
    error_ms = error_ms[recorded]
    absolute = np.abs(error_ms)
    return {"p50": round(float(np.percentile(absolute, 50)), 3), "p99": round(float(np.percentile(absolute, 99)), 3),
            "max": round(float(absolute.max()), 3), "mean": round(float(error_ms.mean()), 3),
            "n": int(len(error_ms))}, offset + s0, identical
