"""PyTorch backend (workstation only): the training model itself, stepped.

Built either from a model object (:meth:`TorchBackend.from_model`) or from
the exported ONNX file, in which case the ONNX weights are put back into a
fresh :class:`~neurohand.train.model.RNNDecoder` (gate order converted
from ONNX's to PyTorch's) -- a check that the export loses nothing.
Never chosen by ``auto``.
"""
import importlib.util
import json

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, BackendUnavailableError
from neurohand.firmware_bridge.shared.errors import ConfigError

# Row blocks of ONNX's gate-stacked weights, in PyTorch's gate order.
_TORCH_FROM_ONNX_GATES = {"gru": (1, 0, 2),        # ONNX z, r, h  -> torch r, z, n
                          "lstm": (0, 2, 3, 1)}    # ONNX i, o, f, c -> torch i, f, g, o


def onnx_to_torch_gates(cell, array):
    """Reorder the gate blocks (axis 0) of an ONNX RNN weight to PyTorch's order."""
    blocks = np.split(array, len(_TORCH_FROM_ONNX_GATES[cell]), axis=0)
    return np.concatenate([blocks[i] for i in _TORCH_FROM_ONNX_GATES[cell]], axis=0)


class TorchBackend(Backend):
    name = "torch"
    install_hint = "pip install torch (workstation only)"

    def __init__(self, weights, model):
        super().__init__(weights)
        self._model = model.eval()

    @classmethod
    def unavailable_reason(cls):
        # find_spec, not import: importing torch takes seconds, and this is asked often.
        try:
            found = importlib.util.find_spec("torch") is not None
        except (ImportError, ValueError):      # ValueError: sys.modules["torch"] is None
            found = False
        if not found:
            return "torch is not installed; install it with: {}".format(cls.install_hint)
        return None

    @classmethod
    def from_model(cls, model):
        """Wrap a trained RNNDecoder (its config gives the shapes)."""
        config = model.config
        # The output layer's width and the class names as the exported file will say them (a class head's
        # scores follow the positions), so n_positions and class_names read as the other backends'.
        class_names = list(getattr(config, "class_names", ()) or ())
        metadata = {onnx_weights.CONFIG_METADATA_KEY: json.dumps({"class_names": class_names})} if class_names else {}
        shapes = onnx_weights.RnnWeights(
            config.cell, config.n_features, config.n_outputs + len(class_names), config.hidden_size, None,
            [None] * config.num_layers, None, metadata)
        return cls(shapes, model)

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False):
        reason = cls.unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        import torch
        from neurohand.train.model import ModelConfig, build_model

        weights = onnx_weights.load_rnn_weights(onnx_path)
        stored = weights.metadata.get(onnx_weights.CONFIG_METADATA_KEY)
        if stored is None:
            raise ConfigError("ONNX model {!r} has no {!r} metadata".format(
                str(onnx_path), onnx_weights.CONFIG_METADATA_KEY))
        config = ModelConfig.from_dict(json.loads(stored))
        model = build_model(config)
        tensors = {}
        if weights.projection is not None:
            tensors["projection.weight"], tensors["projection.bias"] = weights.projection
        for layer, (w, r, wb, rb) in enumerate(weights.layers):
            tensors["rnn.weight_ih_l{}".format(layer)] = onnx_to_torch_gates(config.cell, w)
            tensors["rnn.weight_hh_l{}".format(layer)] = onnx_to_torch_gates(config.cell, r)
            tensors["rnn.bias_ih_l{}".format(layer)] = onnx_to_torch_gates(config.cell, wb)
            tensors["rnn.bias_hh_l{}".format(layer)] = onnx_to_torch_gates(config.cell, rb)
        tensors["head.weight"], tensors["head.bias"] = weights.head
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
        return cls(weights, model)

    def initial_state(self):
        return self._model.initial_state(1)

    def step(self, features, state):
        import torch

        features = self._features(features)
        with torch.no_grad():
            positions, state = self._model.step(torch.from_numpy(features[None, :]), state)
        return positions[0].numpy(), state

    def state_arrays(self, state):
        tensors = state if isinstance(state, tuple) else (state,)
        return [t.detach().cpu().numpy().astype(np.float32) for t in tensors]
