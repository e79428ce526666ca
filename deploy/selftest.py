"""On-device self-test: the golden vectors through the chosen backend.

The bundle carries feature sequences and the numpy backend's outputs for them.
Running them through the backend that will drive the hand (TensorRT on the
Jetson) proves that backend on this very device, instead of trusting code that
no CI machine can run.  A passing result is recorded under BUNDLE/selftest/
for this device and this bundle content; ``neurohand run`` refuses to start
without one.
"""
import os
import platform
import threading
import time

import numpy as np

from neurohand.firmware_bridge.shared.atomic import write_json_atomic
from neurohand.firmware_bridge.shared.checks import load_json_file
from neurohand.firmware_bridge.shared.errors import BundleError

# Tolerances on the max absolute output difference against the reference.
TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 1e-2


def device_id():
    """A stable name for this machine: systemd's machine-id, else the host name."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read().strip()
        except (OSError, ValueError):   # ValueError: not UTF-8 (never a real machine-id)
            continue
        if value:
            return value
    return platform.node() or "unknown-device"


def _percentile_us(seconds, q):
    return float(np.percentile(np.asarray(seconds) * 1e6, q)) if seconds else float("nan")


def on_own_thread(function, name):
    """``function()`` on a new thread named ``name``; its result, or its exception raised here."""
    outcome = {}

    def body():
        try:
            outcome["result"] = function()
        except BaseException as exc:   # raised again in the caller
            outcome["error"] = exc
    # Daemon: a Ctrl-C in the caller's join must not leave the process waiting for the steps.
    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join()
    error = outcome.pop("error", None)
    if error is not None:
        try:
            raise error
        finally:
            del error   # no reference cycle through this frame (it would hold GPU objects in the traceback)
    return outcome["result"]


def _worse(worst, got, expected):
    """The larger of ``worst`` and the max abs difference of ``got`` and ``expected`` (NaN: inf)."""
    error = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - expected)))
    if error <= worst:
        return worst
    return error if error == error else float("inf")


def run_selftest(bundle, backend, fp16=False):
    """Run the golden vectors through ``backend``; return a JSON-able report.

    The steps run on a thread of their own, as ``neurohand run`` steps the
    backend on its decoder thread, not on the thread that created it: a
    backend that only works where it was created (a CUDA context current on
    one thread only) fails here rather than in the run.  An exception on that
    thread is raised here.
    """
    features, expected = bundle.golden_vectors()
    expected_states = bundle.golden_states()
    if features.shape[2] != backend.n_features or expected.shape[2] != backend.n_outputs:
        raise BundleError("backend {} takes {} features and gives {} outputs, but the golden vectors have {} and {}".format(
            backend.name, backend.n_features, backend.n_outputs, features.shape[2], expected.shape[2]))
    tolerance = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32

    def steps():
        worst = worst_state = 0.0
        step_seconds = []
        for sequence in range(features.shape[0]):
            state = backend.initial_state()
            for step in range(features.shape[1]):
                started = time.perf_counter()
                outputs, state = backend.step(features[sequence, step], state)
                step_seconds.append(time.perf_counter() - started)
                worst = _worse(worst, outputs, expected[sequence, step])
            if expected_states is not None:
                # The recurrent state too: a reduced-precision engine can drift there before the outputs show it.
                got = np.stack([np.asarray(a, dtype=np.float64) for a in backend.state_arrays(state)])
                if got.shape != expected_states[sequence].shape:
                    raise BundleError("backend {} keeps a state of shape {}, the golden states have {}".format(
                        backend.name, got.shape, expected_states[sequence].shape))
                worst_state = _worse(worst_state, got, expected_states[sequence])
        return worst, worst_state, step_seconds

    worst_output, worst_state, step_seconds = on_own_thread(steps, "neurohand-selftest")
    worst = max(worst_output, worst_state)
    return {
        "passed": bool(worst <= tolerance),
        "backend": backend.name,
        "fp16": bool(fp16),
        "max_abs_error": worst,
        "max_abs_error_outputs": worst_output,
        "max_abs_error_state": worst_state if expected_states is not None else None,
        "states_checked": expected_states is not None,
        "tolerance": tolerance,
        "steps": int(features.shape[0] * features.shape[1]),
        "step_us": {"p50": _percentile_us(step_seconds, 50), "p99": _percentile_us(step_seconds, 99),
                    "max": _percentile_us(step_seconds, 100)},
        "device": device_id(),
        "bundle_digest": bundle.digest,
        # A rebuilt engine is new, untested code on the GPU: the record names the one tested.
        "engine_sha256": bundle.engine_digest() if backend.name == "tensorrt" else None,
        "unix_time": time.time(),
    }


def _record_path(bundle):
    return os.path.join(bundle.selftest_dir, device_id() + ".json")


def record_result(bundle, report):
    """Store the report for this device (atomically: a crash leaves the old one)."""
    os.makedirs(bundle.selftest_dir, exist_ok=True)
    path = _record_path(bundle)
    write_json_atomic(path, report)
    return path


def require_passed_selftest(bundle, backend_name):
    """Raise BundleError unless this device passed the self-test on this bundle and backend."""
    path = _record_path(bundle)
    hint = "run 'neurohand selftest {} --backend {}' on this device first".format(bundle.path, backend_name)
    if not os.path.isfile(path):
        raise BundleError("bundle {!r} has not been self-tested on this device; {}".format(bundle.path, hint))
    try:
        report = load_json_file(path, "self-test record", error=BundleError)
    except BundleError as exc:
        raise BundleError("{}; {}".format(exc, hint)) from exc
    if report.get("bundle_digest") != bundle.digest:
        raise BundleError("self-test record {!r} is for other bundle content; {}".format(path, hint))
    if report.get("backend") != backend_name:
        raise BundleError("the self-test on this device used backend {!r}, not {!r}; {}".format(
            report.get("backend"), backend_name, hint))
    if backend_name == "tensorrt" and report.get("engine_sha256") != bundle.engine_digest():
        raise BundleError("the TensorRT engine of bundle {!r} was rebuilt after its self-test; {}".format(
            bundle.path, hint))
    if not report.get("passed"):
        raise BundleError("the self-test of bundle {!r} FAILED on this device (max error {} > {}); "
                          "the decoder must not drive a hand".format(
                              bundle.path, report.get("max_abs_error"), report.get("tolerance")))
    return report
