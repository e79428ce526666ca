"""``neurohand doctor``: check a device end to end and write one report to send back.

What a user runs on a Jetson after ``neurohand flash`` (or on any machine), in
this order, each step recorded whether it passed, failed or could not run::

    system      platform, Python, numpy, JetPack (/etc/nv_tegra_release), power mode
                (nvpmodel -q), TensorRT, pycuda and the GPU, the backends and why any is missing
    trtexec     TensorRT's own tool on the bundle's model.onnx and, where the bundle has it, the
                loop-free model_plain.onnx (where trtexec exists)
    engine      neurohand build-engine (where TensorRT is available)
    selftest    neurohand selftest on every available backend
    replay      neurohand replay --realtime for --seconds (default 60) through the virtual
                chip and hand: latency, per-stage timings, frames, safety events

The steps run on a copy of the bundle in a temporary folder, so the installed
bundle (and its self-test record, which gates ``neurohand run``) is never
changed.  The replay needs a recording with the bundle's channels, rate and
labels: ``--recording``, or else one simulated for the bundle's channels and
rate (this works for a bundle trained on simulated data; other bundles say so
and skip the step).  Every step runs in its own process with a time limit, so
one that hangs or crashes (a TensorRT build, a CUDA fault) is recorded and the
report is still written.  The report is one JSON file (``--out``, never
overwritten: a new name is refused if it exists).
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from neurohand.deploy.version import __version__
from neurohand.firmware_bridge.shared.atomic import write_json_atomic
from neurohand.firmware_bridge.shared.errors import UsageError

REPORT_FORMAT = "neurohand-doctor-report"
REPORT_VERSION = 1
#: Where JetPack puts trtexec; PATH is searched too.
TRTEXEC_PATHS = ("/usr/src/tensorrt/bin/trtexec",)
#: Longest each step may take (seconds): a TensorRT build on a Nano takes minutes.
STEP_TIMEOUT_S = {"trtexec": 900, "engine": 900, "selftest": 300, "simulate": 300}
#: Lines of a step's output kept in the report (the end, where errors are).
OUTPUT_TAIL_LINES = 40


def default_report_path(directory="."):
    """``neurohand-doctor-HOST-YYYYmmdd-HHMMSS.json`` in ``directory``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in platform.node()) or "host"
    return os.path.join(directory, "neurohand-doctor-{}-{}.json".format(host, stamp))


def _tail(text):
    lines = (text or "").splitlines()
    return lines[-OUTPUT_TAIL_LINES:]


def _run(command, timeout_s, progress):
    """Run ``command`` (a list); return a step record with status, seconds, rc and output tail."""
    progress("  $ {}".format(" ".join(command)))
    started = time.monotonic()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"status": "failed", "reason": "timed out after {} s".format(timeout_s),
                "seconds": round(time.monotonic() - started, 1), "command": command,
                "output_tail": _tail(exc.stdout if isinstance(exc.stdout, str) else "")}
    except OSError as exc:
        return {"status": "not run", "reason": str(exc), "command": command}
    record = {"status": "passed" if result.returncode == 0 else "failed", "rc": result.returncode,
              "seconds": round(time.monotonic() - started, 1), "command": command,
              "output_tail": _tail(result.stdout) + _tail(result.stderr)}
    return record


def _neurohand(*arguments):
    return [sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in arguments]


def _json_of(record):
    """The last line of a step's stdout that is a JSON object, or None."""
    for line in reversed(record.get("output_tail") or []):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def system_facts(progress):
    """What this machine is and what it can run (no step here may fail the report)."""
    import numpy as np

    from neurohand.decoder.backend_registry import BACKENDS, backend_class

    facts = {"platform": platform.platform(), "machine": platform.machine(),
             "python": platform.python_version(), "numpy": np.__version__, "neurohand": __version__,
             "jetpack_release": _read_text("/etc/nv_tegra_release"),
             "device_model": _read_text("/proc/device-tree/model")}
    for module in ("tensorrt", "pycuda", "onnxruntime", "serial"):
        try:
            facts[module] = getattr(__import__(module), "__version__", "installed")
        except Exception as exc:  # any import failure (a broken install too) is a fact to report
            facts[module] = None
            facts[module + "_error"] = "{}: {}".format(type(exc).__name__, exc)
    nvpmodel = shutil.which("nvpmodel")
    if nvpmodel:
        facts["nvpmodel"] = _run([nvpmodel, "-q"], 30, progress).get("output_tail")
    backends = {}
    for name in BACKENDS:
        try:
            reason = backend_class(name).unavailable_reason()
        except Exception as exc:  # a backend module that does not even import
            reason = "{}: {}".format(type(exc).__name__, exc)
        backends[name] = "available" if reason is None else reason
    facts["backends"] = backends
    return facts


def find_trtexec():
    for path in TRTEXEC_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("trtexec")


def _bundle_stream(bundle):
    """(n_channels, signal_rate) of the bundle's feature pipeline."""
    pipeline = bundle.config.get("pipeline") or {}
    return int(pipeline.get("n_channels", 0)), float(pipeline.get("signal_rate", 0.0))


