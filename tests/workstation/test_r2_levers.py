"""Training levers for held-out R² (docs/training.md, "R² levers"): weight averaging, time warping and an
ensemble trained as one block-diagonal RNN that exports as an ordinary one."""
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
from neurohand.train.model import (ModelConfig, build_model, ensemble_masks, init_ensemble,  # noqa: E402
                                   is_block_diagonal, member_forward, merge_members)
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402

ENSEMBLE_MODEL = {"hidden_size": 8, "num_layers": 2, "input_projection": 6, "dropout": 0.0}


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return str(make_recording(tmp_path_factory.mktemp("rec") / "r.nhr", seconds=60.0, movements=True))


def tiny(**training):
    config = copy.deepcopy(TINY_CONFIG)
    config["training"].update(training)
    return config


def member_model(wide, k, members):
    """Member k of a masked ensemble as a model of its own (its blocks of every layer)."""
    c = wide.config
    h, p = c.hidden_size // members, c.input_projection // members
    small = build_model(ModelConfig(c.n_features, c.n_outputs, c.cell, h, c.num_layers, p, 0.0, c.class_names))
    units = np.concatenate([g * c.hidden_size + np.arange(k * h, (k + 1) * h) for g in range(3)])
    wide_state, state = wide.state_dict(), {}
    for name, value in small.state_dict().items():
        big = wide_state[name]
        if name.startswith("projection."):
            state[name] = big[k * p:(k + 1) * p]
        elif name.startswith("rnn.weight_ih_l0"):
            state[name] = big[units][:, k * p:(k + 1) * p]
        elif name.startswith("rnn.weight"):
            state[name] = big[units][:, k * h:(k + 1) * h]
        elif name.startswith("rnn.bias"):
            state[name] = big[units]
        elif name == "head.weight":
            state[name] = members * big[:, k * h:(k + 1) * h]
        else:
            state[name] = big
    small.load_state_dict(state)
    return small.eval()


def masked_ensemble(members=3, seed=0, class_names=()):
    torch.manual_seed(seed)
    config = ModelConfig(5, 3, hidden_size=4 * members, num_layers=2, input_projection=2 * members,
                         class_names=class_names)
    model = build_model(config)
    masks = ensemble_masks(model, members)
    init_ensemble(model, masks, members)
    return model.eval(), masks


def test_masked_model_is_its_members_with_the_mean_logit():
    members = 3
    model, masks = masked_ensemble(members, class_names=["rest", "a"])
    x = torch.randn(2, 30, 5)
    with torch.no_grad():
        logits, _ = model(x, logits=True)
        per_member, _ = model(x, members=members)
        alone = [member_model(model, k, members)(x, logits=True)[0] for k in range(members)]
    assert per_member.shape == (2, 30, members, model.config.output_width)
    for k in range(members):
        np.testing.assert_allclose(per_member[:, :, k].numpy(), alone[k].numpy(), atol=1e-5)
    np.testing.assert_allclose(logits.numpy(), torch.stack(alone).mean(0).numpy(), atol=1e-5)
    # The members differ (a mask that let them share units would make them copies of one another or wrong).
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    assert set(masks) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_separately_trained_models_merge_into_one_that_outputs_their_mean_logit(cell):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_model(ModelConfig(5, 3, cell, 4, 2, 3, class_names=["rest", "a"])).eval())
    wide = merge_members(models).eval()
    assert wide.config.hidden_size == 12 and wide.config.input_projection == 9
    x = torch.randn(2, 25, 5)
    with torch.no_grad():
        expected = torch.stack([m(x, logits=True)[0] for m in models]).mean(0)
        np.testing.assert_allclose(wide(x, logits=True)[0].numpy(), expected.numpy(), atol=1e-5)
        for k in range(3):       # the member view of the merged model is each model, with the bias shared
            shift = wide.head.bias - models[k].head.bias
            np.testing.assert_allclose(wide(x, members=3)[0][:, :, k].numpy(),
                                       (models[k](x, logits=True)[0] + shift).numpy(), atol=1e-5)
    weights = wide.state_dict()
    for name, mask in ensemble_masks(wide, 3).items():
        assert float(weights[name][mask == 0].abs().max()) == 0.0, name


def test_members_reading_their_own_sequences_each_run_as_alone():
    members = 3
    model, _ = masked_ensemble(members)
    x = torch.randn(2, 20, members, 5)
    with torch.no_grad():
        apart, _ = model(x, members=members)
        for k in range(members):
            alone, _ = member_model(model, k, members)(x[:, :, k], logits=True)
            np.testing.assert_allclose(apart[:, :, k].numpy(), alone.numpy(), atol=1e-5)


def _gradients(model, masks, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad * masks.get(name, 1) for name, p in model.named_parameters()}


