"""torch, the torch backend rebuilt from ONNX weights, ONNX Runtime and numpy agree
to 1e-5 over 1,000 stateful steps, for GRU and LSTM of several sizes."""
import numpy as np
import pytest
import torch

from neurohand.decoder.backends import create_backend
from neurohand.train.model import ModelConfig, build_model
from neurohand.train.export import export_onnx, torch_reference

STEPS = 1000
TOLERANCE = 1e-5
CASES = [
    # cell, n_features, hidden, layers, projection
    ("gru", 8, 16, 1, None),
    ("gru", 20, 64, 2, 16),
    ("gru", 160, 128, 2, None),
    ("lstm", 8, 16, 1, None),
    ("lstm", 12, 16, 2, 8),
    ("lstm", 20, 64, 1, 32),
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Batch-1 steps: thread hand-offs only add time (and the test machine is shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cell,n_features,hidden,layers,projection", CASES)
def test_backends_agree_over_1000_steps(tmp_path, cell, n_features, hidden, layers, projection):
    torch.manual_seed(hidden + layers)
    config = ModelConfig(n_features=n_features, n_outputs=5, cell=cell, hidden_size=hidden,
                         num_layers=layers, input_projection=projection)
    model = build_model(config).eval()
    path = str(tmp_path / "model.onnx")
    export_onnx(model, config, path, check_steps=10)
    # Slowly varying inputs with bursts, like features: the state has to carry information.
    rng = np.random.RandomState(7)
    features = (np.cumsum(rng.standard_normal((STEPS, n_features)), axis=0) * 0.1
                + rng.standard_normal((STEPS, n_features))).astype(np.float32)
    expected, expected_states = torch_reference(model, features)
    assert expected.std() > 1e-3
    # "torch" rebuilds the model from the ONNX weights (gate order converted back).
    backends = [create_backend(name, path) for name in ("onnxruntime", "numpy", "torch")]
    for backend in backends:
        state = backend.initial_state()
        worst = 0.0
        for index, row in enumerate(features):
            positions, state = backend.step(row, state)
            worst = max(worst, float(np.max(np.abs(positions - expected[index]))))
        for got, want in zip(backend.state_arrays(state), expected_states[-1]):
            worst = max(worst, float(np.max(np.abs(got - want))))
        assert worst <= TOLERANCE, "{}: max abs error {}".format(backend.name, worst)
