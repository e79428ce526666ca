"""neurohand evaluate: the JSON it prints, and that its device-style streaming decode equals an
offline decode of the same model."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.train.model import ModelConfig, build_model  # noqa: E402
from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.train import evaluate, trainer  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate")
    recording = str(make_recording(base / "r.nhr", seconds=60.0, seed=5))
    run_dir = str(base / "run")
    # A raw-ish window/stride that does not divide the segment lengths, so partial windows occur.
    config = dict(TINY_CONFIG, pipeline={"window_s": 0.17, "stride_s": 0.03})
    trainer.train_run([recording], run_dir, config, seed=1, progress=False)
    return run_dir, recording


def test_evaluate_json_has_the_promised_keys(run, capsys):
    run_dir, recording = run
    assert cli.main(["evaluate", run_dir, recording, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["mean_r2"], float) and len(result["r2"]) == 3
    assert len(result["pearson_r"]) == 3 and len(result["rmse"]) == 3
    for name in ("wiener", "kalman"):
        assert isinstance(result["baselines"][name]["mean_r2"], float)
        assert len(result["baselines"][name]["r2"]) == 3
    assert result["decode"]["backend"] == "numpy" and result["decode"]["causal"] is True
    # The training run scored the same test split offline with torch: same numbers.
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        offline = json.load(handle)["scores"]["test"]
    assert result["n_steps"] == offline["n_steps"]
    np.testing.assert_allclose(result["r2"], offline["r2"], atol=1e-4)


def test_streaming_decode_equals_offline_decode(run):
    run_dir, recording = run
    config, onnx_path = evaluate.load_run(run_dir)
    pipeline, rec, (_, segments), sequences = evaluate.prepare(config, recording)
    test_segments = [s for s in segments if s.split == "test"]
    # Odd block size: windows complete in the middle of blocks and across block edges.
    streamed = evaluate.stream_decode(pipeline, onnx_path, rec, test_segments, block_samples=7)
    model = build_model(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"])
    offline = trainer.decode_offline(model, sequences["test"], torch.device("cpu"))
    assert len(streamed) == len(offline) == len(sequences["test"]) >= 2
    for (outputs, ends), expected, sequence in zip(streamed, offline, sequences["test"]):
        np.testing.assert_array_equal(ends, sequence.ends)
        np.testing.assert_allclose(outputs, expected, atol=1e-5)


def test_human_readable_table(run, capsys):
    run_dir, recording = run
    assert cli.main(["evaluate", run_dir, recording, "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("decoder") and "rnn" in out and "wiener" not in out


def test_evaluate_refuses_a_recording_of_another_shape(run, tmp_path, capsys):
    run_dir, _ = run
    other = make_recording(tmp_path / "other.nhr", seconds=30.0, n_channels=5)
    assert cli.main(["evaluate", run_dir, str(other)]) == 2
    err = capsys.readouterr().err
    assert "5 channels" in err and err.count("\n") == 1


def test_evaluate_classifies_movements_with_the_lda_baseline(run, tmp_path, capsys):
    run_dir, _ = run
    recording = str(make_recording(tmp_path / "moves.nhr", seconds=60.0, seed=5, movements=True))
    assert cli.main(["evaluate", run_dir, recording, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    classes = result["baselines"]["lda"]
    n = len(classes["classes"])
    assert n >= 2 and np.array(classes["confusion"]).shape == (n, n)
    assert 0.0 <= classes["balanced_accuracy"] <= 1.0 and 0.0 <= classes["accuracy"] <= 1.0
    assert sum(map(sum, classes["confusion"])) == classes["n_steps"] == result["n_steps"]
    assert cli.main(["evaluate", run_dir, recording]) == 0
    assert "movement classes, lda (" in capsys.readouterr().out
    # A recording without movement events has no classes to score.
    assert cli.main(["evaluate", run_dir, run[1], "--json"]) == 0
    assert "lda" not in json.loads(capsys.readouterr().out)["baselines"]


def test_tcn_is_one_recording_at_a_time(run, capsys):
    run_dir, recording = run
    assert cli.main(["evaluate", run_dir, recording, recording, "--tcn"]) == 2
    assert "--tcn" in capsys.readouterr().err