@pytest.mark.parametrize("cell,projection", [("gru", 6), ("gru", None), ("lstm", 6), ("lstm", None)])
def test_members_run_one_by_one_compute_the_wide_model(cell, projection):
    """The trainer's two ways of running a block-diagonal ensemble without its blocks of zeros (the
    recurrent layers member by member, and each member a graph of its own) give the wide model's outputs,
    states and in-block gradients, and no gradient between the members."""
    members = 3
    torch.manual_seed(5)
    model = build_model(ModelConfig(5, 3, cell, 4 * members, 2, projection, class_names=["rest", "a"]))
    masks = ensemble_masks(model, members)
    init_ensemble(model, masks, members)
    assert is_block_diagonal(model, masks)
    x = torch.randn(2, 15, 5)
    wide, wide_state = model(x, members=members)
    wide_gradients = _gradients(model, masks, (wide ** 2).mean())
    model.block_members = members
    apart, apart_state = model(x, members=members)
    apart_gradients = _gradients(model, masks, (apart ** 2).mean())
    runs = [member_forward(model, members, k, x, None) for k in range(members)]
    alone = torch.stack([logits for logits, _ in runs], dim=2)
    alone_gradients = _gradients(model, masks, (alone ** 2).mean())
    h = 4
    for k, (_, state) in enumerate(runs):
        units = slice(k * h, (k + 1) * h)
        for got, expected in zip(state if cell == "lstm" else [state],
                                 wide_state if cell == "lstm" else [wide_state]):
            np.testing.assert_allclose(got.detach().numpy(), expected[..., units].detach().numpy(), atol=1e-6)
    for got in (apart, alone):
        np.testing.assert_allclose(got.detach().numpy(), wide.detach().numpy(), atol=1e-6)
    for got in (apart_gradients, alone_gradients):
        for name in wide_gradients:
            np.testing.assert_allclose(got[name].numpy(), wide_gradients[name].numpy(), atol=1e-6, err_msg=name)
    for name, mask in masks.items():
        raw = dict(model.named_parameters())[name].grad
        assert float((raw * (1 - mask)).abs().max()) == 0.0, name
    # A wide model that is not block-diagonal (e.g. fine-tuned from a plain run) is not taken for one.
    with torch.no_grad():
        model.rnn.weight_hh_l0[0, -1] = 0.5
    assert not is_block_diagonal(model, masks)


def test_ensemble_training_is_the_same_on_one_or_two_threads_and_as_the_wide_model(recording, tmp_path,
                                                                                  monkeypatch):
    config = tiny(ensemble=2, epochs=1)
    config["model"] = dict(ENSEMBLE_MODEL, dropout=0.2)
    runs = {}
    for threads in (1, 2):
        runs[threads] = trainer.train_run([recording], str(tmp_path / str(threads)), config, seed=3, progress=False,
                                          threads=threads, light=True)
    assert runs[1]["history"] == dict(runs[2]["history"], seconds=runs[1]["history"]["seconds"])
    one = trainer.load_checkpoint(str(tmp_path / "1" / "checkpoint.pt"))["model"]
    two = trainer.load_checkpoint(str(tmp_path / "2" / "checkpoint.pt"))["model"]
    assert all(torch.equal(one[name], two[name]) for name in one)
    # Without dropout (whose masks are drawn in another order) the wide model's one graph takes the same
    # descent; it is what runs when the members cannot be run one by one.
    config["model"]["dropout"] = 0.0
    fast = trainer.train_run([recording], str(tmp_path / "fast"), config, seed=3, progress=False, light=True)
    monkeypatch.setattr(trainer, "is_block_diagonal", lambda model, masks: False)
    wide = trainer.train_run([recording], str(tmp_path / "wide"), config, seed=3, progress=False, light=True)
    np.testing.assert_allclose(fast["history"]["train_loss"], wide["history"]["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(fast["history"]["validation_r2"], wide["history"]["validation_r2"], rtol=1e-3)


def test_members_draw_their_own_pieces():
    settings = {"sequence_s": 1.0, "batch_size": 2}
    first = trainer.plan_epoch([500, 700], settings, 50.0, seed=0, epoch=1, world_size=1)
    assert trainer.plan_epoch([500, 700], settings, 50.0, seed=0, epoch=1, world_size=1, stream=0) == first
    assert trainer.plan_epoch([500, 700], settings, 50.0, seed=0, epoch=1, world_size=1, stream=1) != first


def test_widths_must_split_into_members():
    model = build_model(ModelConfig(5, 3, hidden_size=10, input_projection=6))
    with pytest.raises(UsageError, match="hidden_size"):
        ensemble_masks(model, 3)
    assert ensemble_masks(model, 1) == {}


def test_ensemble_run_keeps_members_apart_and_exports_their_mean(recording, tmp_path):
    members = 2
    config = tiny(ensemble=members)
    config["model"] = dict(ENSEMBLE_MODEL)
    run_dir = str(tmp_path / "run")
    trainer.train_run([recording], run_dir, config, seed=1, progress=False, light=True)
    weights = trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"]
    saved = _run_config(run_dir)
    # The settings describe one member; the model (config.json, ONNX) is the members side by side.
    assert saved["settings"]["model"]["hidden_size"] == 8 and saved["model"]["hidden_size"] == 8 * members
    assert saved["model"]["input_projection"] == 6 * members
    wide = build_model(ModelConfig.from_dict(saved["model"]))
    wide.load_state_dict(weights)
    wide.eval()
    for name, mask in ensemble_masks(wide, members).items():
        assert float(weights[name][mask == 0].abs().max()) == 0.0, name
    features = np.random.default_rng(0).normal(size=(40, wide.config.n_features)).astype(np.float32)
    with torch.no_grad():
        alone = [member_model(wide, k, members)(torch.from_numpy(features)[None], logits=True)[0][0]
                 for k in range(members)]
    expected = torch.sigmoid(torch.stack(alone).mean(0)).numpy()
    backend = create_backend("numpy", os.path.join(run_dir, "model.onnx"))
    state, got = backend.initial_state(), []
    for row in features:
        out, state = backend.step(row, state)
        got.append(out)
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)


def _run_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as handle:
        return json.load(handle)


def test_weight_average_is_validated_kept_and_resumed(recording, tmp_path):
    config = tiny(ema_decay=0.9, epochs=2)
    full = trainer.train_run([recording], str(tmp_path / "full"), config, seed=2, progress=False, light=True)
    plain = trainer.train_run([recording], str(tmp_path / "plain"), tiny(epochs=2), seed=2, progress=False,
                              light=True)
    # Same descent (the average does not feed back), other weights validated.
    assert full["history"]["train_loss"] == plain["history"]["train_loss"]
    assert full["history"]["validation_r2"] != plain["history"]["validation_r2"]
    document = trainer.load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    assert any(not torch.equal(document["model"][k], v) for k, v in document["average"]["weights"].items())
    trainer.train_run([recording], str(tmp_path / "part"), tiny(ema_decay=0.9, epochs=1), seed=2, progress=False,
                      light=True)
    part = trainer.load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))
    for key, value in part["average"]["weights"].items():      # epoch 1 is the best so far: the average is kept
        assert torch.equal(part["best_model"][key], value), key
    resumed = trainer.train_run([recording], str(tmp_path / "part"), config, seed=2, progress=False,
                                resume=True, light=True)
    assert resumed["history"]["validation_r2"] == full["history"]["validation_r2"]


