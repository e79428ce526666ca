"""Hostile values for every runtime setting and every number of ``run`` and ``replay``, and hostile
output paths: each refused at start, in one line (``neurohand CMD: error: ...``, exit 2), before a
bundle is loaded or a port opened (docs/runtime.md: the settings' ranges)."""
import json
import os

import numpy as np
import pytest

from neurohand.deploy.cli import main as cli
from neurohand.deploy.runtime.config import DEFAULTS, RANGES, SMOOTHING_SETTINGS, RuntimeConfig
from neurohand.firmware_bridge.recording.file_format import RecordingWriter
from neurohand.firmware_bridge.shared.errors import UsageError

HUGE_INT = 10 ** 400

#: Per setting: values just outside its range (too small, too large).
OUT_OF_RANGE = {
    "stride_ms": [0.01, 1e6],
    "data_timeout_ms": [0, 1, 1e9, -100],
    "writer_period_ms": [0, 1e-9, 1e6],
    "recovery_windows": [0, -1, 10 ** 6, 10 ** 18],
    "smoothing_tau_ms": [-1, 1e9, [0, -1]],
    "max_slew_per_s": [0, 1e-9, 1e12, -5, [1, 1e300]],
    "frame_queue_events": [0, 15, 10 ** 9],
    "record_backlog_ms": [0, 1e-3, 1e12],
    "status_interval_s": [-1, 1e-6, 1e9],
    "one_euro_min_cutoff_hz": [0, 0.01, 1e4, -1, [1, 0]],
    "one_euro_beta": [-1, 1e4, [1, -1]],
    "one_euro_d_cutoff_hz": [0, 0.01, 1e4],
    "class_vote_windows": [0, -1, 101, 10 ** 18],
    "class_min_confidence": [-0.1, 1.5],
}
#: Values of no numeric setting: not finite, wrong types, huge integers, booleans.
HOSTILE = [float("nan"), float("inf"), float("-inf"), "10", True, False, HUGE_INT, -HUGE_INT, [], {}, [[1]]]
NULLABLE = ("stride_ms", "max_slew_per_s")
NUMERIC = sorted(OUT_OF_RANGE)


def cases():
    for name in NUMERIC:
        for value in OUT_OF_RANGE[name]:
            yield name, value
        for value in HOSTILE:
            if name in ("recovery_windows", "frame_queue_events", "class_vote_windows") and value is False:
                continue     # both refused below as booleans anyway; keep ids unique
            yield name, value
        if name not in NULLABLE:
            yield name, None
    for value in [float("nan"), float("inf"), 1e7, -1e7, "0", True, None, HUGE_INT, [], [0.1, float("nan")]]:
        yield "calibration", {"lo": value}
        yield "calibration", {"hi": value}
    yield "calibration", {"lo": 0.5, "hi": 0.5 + 1e-9}
    yield "calibration", [0, 1]
    yield "smoothing", "euro"
    yield "smoothing", None
    yield "smoothing", 0
    yield "decode_in", "decoder"
    yield "decode_in", None
    yield "decode_in", True
    yield "safe_posture", "closed"
    yield "safe_posture", None
    yield "safe_posture", 0


CASES = list(cases())


def case_id(case):
    name, value = case
    text = repr(value)
    return "{}={}".format(name, text if len(text) < 30 else text[:12] + "...")


def test_every_setting_is_covered_and_has_a_range():
    assert set(NUMERIC) | {"calibration", "safe_posture", "smoothing", "decode_in"} == set(DEFAULTS)
    assert set(RANGES) == set(DEFAULTS) - {"safe_posture", "smoothing", "decode_in"}
    RuntimeConfig(**{name: DEFAULTS[name] for name in DEFAULTS})                    # the defaults fit
    for name in NUMERIC:
        low, high = RANGES[name]
        for value in (low, high):
            settings = {name: value}
            for kind, names in SMOOTHING_SETTINGS.items():
                if name in names:
                    settings["smoothing"] = kind       # a setting of the other kind would be refused
            if name == "data_timeout_ms":
                settings["writer_period_ms"] = min(value, DEFAULTS["writer_period_ms"])
            if name == "writer_period_ms":
                settings["data_timeout_ms"] = max(value, DEFAULTS["data_timeout_ms"])
            RuntimeConfig(**settings)                                                  # the bounds fit


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_hostile_settings_are_refused_by_the_config(case):
    name, value = case
    with pytest.raises(UsageError) as caught:
        RuntimeConfig(**{name: value})
    message = str(caught.value)
    assert name.split(".")[0] in message and "\n" not in message and len(message) < 300


def one_error_line(capsys, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("neurohand {}: error: ".format(command)), err
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_hostile_settings_in_a_runtime_config_are_refused_in_one_line(tmp_path, capsys, case):
    name, value = case
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({name: value}))
    capsys.readouterr()
    status = cli.main(["run", "--bundle", str(tmp_path / "no-bundle"), "--chip", "/dev/null", "--hand", "none",
                       "--runtime-config", str(path)])
    assert status == 2
    assert name in one_error_line(capsys, "run")


def test_a_writer_period_longer_than_the_data_timeout_is_refused():
    with pytest.raises(UsageError, match="writer_period_ms"):
        RuntimeConfig(data_timeout_ms=50, writer_period_ms=60)


