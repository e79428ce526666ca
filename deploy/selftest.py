"""On-device self-test: the golden vectors through the chosen backend.

The bundle carries feature sequences and the numpy backend's outputs for them.
Running them through the backend that will drive the hand (TensorRT on the
Jetson) proves that backend on this very device, instead of trusting code that
no CI machine can run.  A passing result is recorded under BUNDLE/selftest/
for this device, this bundle content and this backend; ``neurohand run``
refuses to start without one.

Records: ``BUNDLE/selftest/<device-id>.<backend>.json``, one per backend, so
self-testing a second backend does not erase the first one's result (a record
of format 1, ``<device-id>.json``, held only the backend tested last and is
still read as that backend's record).  ``neurohand run`` trusts a record only
if it is strict JSON (no NaN) and says what a passing self-test of this bundle
says: this device, this bundle's digest and golden step count, this backend
(and engine), an error within the tolerance.  A golden file with fewer than
``MIN_GOLDEN_SEQUENCES`` x ``MIN_GOLDEN_STEPS`` steps proves nothing and is
refused before anything runs.
"""
import math
import numbers
import os
import platform
import threading
import time

import numpy as np

from neurohand.decoder.backends.base import parity_error
from neurohand.deploy.bundle import MIN_GOLDEN_SEQUENCES, MIN_GOLDEN_STEPS
from neurohand.firmware_bridge.shared.atomic import write_json_atomic
from neurohand.firmware_bridge.shared.checks import load_json_file
from neurohand.firmware_bridge.shared.errors import BundleError
from neurohand.firmware_bridge.shared.outputs import describe_os_error

RECORD_FORMAT = "neurohand-selftest-record"
RECORD_FORMAT_VERSION = 2

# Tolerances on the largest difference from the reference, outputs and states (``parity_error``: absolute
# within +-1, relative beyond, for an LSTM's cell state reaches tens, where float16 steps by 0.03).
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
    """The larger of ``worst`` and ``parity_error(got, expected)`` (absolute within +-1, relative beyond;
    NaN: inf)."""
    return max(worst, parity_error(got, expected))


def check_golden_vectors(bundle, features, expected):
    """BundleError unless the golden vectors are enough to prove a backend: sequences, steps, finite numbers."""
    sequences, steps = features.shape[0], features.shape[1]
    if sequences < MIN_GOLDEN_SEQUENCES or steps < MIN_GOLDEN_STEPS or expected.shape[2] < 1:
        raise BundleError("bundle {!r}: the golden vectors hold {} sequence(s) of {} step(s) and {} output(s); a "
                          "self-test needs at least {} sequences of {} steps of every output (damaged or not made "
                          "by 'neurohand bundle': make the bundle again)".format(
                              bundle.path, sequences, steps, expected.shape[2], MIN_GOLDEN_SEQUENCES,
                              MIN_GOLDEN_STEPS))
    if not (np.all(np.isfinite(features)) and np.all(np.isfinite(expected))):
        raise BundleError("bundle {!r}: the golden vectors hold NaN or infinite values (damaged)".format(bundle.path))
    if not np.any(features):
        raise BundleError("bundle {!r}: the golden features are all zero, which tests nothing (damaged or not made "
                          "by 'neurohand bundle')".format(bundle.path))


def _finite_or_none(value):
    """A JSON-able error: the float, or None where it is not finite (a NaN output; the test failed)."""
    return value if math.isfinite(value) else None


