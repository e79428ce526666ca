"""Export the decoder to ONNX, one time step per call, and prove the file right.

The exported graph (opset 13, batch 1, no dynamic axes; TensorRT 8.2's ONNX
parser reads opset 13 at most)::

    features (1, n_features)  ─┐
    h_in (layers, 1, hidden)  ─┼─> [Gemm+Relu] -> GRU/LSTM x layers -> Gemm -> Sigmoid ─> positions (1, n_outputs)
    c_in (LSTM only)          ─┘                                                       ├─> h_out (layers, 1, hidden)
                                                                                        └─> c_out (LSTM only)

With a class head (``ModelConfig.class_names``) "positions" is n_outputs + n_classes wide: the
positions, then one score per class; the parity checks compare the whole output, so they cover the
class scores.  The runtime feeds ``h_out`` back as ``h_in`` on the next step.  The legacy
TorchScript exporter names weights after internal values ("onnx::GRU_177"),
so after exporting, the initializers are renamed to the fixed names in
:mod:`neurohand.decoder.onnx_weights` (``rnn.0.W``, ``head.weight``, ...) and
the model config is stored in the file's metadata; the numpy backend on the
device reads them from there.

The file only appears at ``path`` after ONNX Runtime *and* the numpy backend
have reproduced torch's outputs and states over ``check_steps`` stateful
steps within ``tolerance``: it is written to a temporary file first and moved
into place with ``os.replace``.
"""
import hashlib
import json
import os
import warnings

import numpy as np
import torch

from neurohand.decoder import onnx_weights as names
from neurohand.decoder.backends.base import parity_error
from neurohand.firmware_bridge.shared.atomic import atomic_path
from neurohand.firmware_bridge.shared.errors import NeurohandError

OPSET = 13
DEFAULT_TOLERANCE = 1e-5


class ExportError(NeurohandError):
    """The exported graph is not what the runtime expects or does not match torch."""


class _StepGraph(torch.nn.Module):
    """One decoder step with the state as explicit tensors (what gets exported)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.lstm = model.config.cell == "lstm"

    def forward(self, features, h_in, c_in=None):
        state = (h_in, c_in) if self.lstm else h_in
        positions, state = self.model.step(features, state)
        if self.lstm:
            return positions, state[0], state[1]
        return positions, state


class _PlainStepGraph(torch.nn.Module):
    """The same step written out as matrix products and pointwise functions.

    TensorRT 8.2's ONNX parser turns a GRU/LSTM node into an ``ILoop`` even for
    one time step, and builds on 8.x up to 8.4 are reported to fail inside such
    loops ("operation not supported within a loop body").  This graph has no
    RNN node and no loop: MatMul/Gemm, Add, Mul, Sub, Sigmoid, Tanh, Relu and
    slicing only, with PyTorch's gate equations (GRU: r, z, n with the reset
    gate applied after the recurrent product, which is ONNX's
    ``linear_before_reset=1``; LSTM: i, f, g, o).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.lstm = model.config.cell == "lstm"

    def forward(self, features, h_in, c_in=None):
        model = self.model
        x = features
        if model.projection is not None:
            x = torch.relu(model.projection(x))
        hidden, cells = [], []
        size = model.config.hidden_size
        for layer in range(model.config.num_layers):
            h = h_in[layer]
            gates_x = torch.matmul(x, getattr(model.rnn, "weight_ih_l{}".format(layer)).t()) + \
                getattr(model.rnn, "bias_ih_l{}".format(layer))
            gates_h = torch.matmul(h, getattr(model.rnn, "weight_hh_l{}".format(layer)).t()) + \
                getattr(model.rnn, "bias_hh_l{}".format(layer))
            if self.lstm:
                gates = gates_x + gates_h
                i = torch.sigmoid(gates[:, :size])
                f = torch.sigmoid(gates[:, size:2 * size])
                g = torch.tanh(gates[:, 2 * size:3 * size])
                o = torch.sigmoid(gates[:, 3 * size:])
                c = f * c_in[layer] + i * g
                h = o * torch.tanh(c)
                cells.append(c)
            else:
                r = torch.sigmoid(gates_x[:, :size] + gates_h[:, :size])
                z = torch.sigmoid(gates_x[:, size:2 * size] + gates_h[:, size:2 * size])
                n = torch.tanh(gates_x[:, 2 * size:] + r * gates_h[:, 2 * size:])
                h = (1.0 - z) * n + z * h
            hidden.append(h)
            x = h
        positions = torch.sigmoid(model.head(x))
        if self.lstm:
            return positions, torch.stack(hidden), torch.stack(cells)
        return positions, torch.stack(hidden)


