"""`neurohand doctor`: one report of a device, on a copy of the bundle, every step recorded."""
import json
import os
import subprocess
import sys

import pytest

from neurohand.deploy.bundle import load_bundle, make_bundle

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")


def neurohand(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("doctor") / "bundle")
    make_bundle(RUN_DIR, path)
    return path


def test_doctor_reports_every_step_and_leaves_the_bundle_alone(bundle, tmp_path):
    before = sorted(os.listdir(bundle))
    report_path = str(tmp_path / "report.json")
    result = neurohand("doctor", bundle, "--seconds", 2, "--out", report_path, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "report written to {}".format(report_path) in result.stdout
    with open(report_path) as handle:
        report = json.load(handle)
    assert report["format"] == "neurohand-doctor-report" and report["bundle"]["digest"] == load_bundle(bundle).digest
    backends = report["system"]["backends"]
    assert backends["numpy"] == "available"
    assert backends["tensorrt"] != "available" and "TensorRT" in backends["tensorrt"]    # none here: says why
    steps = report["steps"]
    assert steps["engine"]["status"] == "not run" and "TensorRT" in steps["engine"]["reason"]
    assert steps["trtexec"]["status"] == "not run"
    numpy_selftest = steps["selftest"]["numpy"]
    assert numpy_selftest["status"] == "passed" and numpy_selftest["report"]["max_abs_error"] <= 1e-4
    assert set(steps["selftest"]) == {name for name, state in backends.items() if state == "available"}
    replay = steps["replay"]
    assert replay["status"] == "passed", replay
    assert replay["report"]["frames"]["missing"] == 0 and replay["report"]["latency_us"]["p99"] > 0
    assert any(line.startswith("replay --realtime: passed") for line in report["summary"])
    # The installed bundle is untouched: no self-test record, no engine, the same files.
    assert sorted(os.listdir(bundle)) == before and "selftest" not in before


def test_doctor_never_overwrites_a_report_and_errors_are_one_line(bundle, tmp_path):
    existing = tmp_path / "report.json"
    existing.write_text("keep me")
    result = neurohand("doctor", bundle, "--out", str(existing))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "exists already" in result.stderr
    assert existing.read_text() == "keep me"
    result = neurohand("doctor", bundle, "--seconds", 0.5, "--out", str(tmp_path / "other.json"))
    assert result.returncode == 2 and "--seconds" in result.stderr and "Traceback" not in result.stderr
    result = neurohand("doctor", str(tmp_path / "no-bundle"), "--out", str(tmp_path / "third.json"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1


def test_a_recording_that_does_not_fit_is_reported_and_fails_the_run(bundle, tmp_path):
    recording = str(tmp_path / "three-channels.nh")
    assert neurohand("simulate", "--out", recording, "--seconds", 4, "--channels", 3, "--rate", 2000,
                     "--quiet").returncode == 0
    report_path = str(tmp_path / "report.json")
    result = neurohand("doctor", bundle, "--seconds", 2, "--recording", recording, "--out", report_path)
    assert result.returncode == 1
    with open(report_path) as handle:
        report = json.load(handle)
    assert report["steps"]["selftest"]["numpy"]["status"] == "passed"
    replay = report["steps"]["replay"]
    assert replay["status"] == "failed" and replay["output_tail"]
    assert any(line.startswith("replay --realtime: failed") for line in report["summary"])
