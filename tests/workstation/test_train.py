"""Training end to end on tiny synthetic recordings: outputs, ONNX parity, determinism, resume, CLI errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.decoder.backends import create_backend  # noqa: E402
from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.train.model import ModelConfig, build_model  # noqa: E402
from neurohand.decoder.pipeline import FeaturePipeline  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import trainer  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return str(make_recording(tmp_path_factory.mktemp("rec") / "r.nhr", seconds=60.0))


@pytest.fixture(scope="module")
def trained(recording, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "run")
    summary = trainer.train_run([recording], run_dir, TINY_CONFIG, seed=3, progress=False)
    return run_dir, summary


def best_weights(run_dir):
    return trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"]


def test_run_directory_holds_every_output(trained):
    run_dir, summary = trained
    for name in ("config.json", "checkpoint.pt", "model.onnx", "model_plain.onnx", "metrics.json", "report.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    with open(os.path.join(run_dir, "config.json")) as handle:
        config = json.load(handle)
    pipeline = FeaturePipeline.from_config(config["pipeline"])
    assert pipeline.normalisation is not None and pipeline.mode == "envelope"
    assert config["labels"]["names"] == ["f0", "f1", "f2"] and config["labels"]["scaling"] == {"kind": "none"}
    assert config["split"]["recordings"][0]["method"] == "repetition"
    assert ModelConfig.from_dict(config["model"]).hidden_size == 8
    with open(os.path.join(run_dir, "metrics.json")) as handle:
        saved = json.load(handle)
    assert saved == summary
    for split in ("train", "validation", "test"):
        assert len(saved["scores"][split]["r2"]) == 3
    assert len(saved["history"]["validation_r2"]) == saved["epochs_run"] == 2
    with open(os.path.join(run_dir, "report.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_onnx_model_steps_like_the_trained_weights(trained):
    run_dir, _ = trained
    with open(os.path.join(run_dir, "config.json")) as handle:
        config = json.load(handle)
    model = build_model(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(best_weights(run_dir))
    model.eval()
    features = np.random.default_rng(0).normal(size=(60, model.config.n_features)).astype(np.float32)
    with torch.no_grad():
        expected, _ = model(torch.from_numpy(features)[None])
    backend = create_backend("numpy", os.path.join(run_dir, "model.onnx"))
    state = backend.initial_state()
    got = []
    for row in features:
        out, state = backend.step(row, state)
        got.append(out)
    np.testing.assert_allclose(np.array(got), expected[0].numpy(), atol=1e-5)


def test_same_seed_same_weights_other_seed_other_weights(recording, trained, tmp_path):
    run_dir, summary = trained
    again = trainer.train_run([recording], str(tmp_path / "again"), TINY_CONFIG, seed=3, progress=False)
    first, second = best_weights(run_dir), best_weights(str(tmp_path / "again"))
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert again["history"]["train_loss"] == summary["history"]["train_loss"]
    trainer.train_run([recording], str(tmp_path / "other"), TINY_CONFIG, seed=4, progress=False)
    other = best_weights(str(tmp_path / "other"))
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_resume_continues_exactly(recording, trained, tmp_path):
    run_dir, summary = trained
    one_epoch = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], epochs=1))
    trainer.train_run([recording], str(tmp_path / "part"), one_epoch, seed=3, progress=False)
    resumed = trainer.train_run([recording], str(tmp_path / "part"), TINY_CONFIG, seed=3, progress=False,
                                resume=True)
    assert resumed["history"]["train_loss"] == summary["history"]["train_loss"]
    assert resumed["history"]["validation_r2"] == summary["history"]["validation_r2"]
    full = trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    part = trainer.load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))
    for key in full["model"]:
        assert torch.equal(full["model"][key], part["model"][key]), key
    # Other settings than the checkpoint's are refused, not silently mixed.
    changed = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], learning_rate=0.1))
    with pytest.raises(UsageError, match="other settings"):
        trainer.train_run([recording], str(tmp_path / "part"), changed, seed=3, progress=False, resume=True)


def test_checkpoint_loads_with_weights_only(trained):
    run_dir, _ = trained
    document = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert document["state"]["epoch"] == 2
    assert set(document) >= {"model", "optimizer", "best_model", "state", "settings_digest"}


def test_glove_labels_are_scaled_to_0_1_with_training_extremes(tmp_path):
    path = make_recording(tmp_path / "glove.nhr", seconds=40.0, label_stream="glove")
    # Rewrite nothing: make_recording's labels are in 0..1, so ask for minmax explicitly.
    config = dict(TINY_CONFIG, labels={"scaling": "minmax"}, training=dict(TINY_CONFIG["training"], epochs=1))
    trainer.train_run([str(path)], str(tmp_path / "run"), config, seed=0, progress=False)
    with open(tmp_path / "run" / "config.json") as handle:
        scaling = json.load(handle)["labels"]["scaling"]
    assert scaling["kind"] == "minmax" and len(scaling["minimum"]) == 3
    assert all(lo < hi for lo, hi in zip(scaling["minimum"], scaling["maximum"]))


def test_time_split_when_there_are_no_repetitions(tmp_path):
    path = make_recording(tmp_path / "norep.nhr", seconds=40.0, repetitions=False)
    config = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], epochs=1))
    trainer.train_run([str(path)], str(tmp_path / "run"), config, seed=0, progress=False)
    with open(tmp_path / "run" / "config.json") as handle:
        split = json.load(handle)["split"]
    described = split["recordings"][0]
    assert described["method"] == "time"
    assert described["validation"]["ranges"][0][0] - described["train"]["ranges"][0][1] == split["guard_samples"]
    assert described["test"]["ranges"][0][0] - described["validation"]["ranges"][0][1] == split["guard_samples"]


def test_cli_train_errors_are_one_line(recording, trained, tmp_path, capsys):
    run_dir, _ = trained
    (tmp_path / "bad.json").write_text('{"model": {"hiden_size": 4}}')
    (tmp_path / "notjson.json").write_text("{")
    cases = [
        (["train", tmp_path / "absent.nhr", "--out", tmp_path / "a"], "does not exist"),
        (["train", recording, "--out", tmp_path / "b", "--config", tmp_path / "bad.json"], "did you mean 'hidden_size'"),
        (["train", recording, "--out", tmp_path / "c", "--config", tmp_path / "notjson.json"], "not valid JSON"),
        (["train", recording, "--out", run_dir], "already holds a run"),
        (["train", recording, "--out", tmp_path / "d", "--resume"], "holds no checkpoint.pt"),
        (["evaluate", tmp_path, recording], "not a finished training run"),
    ]
    # In-process through the CLI's main() (what the console script runs), so torch loads once.
    for args, message in cases:
        assert cli.main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert err.count("\n") == 1, err
    # And once as a real process: exit status 2, no traceback.
    result = run_cli(*cases[1][0])
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_settings_resolution_per_mode():
    envelope = trainer.resolve_settings({}, "envelope")
    raw = trainer.resolve_settings({"model": {"hidden_size": 32}}, "raw")
    assert envelope["pipeline"]["mode"] == "envelope" and raw["pipeline"]["mode"] == "raw"
    assert raw["model"]["hidden_size"] == 32
    forced = trainer.resolve_settings({"pipeline": {"mode": "raw"}}, "envelope")
    assert forced["mode"] == "raw"
    with pytest.raises(UsageError, match="training setting"):
        trainer.resolve_settings({"training": {"epoch": 3}}, "raw")


def test_pieces_cover_each_sequence_once():
    rng = np.random.default_rng(0)
    pieces = trainer.cut_pieces([1000, 30, 250], 100, rng)
    for index, n in enumerate([1000, 30, 250]):
        mine = sorted((a, b) for i, a, b in pieces if i == index)
        assert mine[0][0] == 0 and mine[-1][1] == n
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(mine[:-1], mine[1:]))
        assert all(b - a >= min(50, n) for a, b in mine)
    batches = trainer.plan_epoch([1000, 30, 250], {"sequence_s": 1.0, "batch_size": 3}, 100.0, 0, 1, 4)
    assert len(batches) % 4 == 0