def run_selftest(bundle, backend, fp16=False):
    """Run the golden vectors through ``backend``; return a JSON-able report (strict JSON: no NaN).

    The steps run on a thread of their own, as ``neurohand run`` steps the
    backend on its decoder thread, not on the thread that created it: a
    backend that only works where it was created (a CUDA context current on
    one thread only) fails here rather than in the run.  An exception on that
    thread is raised here.  A backend whose outputs are NaN fails, its errors
    recorded as None.
    """
    features, expected = bundle.golden_vectors()
    expected_states = bundle.golden_states()
    if features.shape[2] != backend.n_features or expected.shape[2] != backend.n_outputs:
        raise BundleError("backend {} takes {} features and gives {} outputs, but the golden vectors have {} and {}".format(
            backend.name, backend.n_features, backend.n_outputs, features.shape[2], expected.shape[2]))
    check_golden_vectors(bundle, features, expected)
    tolerance = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32

    # The golden outputs cover the whole output vector, class scores included; the error of the class
    # scores alone is reported as well (a class head that drifts changes the decided class, not a finger).
    n_positions = int(getattr(backend, "n_positions", backend.n_outputs))

    def steps():
        worst = worst_state = worst_classes = 0.0
        step_seconds = []
        for sequence in range(features.shape[0]):
            state = backend.initial_state()
            for step in range(features.shape[1]):
                started = time.perf_counter()
                outputs, state = backend.step(features[sequence, step], state)
                step_seconds.append(time.perf_counter() - started)
                worst = _worse(worst, outputs, expected[sequence, step])
                if n_positions < backend.n_outputs:
                    worst_classes = _worse(worst_classes, np.asarray(outputs).reshape(-1)[n_positions:],
                                           expected[sequence, step, n_positions:])
            if expected_states is not None:
                # The recurrent state too: a reduced-precision engine can drift there before the outputs show it.
                got = np.stack([np.asarray(a, dtype=np.float64) for a in backend.state_arrays(state)])
                if got.shape != expected_states[sequence].shape:
                    raise BundleError("backend {} keeps a state of shape {}, the golden states have {}".format(
                        backend.name, got.shape, expected_states[sequence].shape))
                worst_state = _worse(worst_state, got, expected_states[sequence])
        return worst, worst_state, worst_classes, step_seconds

    worst_output, worst_state, worst_classes, step_seconds = on_own_thread(steps, "neurohand-selftest")
    worst = max(worst_output, worst_state)
    class_names = list(getattr(backend, "class_names", ()) or ())
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "passed": bool(worst <= tolerance),
        "backend": backend.name,
        "fp16": bool(fp16),
        "max_abs_error": _finite_or_none(worst),
        "max_abs_error_outputs": _finite_or_none(worst_output),
        "max_abs_error_state": _finite_or_none(worst_state) if expected_states is not None else None,
        "states_checked": expected_states is not None,
        # Included in max_abs_error_outputs; null without a class head.
        "max_abs_error_classes": _finite_or_none(worst_classes) if class_names else None,
        "class_names": class_names,
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


def record_path(bundle, backend_name):
    """Where the self-test record of ``backend_name`` on this device lives."""
    return os.path.join(bundle.selftest_dir, "{}.{}.json".format(device_id(), backend_name))


def _legacy_record_path(bundle):
    """Format 1: one record per device, for whichever backend was tested last."""
    return os.path.join(bundle.selftest_dir, device_id() + ".json")


def record_result(bundle, report):
    """Store the report for this device and its backend (atomically: a crash leaves the old one)."""
    path = record_path(bundle, report["backend"])
    try:
        os.makedirs(bundle.selftest_dir, exist_ok=True)
        write_json_atomic(path, report)
    except OSError as exc:
        raise BundleError("cannot write the self-test record {!r}: {}".format(path, describe_os_error(exc))) from None
    return path