def run_doctor(bundle_path, out_path, seconds=60.0, recording=None, progress=None):
    """Run every step on a copy of ``bundle_path``; write the report to ``out_path``; return it."""
    from neurohand.deploy.bundle import load_bundle

    progress = progress or (lambda line: None)
    if os.path.exists(out_path):
        raise UsageError("report {!r} exists already; name another with --out".format(out_path))
    if not os.path.isdir(os.path.dirname(os.path.abspath(out_path))):
        raise UsageError("the folder of the report {!r} does not exist".format(out_path))
    if recording is not None and not os.path.isfile(recording):
        raise UsageError("recording {!r} does not exist".format(recording))
    bundle = load_bundle(bundle_path)          # a broken bundle is a one-line error before anything runs
    report = {"format": REPORT_FORMAT, "version": REPORT_VERSION,
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "bundle": {"path": os.path.abspath(bundle_path), "digest": bundle.digest}, "steps": {}}
    steps = report["steps"]

    def save():
        write_json_atomic(out_path, report, allow_nan=True)

    progress("[1/5] system ...")
    report["system"] = system_facts(progress)
    save()
    work = tempfile.mkdtemp(prefix="neurohand-doctor-")
    try:
        copy = os.path.join(work, "bundle")
        shutil.copytree(bundle_path, copy, ignore=shutil.ignore_patterns("selftest"))
        available = [name for name, state in report["system"]["backends"].items() if state == "available"]

        progress("[2/5] trtexec ...")
        trtexec = find_trtexec()
        exports = [("trtexec", bundle.model_path)]
        if bundle.plain_model_path is not None:
            exports.append(("trtexec_plain", bundle.plain_model_path))
        for name, model_path in exports:
            if trtexec is None:
                steps[name] = {"status": "not run", "reason": "trtexec not found (it comes with TensorRT)"}
            else:
                steps[name] = _run([trtexec, "--onnx={}".format(model_path)], STEP_TIMEOUT_S["trtexec"], progress)
        save()

        progress("[3/5] build-engine ...")
        if "tensorrt" in available:
            steps["engine"] = _run(_neurohand("build-engine", copy), STEP_TIMEOUT_S["engine"], progress)
        else:
            steps["engine"] = {"status": "not run",
                               "reason": "TensorRT backend unavailable: " + report["system"]["backends"]["tensorrt"]}
        save()

        progress("[4/5] selftest on {} ...".format(", ".join(available) or "no backend"))
        selftests = {}
        for name in available:
            record = _run(_neurohand("selftest", copy, "--backend", name, "--json"), STEP_TIMEOUT_S["selftest"],
                          progress)
            record["report"] = _json_of(record)
            selftests[name] = record
        steps["selftest"] = selftests
        save()

        progress("[5/5] replay --realtime for {:g} s ...".format(seconds))
        steps["replay"] = _replay_step(bundle, copy, work, seconds, recording, selftests, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["summary"] = summarise(report)
    save()
    return report


def _replay_step(bundle, copy, work, seconds, recording, selftests, progress):
    passed = [name for name in ("tensorrt", "onnxruntime", "numpy") if selftests.get(name, {}).get("status") == "passed"]
    if not passed:
        return {"status": "not run", "reason": "no backend passed its self-test"}
    backend = passed[0]
    if recording is None:
        n_channels, rate = _bundle_stream(bundle)
        recording = os.path.join(work, "simulated.nh")
        simulated = _run(_neurohand("simulate", "--out", recording, "--seconds", seconds + 3.0, "--channels",
                                    n_channels, "--rate", rate, "--quiet"), STEP_TIMEOUT_S["simulate"], progress)
        if simulated["status"] != "passed":
            return dict(simulated, status="not run",
                        reason="could not simulate a recording for this bundle; pass --recording")
    record = _run(_neurohand("replay", copy, recording, "--realtime", "--seconds", seconds, "--backend", backend,
                             "--json", "--quiet"), seconds + 120.0, progress)
    record["backend"] = backend
    record["report"] = _json_of(record)
    if record["status"] != "passed" and recording.endswith("simulated.nh"):
        record["reason"] = ("the simulated recording does not fit this bundle (its channels, rate or labels); "
                            "pass --recording with one that does")
    return record


def summarise(report):
    """One line per step: what a reader checks first."""
    steps = report["steps"]
    lines = []
    for name in ("trtexec", "trtexec_plain", "engine"):
        if name not in steps:
            continue
        step = steps[name]
        lines.append("{}: {}{}".format(name, step.get("status"),
                                       " ({})".format(step["reason"]) if step.get("reason") else ""))
    for backend, step in sorted((steps.get("selftest") or {}).items()):
        detail = step.get("report") or {}
        lines.append("selftest {}: {} (max error {}, step p99 {} us)".format(
            backend, step.get("status"), _figure(detail.get("max_abs_error")),
            _figure((detail.get("step_us") or {}).get("p99"))))
    replay = steps.get("replay", {})
    detail = replay.get("report") or {}
    latency = detail.get("latency_us") or {}
    lines.append("replay --realtime: {} (backend {}, latency p50 {} us, p99 {} us, max {} us, frames missing {}, "
                 "safety events {})".format(replay.get("status"), replay.get("backend"), _figure(latency.get("p50")),
                                            _figure(latency.get("p99")), _figure(latency.get("max")),
                                            (detail.get("frames") or {}).get("missing"), detail.get("safety_events")))
    if replay.get("reason"):
        lines.append("  replay: " + replay["reason"])
    return lines


def _figure(value):
    return "{:.3g}".format(value) if isinstance(value, float) else value
