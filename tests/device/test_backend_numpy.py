"""The numpy backend, the ONNX reader and the backend registry (Python 3.6, no torch).

Reference values are torch's, committed by tests/workstation/make_golden_onnx.py.
"""
import os
import sys

import numpy as np
import pytest

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends import (
    AUTO_ORDER, BACKENDS, BackendUnavailableError, available_backends, create_backend)
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOLERANCE = 1e-5


def golden(cell):
    path = os.path.join(DATA, "golden_{}.onnx".format(cell))
    with np.load(os.path.join(DATA, "golden_{}.npz".format(cell)), allow_pickle=False) as arrays:
        return path, {key: arrays[key] for key in arrays.files}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_numpy_backend_matches_torch_golden_vectors(cell):
    path, reference = golden(cell)
    backend = create_backend("numpy", path)
    state = backend.initial_state()
    outputs = []
    for row in reference["features"]:
        positions, state = backend.step(row, state)
        assert positions.dtype == np.float32 and positions.shape == (backend.n_outputs,)
        outputs.append(positions)
    outputs = np.array(outputs)
    assert np.max(np.abs(outputs - reference["positions"])) <= TOLERANCE
    assert outputs.min() >= 0.0 and outputs.max() <= 1.0
    assert outputs.std() > 0.05        # the golden model really spreads its outputs
    final = backend.state_arrays(state)
    assert np.max(np.abs(final[0] - reference["h_final"])) <= TOLERANCE
    if cell == "lstm":
        assert np.max(np.abs(final[1] - reference["c_final"])) <= TOLERANCE


def test_state_is_carried_between_steps():
    path, reference = golden("gru")
    backend = create_backend("numpy", path)
    row = reference["features"][0]
    first, state = backend.step(row, backend.initial_state())
    second, _ = backend.step(row, state)
    again, _ = backend.step(row, backend.initial_state())
    assert not np.allclose(first, second)
    assert np.array_equal(first, again)
    assert all(not np.any(s) for s in backend.state_arrays(backend.initial_state()))


def test_reader_finds_graph_shapes_names_and_attributes():
    path, _ = golden("gru")
    model = onnx_weights.read_onnx(path)
    assert model.opsets[""] == 13
    assert [name for name, _ in model.inputs] == ["features", "h_in"]
    assert dict(model.inputs)["features"] == (1, 6)
    assert dict(model.outputs)["h_out"] == (2, 1, 8)
    grus = [node for node in model.nodes if node.op_type == "GRU"]
    assert [node.attributes["linear_before_reset"] for node in grus] == [1, 1]
    assert [node.attributes["hidden_size"] for node in grus] == [8, 8]
    weights = onnx_weights.load_rnn_weights(path)
    assert (weights.cell, weights.num_layers, weights.hidden_size) == ("gru", 2, 8)
    assert weights.projection[0].shape == (4, 6)
    assert weights.layers[0][0].shape == (24, 4) and weights.layers[1][1].shape == (24, 8)
    assert weights.head[0].shape == (5, 8)
    assert all(a.dtype == np.float32 for layer in weights.layers for a in layer)
    lstm = onnx_weights.load_rnn_weights(golden("lstm")[0])
    assert (lstm.cell, lstm.projection, lstm.layers[0][0].shape) == ("lstm", None, (24, 5))


def test_refuses_gru_without_linear_before_reset(tmp_path):
    path, _ = golden("gru")
    with open(path, "rb") as handle:
        data = handle.read()
    # AttributeProto: name (field 1) "linear_before_reset", then i (field 3, varint) = 1.
    marker = b"\x0a\x13linear_before_reset\x18\x01"
    assert data.count(marker) == 2
    patched = tmp_path / "patched.onnx"
    patched.write_bytes(data.replace(marker, marker[:-1] + b"\x00"))
    with pytest.raises(ConfigError, match="linear_before_reset"):
        create_backend("numpy", str(patched))


def test_broken_files_raise_config_errors_naming_the_file(tmp_path):
    path, _ = golden("lstm")
    with open(path, "rb") as handle:
        data = handle.read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError, match="truncated.onnx"):
        onnx_weights.read_onnx(str(truncated))
    text = tmp_path / "notes.onnx"
    text.write_bytes(b"hello, this is not a model")
    with pytest.raises(ConfigError):
        create_backend("numpy", str(text))


def test_varints_and_negative_int64():
    assert onnx_weights._varint(b"\xac\x02", 0) == (300, 2)
    minus_one = b"\xff" * 9 + b"\x01"
    value, end = onnx_weights._varint(minus_one, 0)
    assert end == 10 and onnx_weights._signed64(value) == -1
    with pytest.raises(ConfigError):
        onnx_weights._varint(b"\x80\x80", 0)