def test_weight_average_follows_the_steps():
    model = torch.nn.Linear(2, 1)
    average = trainer.WeightAverage(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)       # step 1: decay min(0.5, 2/11)
    np.testing.assert_allclose(average.model.weight.detach().numpy(), (start + 9.0 / 11.0).numpy(), rtol=1e-6)


def test_time_warp_reads_the_piece_at_its_speed():
    class Sequence(object):
        features = np.arange(20, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], dtype=np.float32)
        labels = np.zeros((20, 1), dtype=np.float32)
    targets = [np.arange(20, dtype=np.float32)[:, None] * 10]
    classes = [np.arange(20, dtype=np.int64)]
    same = trainer.collate([Sequence], [(0, 2, 8)], 6, targets, classes, speeds=[1.0])
    plain = trainer.collate([Sequence], [(0, 2, 8)], 6, targets, classes)
    for a, b in zip(same, plain):
        assert torch.equal(a, b)
    x, y, mask, c = trainer.collate([Sequence], [(0, 2, 8)], 6, targets, classes, speeds=[1.5])
    np.testing.assert_allclose(x[0, :, 0].numpy(), 2 + 1.5 * np.arange(6))
    np.testing.assert_allclose(y[0, :, 0].numpy(), 10 * (2 + 1.5 * np.arange(6)))
    assert c[0].tolist() == [2, 4, 5, 7, 8, 10]     # nearest step (ties upward)
    # A fast piece at the end of its sequence stops there: the rest is padding.
    x, y, mask, c = trainer.collate([Sequence], [(0, 14, 20)], 6, targets, classes, speeds=[2.0])
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0] and x[0, :3, 0].tolist() == [14, 16, 18]


def test_new_settings_are_checked_and_off_by_default_keep_the_digest():
    settings = trainer.resolve_settings({}, "envelope")
    for key, bad in (("ema_decay", 1.0), ("time_warp", -0.1), ("ensemble", 0)):
        with pytest.raises(UsageError, match=key):
            trainer.check_training(dict(settings["training"], **{key: bad}))
    off = copy.deepcopy(settings)
    for key in ("ema_decay", "time_warp", "ensemble"):
        off["training"].pop(key)
    assert (trainer.settings_digest(dict(settings, training=dict(settings["training"], ema_decay=0.0, time_warp=0.0,
                                                                     ensemble=1)), [], 0)
            == trainer.settings_digest(off, [], 0))
