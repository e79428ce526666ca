"""neurohand evaluate RUN REC [REC ...]: each session scored on its own, held-in and held-out as FALCON reports them."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.train import evaluate, trainer  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    base = tmp_path_factory.mktemp("sessions")
    day1 = str(make_recording(base / "day1.nhr", seconds=60.0, seed=0))
    day2 = str(make_recording(base / "day2.nhr", seconds=40.0, seed=3, repetitions=False))
    day3 = str(make_recording(base / "day3.nhr", seconds=40.0, seed=4, repetitions=False))
    run_dir = str(base / "run")
    trainer.train_run([day1], run_dir, TINY_CONFIG, seed=1, progress=False, light=True)
    return base, run_dir, day1, day2, day3


def test_several_recordings_are_scored_one_by_one_and_summarised(sessions, capsys):
    base, run_dir, day1, day2, day3 = sessions
    # A copy of the training session under another name is still held-in (by its digest).
    copy = str(base / "renamed.nhr")
    shutil.copyfile(day1, copy)
    assert cli.main(["evaluate", run_dir, day2, copy, day3, "--json", "--no-baselines"]) == 0
    result = json.loads(capsys.readouterr().out)
    records = result["recordings"]
    assert [os.path.basename(r["recording"]) for r in records] == ["day2.nhr", "renamed.nhr", "day3.nhr"]
    assert [r["held_in"] for r in records] == [False, True, False]
    # Each equals the single-recording evaluation of that recording.
    alone = evaluate.evaluate_run(run_dir, day3, with_baselines=False)
    np.testing.assert_allclose(records[2]["r2"], alone["r2"])
    summary = result["sessions"]
    rows = summary["sessions"]
    assert [row["held_in"] for row in rows] == [False, True, False]
    for row, record in zip(rows, records):
        assert row["mean_r2"] == pytest.approx(record["mean_r2"])
        assert row["r2_sd_over_outputs"] == pytest.approx(float(np.std(record["r2"])))
    held_out = [records[0]["mean_r2"], records[2]["mean_r2"]]
    assert summary["held_out"]["n_sessions"] == 2 and summary["held_in"]["n_sessions"] == 1
    assert summary["held_out"]["mean_r2"] == pytest.approx(np.mean(held_out))
    assert summary["held_out"]["r2_sd_over_sessions"] == pytest.approx(np.std(held_out))
    assert summary["held_in"]["mean_r2"] == pytest.approx(records[1]["mean_r2"])


def test_table_and_single_recording_output(sessions, capsys):
    _, run_dir, day1, day2, _ = sessions
    assert cli.main(["evaluate", run_dir, day1, day2, "--no-baselines"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["recording", "session", "mean"]
    assert lines[1].split()[:2] == ["day1.nhr", "held-in"] and lines[2].split()[:2] == ["day2.nhr", "held-out"]
    assert any(line.startswith("held-in: 1 session, mean R2") for line in lines)
    assert any(line.startswith("held-out: 1 session, mean R2") for line in lines)
    # One recording: the object it always printed, now also saying whether the run trained on it.
    assert cli.main(["evaluate", run_dir, day2, "--json", "--no-baselines"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert "recordings" not in single and single["held_in"] is False and len(single["r2"]) == 3


def test_a_bad_recording_among_several_is_refused_before_scoring(sessions, capsys):
    base, run_dir, day1, _, _ = sessions
    other = str(make_recording(base / "other.nhr", seconds=30.0, n_channels=3, repetitions=False))
    assert cli.main(["evaluate", run_dir, day1, str(base / "missing.nhr"), "--no-baselines"]) == 2
    assert "missing.nhr" in capsys.readouterr().err
    assert cli.main(["evaluate", run_dir, day1, other, "--no-baselines"]) == 2
    err = capsys.readouterr().err
    assert "3 channels" in err and len(err.strip().splitlines()) == 1
