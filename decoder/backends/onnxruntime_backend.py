"""ONNX Runtime backend: the exported graph on the CPU execution provider.

One intra-op thread: at batch 1 the matrices are small, and thread hand-offs
cost more latency (and jitter) than they save.
"""
import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, BackendUnavailableError, zero_state


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
        session = onnxruntime.InferenceSession(str(onnx_path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        return cls(weights, session)

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