def test_features_of_the_wrong_shape_are_refused():
    backend = create_backend("numpy", golden("gru")[0])
    with pytest.raises(UsageError, match=r"\(6,\)"):
        backend.step(np.zeros(7, dtype=np.float32), backend.initial_state())


def test_unknown_backend_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'numpy'"):
        create_backend("nunpy", golden("gru")[0])


def test_missing_model_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        create_backend("numpy", str(tmp_path / "absent.onnx"))


def test_named_backend_that_is_not_installed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # makes `import onnxruntime` fail
    with pytest.raises(BackendUnavailableError, match="pip install onnxruntime"):
        create_backend("onnxruntime", golden("gru")[0])
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="python3-libnvinfer"):
        create_backend("tensorrt", golden("gru")[0])
    assert "onnxruntime" not in available_backends() and "numpy" in available_backends()


def test_auto_reports_what_it_skipped_and_never_picks_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    backend = create_backend("auto", golden("gru")[0])
    assert backend.name == "numpy"
    assert "auto picked numpy" in backend.selected_by
    assert "tensorrt:" in backend.selected_by
    assert "torch" not in AUTO_ORDER and set(AUTO_ORDER) < set(BACKENDS)


def test_fp16_is_refused_for_backends_other_than_tensorrt():
    with pytest.raises(UsageError, match="fp16"):
        create_backend("numpy", golden("gru")[0], fp16=True)


