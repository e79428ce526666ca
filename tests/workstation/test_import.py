"""Importers: NinaPro MAT files and CSV tables into recordings; their CLI errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

scipy_io = pytest.importorskip("scipy.io")

from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import open_recording  # noqa: E402
from neurohand.train import importers  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def fake_ninapro(path, n=600, n_emg=10, drop=(), extra=None):
    """A small DB1-shaped MAT file: 3 movements x 2 repetitions with rest between."""
    rng = np.random.default_rng(0)
    restimulus = np.zeros(n, dtype=np.uint8)
    rerepetition = np.zeros(n, dtype=np.uint8)
    for k, (movement, repetition) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]):
        start = 50 + k * 90
        restimulus[start:start + 50] = movement
        rerepetition[start:start + 50] = repetition
    variables = {
        "emg": rng.random((n, n_emg)), "glove": rng.integers(0, 255, (n, 22)).astype(float),
        "restimulus": restimulus[:, None], "rerepetition": rerepetition[:, None],
        "subject": np.array([[7]], dtype=np.uint8), "exercise": np.array([[1]], dtype=np.uint8),
    }
    variables.update(extra or {})
    for name in drop:
        del variables[name]
    scipy_io.savemat(path, variables)
    return variables


def test_ninapro_round_trip(tmp_path):
    source = fake_ninapro(tmp_path / "S7_A1_E1.mat")
    summary = importers.import_ninapro(tmp_path / "S7_A1_E1.mat", tmp_path / "s7.nhr")
    assert summary["database"] == "DB1" and summary["signal_rate"] == 100.0
    with open_recording(tmp_path / "s7.nhr") as rec:
        assert rec.signal_rate == 100.0 and rec.n_channels == 10 and rec.n_samples == 600
        assert rec.dtype == "float32"
        np.testing.assert_allclose(rec.read_signals(microvolts=True), source["emg"], rtol=1e-6)
        glove = rec.label_streams["glove"]
        assert glove.rate == 100.0 and glove.names == list(importers.CYBERGLOVE_NAMES)
        np.testing.assert_array_equal(glove.data, source["glove"].astype(np.float32))
        assert rec.metadata["subject"] == 7 and rec.metadata["exercise"] == 1
        assert rec.metadata["doi"] == "10.1038/sdata.2014.53"
        movements = [(e.sample, e.value) for e in rec.events if e.kind == "movement"]
        repetitions = [(e.sample, e.value) for e in rec.events if e.kind == "repetition"]
    # Events at sample 0 and at every change of restimulus / rerepetition.
    assert movements[:3] == [(0, 0), (50, 1), (100, 0)]
    assert repetitions[:4] == [(0, 0), (50, 1), (100, 0), (140, 2)]
    expected = importers.change_events(source["restimulus"][:, 0], "movement")
    assert movements == [(s, v) for s, _, v in expected]
    assert not os.path.exists(str(tmp_path / "s7.nhr") + ".partial")


def test_ninapro_rate_from_file_and_override(tmp_path):
    fake_ninapro(tmp_path / "db2.mat", n_emg=12, extra={"frequency": np.array([[2000]])})
    assert importers.import_ninapro(tmp_path / "db2.mat", tmp_path / "a.nhr")["signal_rate"] == 2000.0
    assert importers.import_ninapro(tmp_path / "db2.mat", tmp_path / "b.nhr", rate=1000)["signal_rate"] == 1000.0
    fake_ninapro(tmp_path / "unknown.mat", n_emg=12)
    with pytest.raises(UsageError, match="--rate"):
        importers.import_ninapro(tmp_path / "unknown.mat", tmp_path / "c.nhr")


def test_ninapro_missing_variable_is_named(tmp_path):
    fake_ninapro(tmp_path / "bad.mat", drop=("rerepetition",))
    with pytest.raises(RecordingError, match="rerepetition"):
        importers.import_ninapro(tmp_path / "bad.mat", tmp_path / "bad.nhr")
    assert not os.path.exists(tmp_path / "bad.nhr")


def test_ninapro_v73_file_says_hdf5_and_h5py(tmp_path):
    # A MATLAB v7.3 file is HDF5 with a 512-byte MATLAB text header in front.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    (tmp_path / "v73.mat").write_bytes(header.ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(RecordingError, match="v7.3.*h5py"):
        importers.import_ninapro(tmp_path / "v73.mat", tmp_path / "v73.nhr")
    (tmp_path / "text.mat").write_text("not a mat file at all")
    with pytest.raises(RecordingError):
        importers.import_ninapro(tmp_path / "text.mat", tmp_path / "text.nhr")


def test_real_ninapro_db1_file(shared_data, tmp_path):
    path = os.path.join(shared_data, "ninapro_db1_s2_e1", "S2_A1_E1.mat")
    if not os.path.exists(path):
        pytest.skip("NinaPro DB1 S2 E1 is absent")
    summary = importers.import_ninapro(path, tmp_path / "s2e1.nhr")
    assert summary["n_repetitions"] == 10 and summary["n_movements"] == 12
    with open_recording(tmp_path / "s2e1.nhr") as rec:
        assert rec.signal_rate == 100.0
        assert (rec.n_samples, rec.n_channels) == (100686, 10)
        assert rec.label_streams["glove"].data.shape == (100686, 22)
        assert rec.metadata["database"] == "DB1" and rec.metadata["subject"] == 2
        assert rec.metadata["signal_kind"] == "envelope"
        assert "Atzori" in rec.metadata["citation"]
        assert sorted({e.value for e in rec.events if e.kind == "repetition"}) == list(range(11))
        assert sorted({e.value for e in rec.events if e.kind == "movement"}) == list(range(13))


CSV = "time,emg_1,emg_2,emg_3,finger_a,finger_b,rep\n" + "".join(
    "{t},{a},{b},{c},{f},{g},{r}\n".format(t=i, a=i * 0.5, b=-i, c=1, f=i / 20.0, g=1 - i / 20.0, r=i // 10)
    for i in range(20))


def test_csv_columns_by_pattern(tmp_path):
    (tmp_path / "t.csv").write_text(CSV)
    summary = importers.import_csv(tmp_path / "t.csv", tmp_path / "t.nhr", 1000, ["emg_[12]", "emg_3"],
                                   ["finger_*"], ["rep=repetition"], label_stream="fingers", scale_uv=2.0)
    assert summary["n_channels"] == 3 and summary["n_labels"] == 2
    with open_recording(tmp_path / "t.nhr") as rec:
        assert rec.channel_names == ["emg_1", "emg_2", "emg_3"] and rec.signal_rate == 1000
        np.testing.assert_allclose(rec.read_signals(microvolts=True)[:, 1], -2.0 * np.arange(20))
        np.testing.assert_allclose(rec.label_streams["fingers"].data[:, 0], np.arange(20) / 20.0, rtol=1e-6)
        assert [(e.sample, e.kind, e.value) for e in rec.events] == [(0, "repetition", 0), (10, "repetition", 1)]


@pytest.mark.parametrize("text, signals, labels, message", [
    (CSV, ["eeg*"], ["finger_*"], "pattern 'eeg\\*' matches no column"),
    (CSV, ["emg*"], ["nope"], "--labels pattern 'nope' matches no column"),
    (CSV, ["emg*", "finger_a"], ["finger_*"], "both --signals and --labels"),
    (CSV.replace("\n3,1.5", "\n3,abc", 1), ["emg*"], ["finger_*"], "line 5, column 'emg_1': 'abc' is not a number"),
    (CSV.replace("\n3,1.5", "\n3,", 1), ["emg*"], ["finger_*"], "is not a number"),
    (CSV.replace("\n3,1.5", "\n3,nan", 1), ["emg*"], ["finger_*"], "not a finite number"),
    (CSV.replace("\n3,1.5,", "\n3,", 1), ["emg*"], ["finger_*"], "line 5: 6 cells, but the header has 7"),
    ("a,b\n", ["a"], ["b"], "0 data row"),
    ("", ["a"], ["b"], "empty"),
])
def test_csv_errors_are_one_clear_line(tmp_path, text, signals, labels, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(UsageError, match=message):
        importers.import_csv(tmp_path / "bad.csv", tmp_path / "bad.nhr", 100, signals, labels)
    assert not os.path.exists(tmp_path / "bad.nhr")


def test_cli_import_csv_and_errors(tmp_path):
    (tmp_path / "t.csv").write_text(CSV)
    ok = run_cli("import", "csv", tmp_path / "t.csv", "--out", tmp_path / "t.nhr", "--rate", "500",
                 "--signals", "emg*", "--labels", "finger_*", "--events", "rep=repetition")
    assert ok.returncode == 0, ok.stderr
    assert "n_channels: 3" in ok.stdout
    bad = run_cli("import", "csv", tmp_path / "t.csv", "--out", tmp_path / "u.nhr", "--rate", "500",
                  "--signals", "eeg*", "--labels", "finger_*")
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "matches no column" in bad.stderr
    missing = run_cli("import", "ninapro", tmp_path / "absent.mat", "--out", tmp_path / "x.nhr")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    (tmp_path / "v73.mat").write_bytes(b"MATLAB 7.3 MAT-file".ljust(512, b" ") + b"\x89HDF")
    v73 = run_cli("import", "ninapro", tmp_path / "v73.mat", "--out", tmp_path / "x.nhr")
    assert v73.returncode == 2 and "h5py" in v73.stderr and v73.stderr.count("\n") == 1


# --- discrete labels: a class column and a repetition column --------------------------------------

def gesture_table(n_repetitions=8, move=5, rest=3):
    """Rows of a discrete-label data set: each repetition holds gesture 1 then gesture 2, each followed by
    rest (class 0, repetition 0 as in NinaPro's rerepetition).  Returns (csv text, classes, repetitions)."""
    classes, repetitions = [], []
    for repetition in range(1, n_repetitions + 1):
        for gesture in (1, 2):
            classes += [gesture] * move + [0] * rest
            repetitions += [repetition] * move + [0] * rest
    lines = ["emg_1,emg_2,finger,gesture,rep"]
    lines += ["{},{},{},{},{}".format(0.1 * i, -0.2 * i, 0.5 * (c > 0), c, r)
              for i, (c, r) in enumerate(zip(classes, repetitions))]
    return "\n".join(lines) + "\n", classes, repetitions


def test_csv_class_and_repetition_columns_become_events_at_each_change(tmp_path):
    from neurohand.decoder.classes import movement_at
    from neurohand.train import splits

    text, classes, repetitions = gesture_table()
    (tmp_path / "g.csv").write_text(text)
    summary = importers.import_csv(tmp_path / "g.csv", tmp_path / "g.nhr", 100, ["emg_*"], ["finger"],
                                   ["gesture=movement", "rep=repetition"])
    assert (summary["n_movements"], summary["n_repetitions"]) == (2, 8)
    with open_recording(tmp_path / "g.nhr") as rec:
        events = list(rec.events)
        assert rec.channel_names == ["emg_1", "emg_2"] and "gesture" in rec.metadata["events"]["movement"]
    for kind, column in (("movement", classes), ("repetition", repetitions)):
        # One event at the first row and at every row whose value differs from the row before, no other.
        expected = [(i, value) for i, value in enumerate(column) if i == 0 or value != column[i - 1]]
        assert [(e.sample, e.value) for e in events if e.kind == kind] == expected
    np.testing.assert_array_equal(movement_at(events, np.arange(len(classes))), classes)
    method, segments = splits.plan_split(len(classes), events, splits.check_split_settings({}), 1, "g.nhr")
    assert method == "repetition"
    split_of = {}
    for segment in segments:
        for i in range(segment.start, segment.stop):
            if repetitions[i]:
                split_of.setdefault(repetitions[i], set()).add(segment.split)
    # NinaPro's standard split: test repetitions 2, 5, 7, validation 4, the others train.
    assert split_of == {r: {"test" if r in (2, 5, 7) else "validation" if r == 4 else "train"} for r in range(1, 9)}


@pytest.mark.parametrize("edit, events, message", [
    ((3, "gesture", "1.5"), ["gesture=movement"],
     "line 5: --events column 'gesture' must hold whole numbers up to 2\\*\\*53, but has 1.5; movement events "
     "are movement classes 0 = rest"),
    ((6, "gesture", "-1"), ["gesture=movement"], "line 8: --events column 'gesture' has -1, but movement events are"),
    ((2, "rep", "-3"), ["gesture=movement", "rep=repetition"], "line 4: --events column 'rep' has -3, but "
                                                               "repetition events are repetition numbers"),
    ((4, "gesture", "fist"), ["gesture=movement"], "line 6, column 'gesture': 'fist' is not a number; --events "
                                                   "columns hold integer codes"),
    (None, ["class=movement"], "--events column 'class' is not in the header"),
    (None, ["gesture=movement", "rep=movement"], "kind 'movement' is given by column 'gesture' and again by 'rep'"),
])
def test_csv_class_column_errors_are_one_line(tmp_path, edit, events, message):
    text, _, _ = gesture_table(n_repetitions=2)
    rows = [line.split(",") for line in text.splitlines()]
    if edit is not None:
        row, column, value = edit
        rows[row + 1][rows[0].index(column)] = value
    (tmp_path / "g.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    with pytest.raises(UsageError, match=message) as caught:
        importers.import_csv(tmp_path / "g.csv", tmp_path / "g.nhr", 100, ["emg_*"], ["finger"], events)
    assert "\n" not in str(caught.value)
    assert not os.path.exists(tmp_path / "g.nhr")


def test_a_class_column_among_the_signals_is_refused(tmp_path):
    text, _, _ = gesture_table(n_repetitions=2)
    (tmp_path / "g.csv").write_text(text)
    with pytest.raises(UsageError, match="'gesture' \\(movement\\) is also matched by --signals"):
        importers.import_csv(tmp_path / "g.csv", tmp_path / "g.nhr", 100, ["emg_*", "gesture"], ["finger"],
                             ["gesture=movement"])


def test_cli_imports_a_class_column_and_refuses_a_negative_class_in_one_line(tmp_path):
    text, _, _ = gesture_table(n_repetitions=2)
    (tmp_path / "g.csv").write_text(text)
    common = ["--rate", "100", "--signals", "emg_*", "--labels", "finger", "--events", "gesture=movement",
              "--events", "rep=repetition"]
    ok = run_cli("import", "csv", tmp_path / "g.csv", "--out", tmp_path / "g.nhr", *common)
    assert ok.returncode == 0, ok.stderr
    assert "n_movements: 2" in ok.stdout and "n_repetitions: 2" in ok.stdout
    (tmp_path / "bad.csv").write_text(text.replace(",1,1\n", ",-1,1\n", 1))
    bad = run_cli("import", "csv", tmp_path / "bad.csv", "--out", tmp_path / "bad.nhr", *common)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "line 2: --events column 'gesture' has -1" in bad.stderr