RUN_FLAGS = [
    ("--data-timeout-ms", ["nan", "inf", "-inf", "1e999", "1e9", "0", "-5"]),
    ("--smoothing-ms", ["nan", "inf", "-1", "1e300"]),
    ("--max-slew", ["nan", "inf", "0", "-1", "1e300"]),
    ("--status-interval", ["nan", "inf", "-1", "1e-6", "1e300"]),
    ("--duration", ["nan", "inf", "0", "-1", "1e300", "1e999"]),
]


@pytest.mark.parametrize("flag, value", [(f, v) for f, values in RUN_FLAGS for v in values])
def test_hostile_run_numbers_are_refused_in_one_line(tmp_path, capsys, flag, value):
    capsys.readouterr()
    status = cli.main(["run", "--bundle", str(tmp_path / "no-bundle"), "--chip", "/dev/null", "--hand", "none",
                       "{}={}".format(flag, value)])
    assert status == 2
    line = one_error_line(capsys, "run")
    assert flag.lstrip("-").split("-")[0] in line.replace("_", "-")


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """3 s of 4 channels at 2 kHz with a label stream: enough for the replay's range checks."""
    path = str(tmp_path_factory.mktemp("hostile") / "rec.nhr")
    with RecordingWriter(path, 2000.0, ["a", "b", "c", "d"], dtype="int16", scale_uv=[0.195] * 4,
                         label_streams={"fingers": {"rate": 100.0, "names": ["f"]}}) as writer:
        writer.append_signals(np.zeros((6000, 4), dtype=np.int16))
        writer.append_labels("fingers", np.zeros((300, 1), dtype=np.float32))
    return path


REPLAY_FLAGS = [
    ("--seconds", ["nan", "inf", "-1", "1", "1e300", "1e999", "100"]),
    ("--start", ["nan", "inf", "-1", "1e300", "1e999", "2.5"]),
    ("--drop-rate", ["nan", "inf", "-0.1", "2"]),
    ("--corrupt-rate", ["nan", "inf", "-0.1", "1.5"]),
    ("--garbage-bursts", ["nan", "inf", "-1", "1e300"]),
    ("--disconnect-after", ["nan", "inf", "-1", "1e300"]),
    ("--jobs", ["0", "3", str(10 ** 30)]),
    ("--data-timeout-ms", ["nan", "1e9"]),
]


@pytest.mark.parametrize("flag, value", [(f, v) for f, values in REPLAY_FLAGS for v in values])
def test_hostile_replay_numbers_are_refused_in_one_line(tmp_path, capsys, recording, flag, value):
    mode = ["--realtime"] if flag in ("--drop-rate", "--corrupt-rate", "--garbage-bursts",
                                      "--disconnect-after") else []
    capsys.readouterr()
    status = cli.main(["replay", str(tmp_path / "no-bundle"), recording, "{}={}".format(flag, value)] + mode)
    assert status == 2
    line = one_error_line(capsys, "replay")
    assert flag in line or flag.lstrip("-").replace("-", "_") in line or "seconds" in line


# --- output paths --------------------------------------------------------------------------------

def run_args(tmp_path, *extra):
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text("{}")
    return ["run", "--bundle", str(bundle), "--chip", "/dev/null", "--hand", "none"] + list(extra)


def hostile_outputs(tmp_path, recording=None):
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    bundle = str(tmp_path / "bundle")
    cases = [("--record", ""), ("--record", "/proc/x"), ("--record", str(tmp_path)),
             ("--stats-json", "/proc/self/status"), ("--stats-json", str(tmp_path / "missing" / "s.json")),
             ("--record", str(existing)), ("--stats-json", str(existing)),
             ("--record", os.path.join(bundle, "run.nhr")), ("--stats-json", bundle)]
    if recording is not None:
        cases.append(("--record", recording))
    return cases


def test_hostile_run_outputs_are_refused_before_the_bundle_is_loaded(tmp_path, capsys):
    for flag, path in hostile_outputs(tmp_path):
        capsys.readouterr()
        assert cli.main(run_args(tmp_path, "{}={}".format(flag, path))) == 2, (flag, path)
        line = one_error_line(capsys, "run")
        assert flag in line and "bundle" not in line.split(flag)[0], line
    assert (tmp_path / "old.json").read_text() == "keep me"


def test_run_outputs_may_not_be_one_file_and_an_existing_one_needs_force(tmp_path, capsys):
    same = str(tmp_path / "out")
    capsys.readouterr()
    assert cli.main(run_args(tmp_path, "--record", same, "--stats-json", same)) == 2
    assert "same file" in one_error_line(capsys, "run")
    existing = tmp_path / "stats.json"
    existing.write_text("{}")
    assert cli.main(run_args(tmp_path, "--stats-json", str(existing))) == 2
    assert "--force" in one_error_line(capsys, "run")
    # With --force the output passes; the command then fails on the (empty) bundle, not the path.
    assert cli.main(run_args(tmp_path, "--stats-json", str(existing), "--force")) == 2
    assert "--stats-json" not in one_error_line(capsys, "run")
    assert existing.read_text() == "{}"


def test_hostile_replay_outputs_are_refused_before_the_bundle_is_loaded(tmp_path, capsys, recording):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for flag, path in hostile_outputs(tmp_path, recording):
        capsys.readouterr()
        assert cli.main(["replay", str(bundle), recording, "{}={}".format(flag, path)]) == 2, (flag, path)
        assert flag in one_error_line(capsys, "replay")
    capsys.readouterr()
    same = str(tmp_path / "out")
    assert cli.main(["replay", str(bundle), recording, "--record", same, "--stats-json", same]) == 2
    assert "same file" in one_error_line(capsys, "replay")
