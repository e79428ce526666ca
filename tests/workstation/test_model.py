"""The torch decoder: config contract, shapes, sequence/step equivalence, checkpoints."""
import numpy as np
import pytest
import torch

from neurohand.train.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError


def test_config_round_trips_and_validates():
    config = ModelConfig(n_features=160, n_outputs=6, cell="lstm", hidden_size=64, num_layers=1,
                         input_projection=32, dropout=0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig(10).to_dict() == {"n_features": 10, "n_outputs": 5, "cell": "gru", "hidden_size": 128,
                                         "num_layers": 2, "input_projection": None, "dropout": 0.0,
                                         "class_names": []}
    with pytest.raises(UsageError, match="did you mean 'lstm'"):
        ModelConfig(10, cell="lsmt")
    with pytest.raises(UsageError, match="hidden_size"):
        ModelConfig(10, hidden_size=0)
    with pytest.raises(UsageError, match="dropout"):
        ModelConfig(10, dropout=1.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"n_features": 3, "hiden_size": 4})


@pytest.mark.parametrize("cell,n_outputs,projection", [("gru", 5, None), ("lstm", 6, 8), ("gru", 22, 12)])
def test_outputs_are_positions_and_state_has_the_documented_form(cell, n_outputs, projection):
    config = ModelConfig(n_features=7, n_outputs=n_outputs, cell=cell, hidden_size=16, num_layers=2,
                         input_projection=projection)
    model = build_model(config)
    x = torch.randn(3, 11, 7) * 5
    outputs, state = model(x)
    assert outputs.shape == (3, 11, n_outputs) and outputs.dtype == torch.float32
    assert float(outputs.detach().min()) >= 0.0 and float(outputs.detach().max()) <= 1.0
    if cell == "lstm":
        assert isinstance(state, tuple) and [s.shape for s in state] == [(2, 3, 16)] * 2
    else:
        assert state.shape == (2, 3, 16)
    initial = model.initial_state(4)
    shapes = [s.shape for s in initial] if cell == "lstm" else [initial.shape]
    assert all(shape == (2, 4, 16) for shape in shapes)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_stepping_equals_running_the_sequence(cell):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_features=5, cell=cell, hidden_size=12, num_layers=2,
                                    input_projection=6, dropout=0.3)).eval()
    x = torch.randn(2, 30, 5)
    with torch.no_grad():
        whole, whole_state = model(x)
        state = model.initial_state(2)
        steps = []
        for t in range(30):
            out, state = model.step(x[:, t, :], state)
            steps.append(out)
    assert torch.allclose(torch.stack(steps, dim=1), whole, atol=1e-6)
    final = state if cell == "lstm" else (state,)
    expected = whole_state if cell == "lstm" else (whole_state,)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(final, expected))
    # State matters: starting the second half from zeros gives something else.
    with torch.no_grad():
        fresh, _ = model(x[:, 15:, :])
    assert not torch.allclose(fresh, whole[:, 15:, :], atol=1e-3)


def test_wrong_input_shape_is_a_usage_error():
    model = build_model(ModelConfig(n_features=5))
    with pytest.raises(UsageError, match=r"\(batch, time, 5\)"):
        model(torch.zeros(1, 3, 4))
    with pytest.raises(UsageError, match=r"\(batch, 5\)"):
        model.step(torch.zeros(1, 1, 5), model.initial_state(1))


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = build_model(ModelConfig(n_features=4, cell="lstm", hidden_size=8, num_layers=1))
    path = tmp_path / "model.pt"
    save_checkpoint(model, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(1, 5, 4)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    torch.save({"something": np.zeros(3).tolist()}, str(tmp_path / "other.pt"))
    with pytest.raises(ConfigError, match="not a neurohand RNN checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
