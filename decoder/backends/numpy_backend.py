"""Pure-numpy decoder step (Python 3.6 + numpy 1.19, nothing else).

Implements the ONNX operator equations (https://onnx.ai/onnx/operators/) for
the graph train/export.py writes, with the weights read from the ONNX file by
:mod:`neurohand.decoder.onnx_weights`:

GRU (gate order z, r, h; ``linear_before_reset=1``, PyTorch's variant)::

    z = σ(W_z x + Wb_z + R_z h + Rb_z)
    r = σ(W_r x + Wb_r + R_r h + Rb_r)
    n = tanh(W_h x + Wb_h + r ⊙ (R_h h + Rb_h))
    h' = (1 - z) ⊙ n + z ⊙ h

LSTM (gate order i, o, f, c)::

    i, o, f = σ(W x + Wb + R h + Rb) for each gate;  g = tanh(... gate c ...)
    c' = f ⊙ c + i ⊙ g;  h' = o ⊙ tanh(c')

All arithmetic is float32 in buffers allocated once; a step allocates only the
new state arrays and the returned positions.
"""
import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.decoder.backends.base import Backend, zero_state


def _sigmoid_inplace(values):
    # σ(x) = (1 + tanh(x/2)) / 2: no exp overflow warnings for large |x|.
    values *= 0.5
    np.tanh(values, out=values)
    values += 1.0
    values *= 0.5


class NumpyRnn(object):
    """The decoder's arithmetic on :class:`onnx_weights.RnnWeights`, writing into given arrays.

    Also used by the fake TensorRT engine in the tests, so both compute alike.
    """

    def __init__(self, weights):
        self.weights = weights
        hidden = weights.hidden_size
        gates = 3 if weights.cell == "gru" else 4
        self._gates_x = np.empty(gates * hidden, dtype=np.float32)
        self._gates_h = np.empty(gates * hidden, dtype=np.float32)
        self._projected = None if weights.projection is None else np.empty(
            weights.projection[1].shape, dtype=np.float32)
        # LSTM adds both biases to the same sum, so fold them once.
        self._lstm_bias = [wb + rb for (_, _, wb, rb) in weights.layers]

    def run(self, features, states_in, positions_out, states_out):
        """One step.

        Parameters
        ----------
        features : float32 (n_features,)
        states_in : list of float32 (num_layers, 1, hidden): [h] or [h, c]
        positions_out : float32 (n_outputs,), written
        states_out : like ``states_in``, written; must not share memory with it
        """
        weights = self.weights
        x = features
        if self._projected is not None:
            w, b = weights.projection
            np.dot(w, x, out=self._projected)
            self._projected += b
            np.maximum(self._projected, 0.0, out=self._projected)
            x = self._projected
        if weights.cell == "gru":
            for layer, (w, r, wb, rb) in enumerate(weights.layers):
                x = self._gru_layer(x, states_in[0][layer, 0], states_out[0][layer, 0], w, r, wb, rb)
        else:
            for layer, (w, r, _, _) in enumerate(weights.layers):
                x = self._lstm_layer(x, states_in[0][layer, 0], states_in[1][layer, 0],
                                     states_out[0][layer, 0], states_out[1][layer, 0],
                                     w, r, self._lstm_bias[layer])
        w, b = weights.head
        np.dot(w, x, out=positions_out)
        positions_out += b
        _sigmoid_inplace(positions_out)

    def _gru_layer(self, x, h, h_new, w, r, wb, rb):
        hidden = h.shape[0]
        gx, gh = self._gates_x, self._gates_h
        np.dot(w, x, out=gx)
        gx += wb
        np.dot(r, h, out=gh)
        gh += rb
        zr = gx[:2 * hidden]
        zr += gh[:2 * hidden]
        _sigmoid_inplace(zr)
        z, reset = gx[:hidden], gx[hidden:2 * hidden]
        n, rh = gx[2 * hidden:], gh[2 * hidden:]
        rh *= reset                      # linear_before_reset=1: r ⊙ (R_h h + Rb_h)
        n += rh
        np.tanh(n, out=n)
        np.subtract(h, n, out=h_new)     # h' = n + z ⊙ (h - n) = (1 - z) ⊙ n + z ⊙ h
        h_new *= z
        h_new += n
        return h_new

    def _lstm_layer(self, x, h, c, h_new, c_new, w, r, bias):
        hidden = h.shape[0]
        g, gh = self._gates_x, self._gates_h
        np.dot(w, x, out=g)
        np.dot(r, h, out=gh)
        g += gh
        g += bias
        _sigmoid_inplace(g[:3 * hidden])
        i, o, f, cell = g[:hidden], g[hidden:2 * hidden], g[2 * hidden:3 * hidden], g[3 * hidden:]
        np.tanh(cell, out=cell)
        np.multiply(f, c, out=c_new)
        i *= cell
        c_new += i
        np.tanh(c_new, out=h_new)
        h_new *= o
        return h_new


class NumpyBackend(Backend):
    """Runs the decoder with numpy alone; the reference for the device."""

    name = "numpy"
    install_hint = "pip install numpy"

    def __init__(self, weights):
        super().__init__(weights)
        self._weights = weights
        self._rnn = NumpyRnn(weights)
        self._state_count = 2 if weights.cell == "lstm" else 1

    @classmethod
    def unavailable_reason(cls):
        return None

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False):
        return cls(onnx_weights.load_rnn_weights(onnx_path))

    def initial_state(self):
        return zero_state(self._weights)

    def step(self, features, state):
        features = self._features(features)
        shape = self._weights.state_shape
        new_state = tuple(np.empty(shape, dtype=np.float32) for _ in range(self._state_count))
        positions = np.empty(self.n_outputs, dtype=np.float32)
        self._rnn.run(features, state, positions, new_state)
        return positions, new_state

    def state_arrays(self, state):
        return [np.array(item, dtype=np.float32) for item in state]
