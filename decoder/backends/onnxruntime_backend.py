"""ONNX Runtime backend: the exported graph on the CPU execution provider.

One intra-op thread: at batch 1 the matrices are small, and thread hand-offs
cost more latency (and jitter) than they save.
"""
import re

import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, BackendUnavailableError, zero_state
from neurohand.firmware_bridge.shared.errors import ConfigError

# ORT's messages start with "[ONNXRuntimeError] : 10 : INVALID_GRAPH : " and may run to many lines.
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*")
MAX_REASON_CHARS = 300


def ort_reason(exc):
    """ONNX Runtime's short reason for ``exc``: its first line, without the status-code prefix, cut short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = _ORT_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 3] + "..."
    return reason


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    install_hint = "pip install onnxruntime"

    def __init__(self, weights, session):
        super().__init__(weights)
        self._weights = weights
        self._session = session
        inputs, outputs = weights.state_names
        self._state_inputs = list(inputs)
        self._output_names = [onnx_weights.OUTPUT_POSITIONS] + list(outputs)

    @classmethod
    def unavailable_reason(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return "onnxruntime is not installed ({}); install it with: {}".format(exc, cls.install_hint)
        return None

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False):
        reason = cls.unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        import onnxruntime

        weights = onnx_weights.load_rnn_weights(onnx_path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # The project's reader checks the weights, not every node and type: an op or input type that
        # ONNX Runtime refuses passes it and would surface here (or at the first step) as ORT's raw error.
        try:
            session = onnxruntime.InferenceSession(str(onnx_path), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        except Exception as exc:   # ORT's errors are its own classes (Fail, InvalidGraph, ...), not one base
            raise ConfigError("ONNX Runtime cannot load the model {!r}: {}".format(
                str(onnx_path), ort_reason(exc))) from None
        backend = cls(weights, session)
        try:
            backend.step(np.zeros(weights.n_features, dtype=np.float32), backend.initial_state())
        except Exception as exc:
            backend.close()
            raise ConfigError("ONNX Runtime cannot run the model {!r}: {}".format(
                str(onnx_path), ort_reason(exc))) from None
        return backend

    def initial_state(self):
        return zero_state(self._weights)

    def step(self, features, state):
        feeds = {onnx_weights.INPUT_FEATURES: self._features(features).reshape(1, -1)}
        for name, value in zip(self._state_inputs, state):
            feeds[name] = value
        results = self._session.run(self._output_names, feeds)
        return results[0][0], tuple(results[1:])

    def state_arrays(self, state):
        return [np.array(item, dtype=np.float32) for item in state]

    def close(self):
        self._session = None