#: Operators the loop-free graph may hold (what TensorRT 8.2 builds outside any loop).
PLAIN_OPS = frozenset(("Gemm", "MatMul", "Add", "Sub", "Mul", "Sigmoid", "Tanh", "Relu", "Slice", "Split",
                       "Concat", "Unsqueeze", "Squeeze", "Gather", "Constant", "Transpose", "Reshape",
                       "Identity", "Shape"))
PLAIN_GRAPH_FORMAT = names.PLAIN_GRAPH_FORMAT


def export_plain_onnx(model, config, path, reference_onnx=None, check_steps=200, tolerance=DEFAULT_TOLERANCE,
                      seed=0):
    """Export the step without any GRU/LSTM node or loop (for TensorRT 8.x) and prove it equal.

    The file appears at ``path`` only after ONNX Runtime has reproduced torch's
    outputs and states over ``check_steps`` stateful steps within
    ``tolerance`` and, where ``reference_onnx`` (the regular export) is given,
    that file's outputs and states too.  Same inputs and outputs (names,
    shapes) as :func:`export_onnx`; the model config is in the metadata with
    graph format ``rnn-step-plain-1``.  Returns a report like export_onnx's.
    """
    inputs, outputs = io_names(config.cell)

    def write(temporary):
        state = model.initial_state(1)
        args = (torch.zeros(1, config.n_features),) + (state if isinstance(state, tuple) else (state,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # the TorchScript exporter's deprecation, as in _export_raw
            torch.onnx.export(_PlainStepGraph(model).eval(), args, temporary, dynamo=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs, do_constant_folding=True)
        _label_plain(temporary, config)
        return check_plain_parity(model, config, temporary, check_steps, reference_onnx, seed=seed)

    path = os.fspath(path)
    errors, digest = _write_checked(model, path, write, tolerance, check_steps, "the loop-free graph differs")
    return {"path": path, "sha256": digest, "opset": OPSET, "graph_format": PLAIN_GRAPH_FORMAT,
            "check_steps": check_steps, "max_abs_error": errors}


def _write_checked(model, path, write, tolerance, check_steps, what):
    """``write(temporary) -> {name: largest parity_error}`` in eval mode; the file lands at ``path`` only
    within ``tolerance`` (else ExportError, nothing left).  Returns (errors, sha256 of the file)."""
    was_training = model.training
    model.eval()
    try:
        with atomic_path(path, suffix=".onnx") as temporary:
            errors = write(temporary)
            worst = max(errors.values())
            if not worst <= tolerance:
                raise ExportError("{} by {:.3g} (tolerance {:.3g}) over {} steps: {}".format(
                    what, worst, tolerance, check_steps, errors))
    finally:
        model.train(was_training)
    with open(path, "rb") as handle:
        return errors, hashlib.sha256(handle.read()).hexdigest()


def _label_plain(path, config):
    """Check the graph holds only plain operators; static output shapes; metadata."""
    import onnx

    proto = onnx.load(path)
    found = sorted({node.op_type for node in proto.graph.node} - PLAIN_OPS)
    if found:
        raise ExportError("the loop-free export holds operators {} (allowed: plain arithmetic only)".format(found))
    _set_output_shapes(proto.graph, config)
    del proto.metadata_props[:]
    for key, value in ((names.GRAPH_FORMAT_KEY, PLAIN_GRAPH_FORMAT),
                       (names.CONFIG_METADATA_KEY, json.dumps(config.to_dict(), sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _onnxruntime_steps(path, features, lstm, hidden_shape):
    """Outputs and per-step states of an exported step graph under ONNX Runtime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inputs, outputs = io_names("lstm" if lstm else "gru")
    state = [np.zeros(hidden_shape, dtype=np.float32) for _ in inputs[1:]]
    results, states = [], []
    for row in features:
        feed = dict(zip(inputs, [row[None, :]] + state))
        values = session.run(outputs, feed)
        results.append(values[0][0])
        state = values[1:]
        states.append(state)
    return np.stack(results), states


def check_plain_parity(model, config, path, steps, reference_onnx=None, seed=0):
    """Largest error (``parity_error``) of the loop-free graph (ONNX Runtime) against torch and the regular
    export."""
    features = np.random.RandomState(seed).standard_normal((steps, config.n_features)).astype(np.float32)
    expected, expected_states = torch_reference(model, features)
    shape = (config.num_layers, 1, config.hidden_size)
    lstm = config.cell == "lstm"
    got, got_states = _onnxruntime_steps(path, features, lstm, shape)

    def worst(outputs, states, want_outputs, want_states):
        error = parity_error(outputs, want_outputs)
        for step_got, step_want in zip(states, want_states):
            for a, b in zip(step_got, step_want):
                error = max(error, parity_error(a, b))
        return error

    errors = {"torch": worst(got, got_states, expected, expected_states)}
    if reference_onnx is not None:
        ref, ref_states = _onnxruntime_steps(reference_onnx, features, lstm, shape)
        errors["rnn_export"] = worst(got, got_states, ref, ref_states)
    return errors


def io_names(cell):
    """(input names, output names) of the exported graph for ``cell``."""
    inputs = [names.INPUT_FEATURES, names.INPUT_H]
    outputs = [names.OUTPUT_POSITIONS, names.OUTPUT_H]
    if cell == "lstm":
        inputs.append(names.INPUT_C)
        outputs.append(names.OUTPUT_C)
    return inputs, outputs


def export_onnx(model, config, path, check_steps=200, tolerance=DEFAULT_TOLERANCE, seed=0):
    """Export ``model`` to ``path`` and check it numerically.

    Parameters
    ----------
    model : RNNDecoder (torch), left in the train/eval mode it came in
    config : ModelConfig of the model
    path : str, where model.onnx goes
    check_steps : int, stateful steps compared against torch (random inputs)
    tolerance : float, largest allowed difference of outputs and states, absolute within +-1 and relative
        beyond (``decoder.backends.base.parity_error``: an LSTM's cell state reaches tens)

    Returns
    -------
    dict with the path, sha256, opset, I/O names and shapes, the model config,
    the number of steps checked and the largest ``parity_error`` of onnxruntime and numpy (under
    "max_abs_error", the key older reports use).

    Raises ExportError (and leaves nothing at ``path``) when the graph or the
    parity check fails.
    """
    def write(temporary):
        _export_raw(model, config, temporary)
        _normalize(temporary, config)
        return check_parity(model, config, temporary, check_steps, seed=seed)

    path = os.fspath(path)
    errors, digest = _write_checked(model, path, write, tolerance, check_steps, "exported graph differs from torch")
    inputs, outputs = io_names(config.cell)
    state_shape = [config.num_layers, 1, config.hidden_size]
    shapes = {names.INPUT_FEATURES: [1, config.n_features], names.OUTPUT_POSITIONS: [1, config.output_width]}
    for name in inputs[1:] + outputs[1:]:
        shapes[name] = state_shape
    return {
        "path": path, "sha256": digest, "opset": OPSET, "inputs": inputs, "outputs": outputs,
        "shapes": shapes, "config": config.to_dict(), "check_steps": check_steps,
        "tolerance": tolerance, "max_abs_error": errors, "torch_version": torch.__version__,
    }


def _export_raw(model, config, path):
    inputs, outputs = io_names(config.cell)
    state = model.initial_state(1)
    args = (torch.zeros(1, config.n_features),) + (state if isinstance(state, tuple) else (state,))
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but only it
        # writes opset 13 RNN nodes that TensorRT 8.2 parses; its warnings are expected.
        warnings.simplefilter("ignore")
        # A fresh wrapper is in training mode, and the exporter restores that mode
        # afterwards -- recursively, which would switch dropout back on for the
        # parity check.  In eval mode there is nothing to restore.
        torch.onnx.export(_StepGraph(model).eval(), args, path, dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, do_constant_folding=True)


def _normalize(path, config):
    """Rename the weights to the fixed names, add metadata and check the attributes."""
    import onnx

    proto = onnx.load(path)
    graph = proto.graph
    renames = {}
    rnn_op = "GRU" if config.cell == "gru" else "LSTM"
    rnn_nodes = [node for node in graph.node if node.op_type in ("GRU", "LSTM")]
    if len(rnn_nodes) != config.num_layers or any(n.op_type != rnn_op for n in rnn_nodes):
        raise ExportError("expected {} {} nodes, the exporter wrote {}".format(
            config.num_layers, rnn_op, [n.op_type for n in rnn_nodes]))
    for layer, node in enumerate(rnn_nodes):
        for old, new in zip(node.input[1:4], names.rnn_weight_names(layer)):
            renames[old] = new
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if rnn_op == "GRU" and attributes.get("linear_before_reset") != 1:
            raise ExportError("GRU layer {} was exported without linear_before_reset=1".format(layer))
    gemms = [node for node in graph.node if node.op_type == "Gemm"]
    roles = (["projection"] if config.input_projection is not None else []) + ["head"]
    if len(gemms) != len(roles):
        raise ExportError("expected {} Gemm nodes ({}), the exporter wrote {}".format(
            len(roles), roles, len(gemms)))
    for role, node in zip(roles, gemms):
        renames[node.input[1]] = role + ".weight"
        renames[node.input[2]] = role + ".bias"
    initializer_names = {init.name for init in graph.initializer}
    missing = sorted(set(renames) - initializer_names)
    if missing:
        raise ExportError("weights {} are computed, not stored; cannot name them".format(missing))
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
    _set_output_shapes(graph, config)
    del proto.metadata_props[:]
    for key, value in ((names.GRAPH_FORMAT_KEY, names.GRAPH_FORMAT),
                       (names.CONFIG_METADATA_KEY, json.dumps(config.to_dict(), sort_keys=True))):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _set_output_shapes(graph, config):
    """Give every graph output its static shape (the exporter may leave them open)."""
    state = [config.num_layers, 1, config.hidden_size]
    expected = {names.OUTPUT_POSITIONS: [1, config.output_width], names.OUTPUT_H: state, names.OUTPUT_C: state}
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for size in expected[output.name]:
            dims.add().dim_value = size


def _state_arrays(state):
    tensors = state if isinstance(state, tuple) else (state,)
    return [t.detach().numpy().astype(np.float32) for t in tensors]


def torch_reference(model, features):
    """Torch outputs and states for ``features`` (steps, n_features), stepping from zeros.

    Returns (outputs (steps, n_outputs), list of per-step state lists).
    """
    outputs, states = [], []
    # Batch-1 steps are far faster on one thread (no hand-offs); restore after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            state = model.initial_state(1)
            for row in features:
                positions, state = model.step(torch.from_numpy(row[None, :]), state)
                outputs.append(positions[0].numpy())
                states.append(_state_arrays(state))
    finally:
        torch.set_num_threads(threads)
    return np.stack(outputs).astype(np.float32), states


def check_parity(model, config, onnx_path, steps, seed=0):
    """Largest error (``parity_error``: absolute within +-1, relative beyond) of onnxruntime and of the numpy
    backend against torch.

    Both run ``steps`` stateful steps on the same random features (normal,
    seeded) and are compared on the outputs and the states of every step.
    Returns {"onnxruntime": err, "numpy": err}.
    """
    from neurohand.decoder.backends import create_backend

    features = np.random.RandomState(seed).standard_normal((steps, config.n_features)).astype(np.float32)
    expected, expected_states = torch_reference(model, features)
    errors = {}
    for name in ("onnxruntime", "numpy"):
        backend = create_backend(name, onnx_path)
        try:
            worst = 0.0
            state = backend.initial_state()
            for index, row in enumerate(features):
                positions, state = backend.step(row, state)
                worst = max(worst, parity_error(positions, expected[index]))
                for got, want in zip(backend.state_arrays(state), expected_states[index]):
                    worst = max(worst, parity_error(got, want))
        finally:
            backend.close()
        errors[name] = worst
    return errors
