"""The movement-class head: model config, class targets, training, export (parity and metadata), evaluate."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.decoder.onnx_weights import load_rnn_weights  # noqa: E402
from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import dataset, evaluate, trainer  # noqa: E402
from neurohand.train.model import ModelConfig, build_model  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("class_head")
    recording = str(make_recording(base / "moves.nhr", seconds=60.0, seed=5, movements=True))
    run_dir = str(base / "run")
    summary = trainer.train_run([recording], run_dir, TINY_CONFIG, seed=1, progress=False)
    return run_dir, recording, summary


# --- model config ---------------------------------------------------------------------

def test_a_model_config_without_class_names_loads_as_before():
    old = {"n_features": 4, "n_outputs": 3, "cell": "gru", "hidden_size": 8, "num_layers": 1,
           "input_projection": None, "dropout": 0.0}
    config = ModelConfig.from_dict(old)
    assert config.class_names == [] and config.output_width == 3
    assert build_model(config).head.out_features == 3


def test_the_head_widens_the_output_layer_and_keeps_n_outputs_the_positions():
    config = ModelConfig(n_features=4, n_outputs=3, hidden_size=8, num_layers=1, class_names=["rest", "1", "2"])
    assert config.n_outputs == 3 and config.output_width == 6
    assert ModelConfig.from_dict(config.to_dict()) == config
    model = build_model(config).eval()
    x = torch.randn(1, 5, 4)
    outputs, _ = model(x)
    logits, _ = model(x, logits=True)
    assert outputs.shape == (1, 5, 6)
    # The whole output goes through the sigmoid; the class scores' argmax is the softmax's.
    torch.testing.assert_close(outputs, torch.sigmoid(logits))
    assert torch.equal(outputs[..., 3:].argmax(-1), torch.softmax(logits[..., 3:], -1).argmax(-1))


@pytest.mark.parametrize("names", [["rest"], ["rest", "rest"], ["rest", ""], ["rest", " 1"], "rest", [1, 2]])
def test_bad_class_names_are_refused(names):
    with pytest.raises(UsageError, match="class_names"):
        ModelConfig(n_features=4, n_outputs=3, class_names=names)


# --- class targets and loss ---------------------------------------------------------------

def test_class_head_from_the_training_steps_balances_the_classes(tmp_path):
    recording = str(make_recording(tmp_path / "m.nhr", seconds=60.0, movements=True))
    prepared = trainer.prepare([recording], TINY_CONFIG)
    head = prepared.class_head
    assert head.values == [0, 1, 2] and head.names == ["rest", "1", "2"]
    targets = np.concatenate(prepared.class_targets["train"])
    counts = np.bincount(targets, minlength=3)
    weights = np.asarray(head.weights)
    # 1/frequency, mean 1 over the training steps.
    assert np.isclose(np.sum(weights * counts) / counts.sum(), 1.0)
    assert np.allclose(weights * counts, weights[0] * counts[0])
    # Targets follow the causal rule of train/classes.py, unshifted by target_lead_s.
    sequence = prepared.sequences["train"][0]
    from neurohand.train.classes import step_classes
    rec = prepared.recordings[0]
    expected = head.indices(step_classes(rec.events, sequence.ends))
    np.testing.assert_array_equal(prepared.class_targets["train"][0], expected)


def test_auto_means_no_head_without_movement_events_and_true_refuses(tmp_path):
    recording = str(make_recording(tmp_path / "plain.nhr", seconds=60.0))
    assert trainer.prepare([recording], TINY_CONFIG).class_head is None
    config = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], class_head=True))
    with pytest.raises(UsageError, match="class_head is true.*movement"):
        trainer.prepare([recording], config)
    off = dict(TINY_CONFIG, training=dict(TINY_CONFIG["training"], class_head=False))
    moves = str(make_recording(tmp_path / "m.nhr", seconds=60.0, movements=True))
    assert trainer.prepare([moves], off).class_head is None


@pytest.mark.parametrize("key, value, message", [
    ("class_head", "yes", "class_head"), ("class_head", 1, "class_head"), ("class_weight", 0, "class_weight"),
    ("class_weight", 1000, "class_weight"), ("class_balance", "no", "class_balance")])
def test_bad_class_settings_are_one_line_errors(key, value, message):
    with pytest.raises(UsageError, match=message) as error:
        trainer.resolve_settings({"training": {key: value}}, "envelope")
    assert "\n" not in str(error.value)


def test_class_names_from_metadata_when_short_and_distinct():
    assert dataset.class_names_for([0, 1, 2], {"movement_names": {"1": "index flex", "2": "thumb"}}) == \
        ["rest", "index flex", "thumb"]
    assert dataset.class_names_for([0, 1, 2], {"movement_names": ["", "a", "a"]}) == ["rest", "1", "2"]
    assert dataset.class_names_for([0, 3], {}) == ["rest", "3"]


def test_cross_entropy_leaves_out_steps_without_a_class_and_weighs_classes():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]]])
    classes = torch.tensor([[0, 0, dataset.NO_CLASS]])
    plain = trainer.masked_cross_entropy(logits, classes)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], classes[0, :2])
    torch.testing.assert_close(plain, expected)
    weighted = trainer.masked_cross_entropy(logits, classes, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(weighted, 2.0 * expected)


def test_the_digest_of_a_run_without_head_ignores_the_class_settings():
    settings = trainer.resolve_settings({}, "envelope")
    other = trainer.resolve_settings({"training": {"class_weight": 0.5}}, "envelope")
    assert trainer.settings_digest(settings, [], 0) == trainer.settings_digest(other, [], 0)
    head = dataset.ClassHead([0, 1], ["rest", "1"])
    assert trainer.settings_digest(settings, [], 0, class_head=head) != \
        trainer.settings_digest(other, [], 0, class_head=head)


def test_training_state_with_classes_round_trips_and_refuses_a_history_without_them():
    state = trainer.TrainingState(1e-3, classes=True)
    state.record_epoch([(0.1, 0.9), (0.2, None)], {"loss": 0.1, "mean_r2": 0.5,
                                                   "classes": {"accuracy": 0.6, "balanced_accuracy": 0.4}}, 2)
    assert state.history["train_class_loss"] == [0.9] and state.history["validation_balanced_accuracy"] == [0.4]
    again = trainer.TrainingState(1e-3, classes=True)
    again.load_dict(state.to_dict())
    assert again.history == state.history
    plain = trainer.TrainingState(1e-3)
    with pytest.raises(Exception, match="history"):
        plain.load_dict(state.to_dict())


# --- training, export, evaluate -----------------------------------------------------------

def test_head_trains_and_exports_with_parity_and_metadata(head_run):
    run_dir, _, summary = head_run
    assert summary["class_names"] == ["rest", "1", "2"]
    assert summary["onnx"]["max_abs_error"]["onnxruntime"] < 1e-5
    assert 0.0 <= summary["scores"]["test"]["classes"]["balanced_accuracy"] <= 1.0
    assert len(summary["history"]["validation_balanced_accuracy"]) == summary["epochs_run"]
    weights = load_rnn_weights(os.path.join(run_dir, "model.onnx"))
    assert weights.class_names == ("rest", "1", "2") and weights.n_positions == 3 and weights.n_outputs == 6
    with open(os.path.join(run_dir, "config.json")) as handle:
        config = json.load(handle)
    assert config["classes"]["values"] == [0, 1, 2] and config["model"]["class_names"] == ["rest", "1", "2"]
    import onnx
    metadata = {p.key: p.value for p in onnx.load(os.path.join(run_dir, "model_plain.onnx")).metadata_props}
    assert json.loads(metadata["neurohand.model_config"])["class_names"] == ["rest", "1", "2"]


def test_evaluate_reports_the_class_head_next_to_the_lda(head_run, capsys):
    run_dir, recording, _ = head_run
    png = os.path.join(run_dir, "confusion.png")
    assert cli.main(["evaluate", run_dir, recording, "--json", "--confusion-png", png]) == 0
    result = json.loads(capsys.readouterr().out)
    classes = result["classes"]
    assert classes["class_names"] == ["rest", "1", "2"]
    assert np.array(classes["confusion"]).shape == (3, 3)
    assert sum(map(sum, classes["confusion"])) == classes["n_steps"] == result["n_steps"]
    for key in ("accuracy", "balanced_accuracy", "trial_accuracy"):
        assert 0.0 <= classes[key] <= 1.0
    assert set(classes["recall_by_class"]) == {"rest", "1", "2"}
    assert 0.0 <= result["baselines"]["lda"]["balanced_accuracy"] <= 1.0
    # The positions are scored alone: as many R² as label columns.
    assert len(result["r2"]) == 3
    with open(png, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["evaluate", run_dir, recording, "--no-baselines"]) == 0
    assert "movement classes, rnn (3 classes)" in capsys.readouterr().out


def test_confusion_png_never_replaces_an_input(head_run, capsys):
    run_dir, recording, _ = head_run
    for target in (recording, os.path.join(run_dir, "model.onnx")):
        before = os.path.getsize(target)
        assert cli.main(["evaluate", run_dir, recording, "--no-baselines", "--confusion-png", target]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert os.path.getsize(target) == before


def test_streamed_class_scores_equal_torch(head_run):
    run_dir, recording, _ = head_run
    config, onnx_path = evaluate.load_run(run_dir)
    pipeline, rec, (_, segments), sequences = evaluate.prepare(config, recording)
    test_segments = [s for s in segments if s.split == "test"]
    positions = evaluate.stream_decode(pipeline, onnx_path, rec, test_segments, block_samples=7)
    streamed = evaluate.stream_decode(pipeline, onnx_path, rec, test_segments, block_samples=7, class_scores=True)
    model = build_model(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"])
    offline = trainer.decode_offline(model, sequences["test"], torch.device("cpu"))
    for (outputs, _), (only, _), expected in zip(streamed, positions, offline):
        assert outputs.shape[1] == 6 and only.shape[1] == 3
        np.testing.assert_allclose(outputs, expected, atol=1e-5)
        np.testing.assert_array_equal(only, outputs[:, :3])


def test_fine_tuning_keeps_the_head_and_its_mapping(head_run, tmp_path):
    run_dir, recording, _ = head_run
    config = {"training": {"epochs": 1}}
    summary = trainer.train_run([recording], str(tmp_path / "tuned"), config, seed=0, progress=False,
                                init_from=run_dir, light=True)
    assert summary["class_names"] == ["rest", "1", "2"]
    # A new day without movement events: its steps count in no class loss (they would all read rest).
    plain = str(make_recording(tmp_path / "plain.nhr", seconds=60.0, seed=5))
    prepared = trainer.prepare([plain], config, trainer.load_init_from(run_dir))
    assert prepared.class_head.names == ["rest", "1", "2"]
    assert all((t == dataset.NO_CLASS).all() for t in prepared.class_targets["train"])
    off = {"training": {"epochs": 1, "class_head": False}}
    with pytest.raises(UsageError, match="has a class head"):
        trainer.train_run([recording], str(tmp_path / "off"), off, seed=0, progress=False, init_from=run_dir)