def _non_finite(value):
    """True if a parsed JSON value holds NaN or an infinity anywhere (Python's json reads them)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return True
    return False


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _engine_fp16(bundle):
    try:
        metadata = load_json_file(bundle.engine_path + ".json", "engine metadata", error=BundleError)
    except BundleError:
        return None
    return metadata.get("fp16")


def _load_record(bundle, backend_name):
    """(path, report) of this device's record for ``backend_name``; report None where there is none.

    BundleError (one line) if the record cannot be read or is not strict JSON.
    """
    path = record_path(bundle, backend_name)
    if not os.path.lexists(path):
        legacy = _legacy_record_path(bundle)
        if not os.path.lexists(legacy):
            return path, None
        report = _read_record(legacy)
        # A format-1 record speaks for the one backend it names, not for the others.
        return (legacy, report) if report.get("backend") == backend_name else (path, None)
    return path, _read_record(path)


def _read_record(path):
    report = load_json_file(path, "self-test record", error=BundleError)
    if _non_finite(report):
        raise BundleError("self-test record {!r} holds NaN or Infinity (damaged or forged)".format(path))
    return report


def _record_problem(bundle, backend_name, path, report):
    """Why ``report`` (read from ``path``) does not show a passed self-test of this bundle here; None if it does."""
    if report.get("bundle_digest") != bundle.digest:
        return "self-test record {!r} is for other bundle content".format(path)
    if report.get("backend") != backend_name:
        return "self-test record {!r} is for backend {!r}, not {!r}".format(path, report.get("backend"), backend_name)
    if report.get("device") != device_id():
        return "self-test record {!r} is for another device ({!r})".format(path, report.get("device"))
    if backend_name == "tensorrt" and report.get("engine_sha256") != bundle.engine_digest():
        return "the TensorRT engine of bundle {!r} was rebuilt after its self-test".format(bundle.path)
    if report.get("passed") is not True:
        return None   # a failed self-test has its own message (require_passed_selftest)
    features, _ = bundle.golden_vectors()
    golden_steps = int(features.shape[0] * features.shape[1])
    steps = report.get("steps")
    if type(steps) is not int or steps != golden_steps:
        return "self-test record {!r} says it ran {!r} steps; this bundle's golden vectors have {} (damaged or " \
               "forged)".format(path, steps, golden_steps)
    fp16 = report.get("fp16")
    if fp16 is not False and not (fp16 is True and backend_name == "tensorrt" and _engine_fp16(bundle) is True):
        return "self-test record {!r} claims fp16={!r}, which the {} backend of this bundle does not run " \
               "(damaged or forged)".format(path, fp16, backend_name)
    allowed = TOLERANCE_FP16 if fp16 else TOLERANCE_FP32
    tolerance = report.get("tolerance")
    if not _number(tolerance) or not 0 < tolerance <= allowed:
        return "self-test record {!r} has tolerance {!r}, not {:g} (damaged or forged)".format(path, tolerance, allowed)
    for key in ("max_abs_error", "max_abs_error_outputs"):
        value = report.get(key, report.get("max_abs_error"))
        if not _number(value) or not 0 <= value <= tolerance:
            return "self-test record {!r} says passed with {} {!r} (damaged or forged)".format(path, key, value)
    if bundle.golden_states() is not None:
        error = report.get("max_abs_error_state")
        if report.get("states_checked") is not True or not _number(error) or not 0 <= error <= tolerance:
            return "self-test record {!r} says passed without checking the recurrent state within the " \
                   "tolerance (damaged or forged)".format(path)
    return None


def _hint(bundle, backend_name):
    return "run 'neurohand selftest {} --backend {}' on this device first".format(bundle.path, backend_name)


def require_passed_selftest(bundle, backend_name):
    """Raise BundleError unless this device passed the self-test on this bundle and backend; return the record."""
    hint = _hint(bundle, backend_name)
    try:
        path, report = _load_record(bundle, backend_name)
    except BundleError as exc:
        raise BundleError("{}; {}".format(exc, hint)) from None
    if report is None:
        tested = passed_backends(bundle)
        raise BundleError("bundle {!r} has not been self-tested on this device with backend {!r}{}; {}".format(
            bundle.path, backend_name, " (passed here: {})".format(", ".join(tested)) if tested else "", hint))
    problem = _record_problem(bundle, backend_name, path, report)
    if problem is not None:
        raise BundleError("{}; {}".format(problem, hint))
    if report.get("passed") is not True:
        raise BundleError("the self-test of bundle {!r} with backend {} FAILED on this device (max error {} > {}); "
                          "the decoder must not drive a hand".format(
                              bundle.path, backend_name, report.get("max_abs_error"), report.get("tolerance")))
    return report


def passed_backends(bundle, names=None):
    """Names of the backends (of ``names``, default every registered one) that passed here on this bundle."""
    from neurohand.decoder.backend_registry import BACKENDS
    passed = []
    for name in names or tuple(BACKENDS):
        try:
            if _passes(bundle, name):
                passed.append(name)
        except BundleError:
            continue
    return passed


def _passes(bundle, backend_name):
    path, report = _load_record(bundle, backend_name)
    return (report is not None and _record_problem(bundle, backend_name, path, report) is None
            and report.get("passed") is True)


def selftested_backend(bundle):
    """The backend ``neurohand run --backend auto`` may use for ``bundle`` (a loaded Bundle): its name.

    The first backend in the auto order of decoder/backend_registry.py
    (TensorRT, numpy, ONNX Runtime) that can run on this machine and passed
    the self-test on this device for this bundle content (and, for TensorRT,
    this engine).  Raises BundleError (one line) naming what to do when none did.
    """
    from neurohand.decoder.backend_registry import AUTO_ORDER, backend_class
    reasons = []
    for name in AUTO_ORDER:
        try:
            require_passed_selftest(bundle, name)
        except BundleError as exc:
            reasons.append("{}: {}".format(name, _short(exc)))
            continue
        unavailable = backend_class(name).unavailable_reason()
        if unavailable is not None:
            reasons.append("{}: passed, but {}".format(name, unavailable))
            continue
        return name
    raise BundleError("no backend has passed the self-test of bundle {!r} on this device ({}); run 'neurohand "
                      "selftest {} --backend NAME' here with one of {} first, or name the backend with "
                      "--backend".format(bundle.path, "; ".join(reasons), bundle.path, ", ".join(AUTO_ORDER)))


def _short(exc):
    """The reason in a require_passed_selftest message, without its 'run ... first' hint."""
    return str(exc).split("; run 'neurohand selftest", 1)[0]
