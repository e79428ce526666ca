"""An ensemble trained one member after another (training ensemble_training "separate", docs/training.md
"R² levers"): each member an ordinary run, merged into the one model a joint ensemble exports."""
import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.decoder.backends import create_backend  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import trainer  # noqa: E402
from neurohand.train.model import ModelConfig, build_model, ensemble_masks, merge_members  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402

MEMBERS = 2
SEED = 1


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return str(make_recording(tmp_path_factory.mktemp("rec") / "r.nhr", seconds=60.0, movements=True))


def config(**training):
    values = copy.deepcopy(TINY_CONFIG)
    values["model"] = {"hidden_size": 8, "num_layers": 2, "input_projection": 6, "dropout": 0.1}
    values["training"].update(training)
    return values


SEPARATE = config(ensemble=MEMBERS, ensemble_training="separate")


@pytest.fixture(scope="module")
def separate(recording, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("separate") / "run")
    summary = trainer.train_run([recording], run_dir, SEPARATE, seed=SEED, progress=False, light=True)
    return run_dir, summary


def best_weights(run_dir):
    return trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"]


def run_model(run_dir):
    with open(os.path.join(run_dir, "config.json")) as handle:
        model = build_model(ModelConfig.from_dict(json.load(handle)["model"]))
    model.load_state_dict(best_weights(run_dir))
    return model.eval()


def test_members_are_ordinary_runs_and_the_export_outputs_their_mean_logit(recording, separate, tmp_path):
    run_dir, summary = separate
    alone = []
    for k, member in enumerate(summary["ensemble_members"]):
        assert member["seed"] == SEED * MEMBERS + k
        plain = trainer.train_run([recording], str(tmp_path / str(k)), config(), seed=member["seed"], progress=False,
                                  light=True)
        assert member["mean_r2"]["test"] == plain["scores"]["test"]["mean_r2"]
        assert member["epochs_run"] == plain["epochs_run"] and member["best_epoch"] == plain["best_epoch"]
        alone.append(run_model(str(tmp_path / str(k))))
    wide = run_model(run_dir)
    assert wide.config.hidden_size == 8 * MEMBERS and wide.config.input_projection == 6 * MEMBERS
    assert wide.config.class_names and summary["class_names"] == wide.config.class_names     # the class head
    for name, mask in ensemble_masks(wide, MEMBERS).items():
        assert float(wide.state_dict()[name][mask == 0].abs().max()) == 0.0, name
    features = np.random.default_rng(0).normal(size=(40, wide.config.n_features)).astype(np.float32)
    with torch.no_grad():
        logits = torch.stack([m(torch.from_numpy(features)[None], logits=True)[0][0] for m in alone]).mean(0)
    expected = torch.sigmoid(logits).numpy()
    for backend_name in ("numpy", "onnxruntime"):
        backend = create_backend(backend_name, os.path.join(run_dir, "model.onnx"))
        state, got = backend.initial_state(), []
        for row in features:
            out, state = backend.step(row, state)
            got.append(out)
        np.testing.assert_allclose(np.array(got), expected, atol=1e-5, err_msg=backend_name)
    # The merged model is what metrics.json scores; its history holds every member's epochs.
    assert summary["epochs_run"] == sum(m["epochs_run"] for m in summary["ensemble_members"])
    assert summary["history"]["epoch"] == list(range(1, summary["epochs_run"] + 1))
    assert summary["scores"]["test"]["mean_r2"] != summary["ensemble_members"][0]["mean_r2"]["test"]


def test_same_seed_same_weights(recording, separate, tmp_path):
    run_dir, _ = separate
    trainer.train_run([recording], str(tmp_path / "again"), SEPARATE, seed=SEED, progress=False, light=True)
    first, second = best_weights(run_dir), best_weights(str(tmp_path / "again"))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_members_share_the_time_budget(recording, tmp_path):
    # A budget far below one epoch: every member stops on its share after its first batch, and still counts.
    summary = trainer.train_run([recording], str(tmp_path / "run"), dict(SEPARATE, training=dict(
        SEPARATE["training"], max_minutes=1e-6)), seed=0, progress=False, light=True)
    assert [m["stopped"] for m in summary["ensemble_members"]] == ["time budget"] * MEMBERS
    assert summary["stopped"] == "time budget" and summary["epochs_run"] == MEMBERS


def test_resume_is_refused_in_one_line(recording, separate):
    run_dir, _ = separate
    with pytest.raises(UsageError, match="cannot be resumed"):
        trainer.train_run([recording], run_dir, SEPARATE, seed=SEED, progress=False, resume=True, light=True)


def test_setting_is_checked_and_joint_keeps_the_digest():
    settings = trainer.resolve_settings({}, "envelope")
    with pytest.raises(UsageError, match="ensemble_training must be one of 'joint', 'separate'"):
        trainer.check_training(dict(settings["training"], ensemble_training="apart"))
    without = copy.deepcopy(settings)
    without["training"].pop("ensemble_training")
    assert trainer.settings_digest(settings, [], 0) == trainer.settings_digest(without, [], 0)
    separate = dict(settings, training=dict(settings["training"], ensemble_training="separate"))
    assert trainer.settings_digest(separate, [], 0) != trainer.settings_digest(settings, [], 0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_models_without_a_projection_merge(cell):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(ModelConfig(5, 3, cell, 4, 2, None)).eval())
    wide = merge_members(models).eval()
    x = torch.randn(2, 25, 5)
    with torch.no_grad():
        expected = torch.stack([m(x, logits=True)[0] for m in models]).mean(0)
        np.testing.assert_allclose(wide(x, logits=True)[0].numpy(), expected.numpy(), atol=1e-5)