def _random_weights(cell, projection, n_outputs, seed, scale=1.5):
    """Hand-built RnnWeights, large enough that some gates saturate (|pre-activation| >> 1)."""
    rng = np.random.RandomState(seed)
    n_features, hidden, gates = 7, 6, 3 if cell == "gru" else 4

    def draw(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    proj = (draw(5, n_features), draw(5)) if projection else None
    inputs = 5 if projection else n_features
    layers = [(draw(gates * hidden, inputs if k == 0 else hidden), draw(gates * hidden, hidden),
               draw(gates * hidden), draw(gates * hidden)) for k in range(2)]
    return onnx_weights.RnnWeights(cell, n_features, n_outputs, hidden, proj, layers,
                                   (draw(n_outputs, hidden), draw(n_outputs)), {})


def _reference_step(weights, x, h, c):
    """The ONNX GRU/LSTM equations written out plainly in float64 (docstring of numpy_backend)
    -> (outputs, h, c, the largest |gate pre-activation|)."""
    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    x = np.asarray(x, dtype=np.float64)
    if weights.projection is not None:
        x = np.maximum(np.dot(weights.projection[0], x) + weights.projection[1], 0.0)
    h_out, c_out = np.empty_like(h), np.empty_like(h)
    n, largest = weights.hidden_size, 0.0
    for layer, (w, r, wb, rb) in enumerate(weights.layers):
        gx, gh = np.dot(w, x) + wb, np.dot(r, h[layer]) + rb
        largest = max(largest, float(np.max(np.abs(gx + gh))))
        if weights.cell == "gru":
            z, reset = sigmoid(gx[:n] + gh[:n]), sigmoid(gx[n:2 * n] + gh[n:2 * n])
            candidate = np.tanh(gx[2 * n:] + reset * gh[2 * n:])
            h_out[layer] = (1.0 - z) * candidate + z * h[layer]
        else:
            g = gx + gh
            i, o, f, cell = sigmoid(g[:n]), sigmoid(g[n:2 * n]), sigmoid(g[2 * n:3 * n]), np.tanh(g[3 * n:])
            c_out[layer] = f * c[layer] + i * cell
            h_out[layer] = o * np.tanh(c_out[layer])
        x = h_out[layer]
    return sigmoid(np.dot(weights.head[0], x) + weights.head[1]), h_out, c_out, largest


@pytest.mark.parametrize("cell,projection,n_outputs", [("gru", True, 27), ("gru", False, 5),
                                                       ("lstm", True, 5), ("lstm", False, 9)])
def test_rearranged_arithmetic_matches_the_plain_equations(cell, projection, n_outputs):
    # The backend folds the sigmoids' halving and the biases into copies of the weights; compare it,
    # saturated gates included, with the equations computed as written, in float64.
    from neurohand.decoder.backends.numpy_backend import NumpyBackend
    weights = _random_weights(cell, projection, n_outputs, seed=n_outputs)
    originals = [np.array(a) for layer in weights.layers for a in layer] + [np.array(a) for a in weights.head]
    backend = NumpyBackend(weights)
    features = np.random.RandomState(1).standard_normal((40, weights.n_features)).astype(np.float32)
    features[10:15] *= 20.0
    state = backend.initial_state()
    h = np.zeros((2, weights.hidden_size))
    c = np.zeros_like(h)
    largest = 0.0
    for row in features:
        positions, state = backend.step(row, state)
        expected, h, c, pre_activation = _reference_step(weights, row, h, c)
        assert np.max(np.abs(positions - expected)) <= TOLERANCE
        largest = max(largest, pre_activation)
    arrays = backend.state_arrays(state)
    assert np.max(np.abs(arrays[0][:, 0] - h)) <= TOLERANCE
    if cell == "lstm":
        assert np.max(np.abs(arrays[1][:, 0] - c)) <= TOLERANCE
    assert largest > 20.0 and np.std(h) > 0.1     # saturated gates were exercised; the state moves
    # The backend works on copies: the weights object (shared with the fake TensorRT engine) is untouched.
    assert all(np.array_equal(a, b) for a, b in zip(
        originals, [a for layer in weights.layers for a in layer] + list(weights.head)))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_earlier_outputs_and_states_are_never_overwritten(cell):
    # Callers keep what step returned (the self-test, these tests) and may step twice from one state.
    path, reference = golden(cell)
    backend = create_backend("numpy", path)
    rows = reference["features"][:6]
    kept, copies, state = [], [], backend.initial_state()
    for row in rows:
        positions, state = backend.step(row, state)
        kept.append((positions, state))
        copies.append((positions.copy(), [a.copy() for a in backend.state_arrays(state)]))
    for (positions, state), (positions_copy, state_copy) in zip(kept, copies):
        assert np.array_equal(positions, positions_copy)
        assert all(np.array_equal(a, b) for a, b in zip(backend.state_arrays(state), state_copy))
    branch_a, _ = backend.step(rows[0], kept[2][1])
    branch_b, _ = backend.step(rows[0], kept[2][1])
    assert np.array_equal(branch_a, branch_b) and not np.array_equal(branch_a, kept[3][0])
    copy = backend.state_arrays(state)
    copy[0][...] = 5.0
    assert not np.any(backend.state_arrays(state)[0] == 5.0)


@pytest.mark.parametrize("cell,projection", [("gru", True), ("gru", False), ("lstm", True), ("lstm", False)])
def test_a_prepared_step_is_identical_to_the_bit_and_only_for_the_state_it_was_prepared_for(cell, projection):
    # The runtime prepares the recurrent half of the next step once a command is on its way (decode.py).
    from neurohand.decoder.backends.numpy_backend import NumpyBackend
    weights = _random_weights(cell, projection, 5, seed=3)
    plain, ahead = NumpyBackend(weights), NumpyBackend(weights)
    features = np.random.RandomState(2).standard_normal((30, weights.n_features)).astype(np.float32)
    state_plain, state_ahead = plain.initial_state(), ahead.initial_state()
    for row in features:
        ahead.prepare(state_ahead)
        expected, state_plain = plain.step(row, state_plain)
        positions, state_ahead = ahead.step(row, state_ahead)
        assert np.array_equal(positions, expected)
        assert all(np.array_equal(a, b) for a, b in zip(ahead.state_arrays(state_ahead),
                                                        plain.state_arrays(state_plain)))
    # Prepared for one state, stepped from another: the other state's own products are used.
    other = ahead.initial_state()
    ahead.prepare(state_ahead)
    positions, _ = ahead.step(features[0], other)
    expected, _ = plain.step(features[0], plain.initial_state())
    assert np.array_equal(positions, expected)
    # A preparation is used once: a second step from the same state computes its own.
    ahead.prepare(state_ahead)
    first, _ = ahead.step(features[1], state_ahead)
    second, _ = ahead.step(features[1], state_ahead)
    assert np.array_equal(first, second)


def test_parity_error_is_absolute_within_one_and_relative_beyond():
    from neurohand.decoder.backends.base import parity_error
    assert parity_error([0.5, -0.2], [0.5, -0.2]) == 0.0
    assert parity_error([0.5003], [0.5]) == pytest.approx(3e-4)
    # A cell state of 100 off by 3e-4 is a few float32 rounding steps: 3e-6 of its size.
    assert parity_error([100.0003], [100.0]) == pytest.approx(3e-6)
    # Relative beyond 1 still catches a real difference there.
    assert parity_error([110.0, 0.1], [100.0, 0.1]) == pytest.approx(0.1)
    assert parity_error([-2.0], [-1.0]) == pytest.approx(1.0)
    assert parity_error([float("nan"), 0.0], [0.0, 0.0]) == float("inf")
