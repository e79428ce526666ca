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


def _halved(array, rows=None):
    """A float32 copy of ``array`` with its first ``rows`` rows (all if None) times 0.5 (exact in float)."""
    array = np.array(array, dtype=np.float32)
    array[:rows] *= 0.5
    return array


class NumpyRnn(object):
    """The decoder's arithmetic on :class:`onnx_weights.RnnWeights`, writing into given arrays.

    Also used by the fake TensorRT engine in the tests, so both compute alike.

    A step is mostly numpy's fixed cost per call (about 0.3 µs with numpy 2.4,
    0.6 µs with numpy 1.19, tanh excepted), so the weights are rearranged once
    here to need fewer calls: every sigmoid becomes ``(1 + tanh(x/2)) / 2`` with
    the ``/2`` folded into its rows of the weights and biases (a power of two,
    so exact); biases that are added together are folded into one; the slices
    of the scratch buffers are made once; and constants are arrays, which numpy
    takes faster than Python floats.
    """

    def __init__(self, weights):
        self.weights = weights
        hidden = weights.hidden_size
        self._is_gru = gru = weights.cell == "gru"
        gates = 3 if gru else 4
        self._gates_x = gx = np.empty(gates * hidden, dtype=np.float32)
        # One buffer per layer for R h (+ its bias), so prepare() can compute every layer's ahead.
        self._gates_h = [np.empty(gates * hidden, dtype=np.float32) for _ in weights.layers]
        self._prepared = None       # the state array prepare() computed the gates_h of
        self._projection = None
        if weights.projection is not None:
            w, b = weights.projection
            projected = np.empty(w.shape[0], dtype=np.float32)
            self._projection = (np.array(w, dtype=np.float32), np.array(b, dtype=np.float32), projected,
                                np.zeros_like(projected))
        self._layers = []
        if gru:
            # z, r: tanh of half their pre-activation, then (1 + t) / 2.  The r ⊙ (R_h h + Rb_h) term is
            # computed as (1 + t_r) ⊙ (R_h h + Rb_h) / 2, so all of R is halved and r needs no / 2.
            zr, z, r, n = gx[:2 * hidden], gx[:hidden], gx[hidden:2 * hidden], gx[2 * hidden:]
            for (w, rw, wb, rb), gh in zip(weights.layers, self._gates_h):
                bias_x = np.array(wb, dtype=np.float32)
                bias_x[:2 * hidden] = 0.5 * (bias_x[:2 * hidden] + rb[:2 * hidden])
                self._layers.append((_halved(w, 2 * hidden), bias_x, _halved(rw), _halved(rb[2 * hidden:]),
                                     gh, gh[:2 * hidden], gh[2 * hidden:]))
            self._views = (zr, z, r, n, np.ones(2 * hidden, dtype=np.float32), np.full(hidden, 0.5, dtype=np.float32))
        else:
            # i, o, f: halved rows, so one tanh covers all four gates; then (1 + t) / 2 on i, o, f.
            for (w, rw, wb, rb), gh in zip(weights.layers, self._gates_h):
                self._layers.append((_halved(w, 3 * hidden), _halved(rw, 3 * hidden),
                                     _halved(np.add(wb, rb, dtype=np.float32), 3 * hidden), gh))
            self._views = (gx[:3 * hidden], gx[:hidden], gx[hidden:2 * hidden], gx[2 * hidden:3 * hidden],
                           gx[3 * hidden:], np.ones(3 * hidden, dtype=np.float32),
                           np.full(3 * hidden, 0.5, dtype=np.float32))
        w, b = weights.head
        n_outputs = w.shape[0]
        self._head = (_halved(w), _halved(b), np.ones(n_outputs, dtype=np.float32),
                      np.full(n_outputs, 0.5, dtype=np.float32))

    def prepare(self, states_in):
        """Compute each layer's ``R h`` (GRU: plus its bias) for the next :meth:`run` from ``states_in``.

        That run then starts from the input: about half the step's multiply-adds
        (for a 2 x 128 GRU) are done before its features exist.  The same
        products in the same order as a run that computes them itself, so
        the outputs are identical to the bit.  Only the next run, and only
        from this very state (the same array object, unchanged), uses them.
        """
        h_in = states_in[0]
        for layer, weights in enumerate(self._layers):
            self._recurrent(weights, h_in[layer, 0])
        self._prepared = h_in

    def _recurrent(self, weights, h):
        if self._is_gru:
            _, _, rw, bias_rh, gh, _, rh = weights
            np.dot(rw, h, out=gh)
            rh += bias_rh                # (R_h h + Rb_h) / 2
        else:
            _, rw, _, gh = weights
            np.dot(rw, h, out=gh)

    def run(self, features, states_in, positions_out, states_out):
        """One step.

        Parameters
        ----------
        features : float32 (n_features,)
        states_in : list of float32 (num_layers, 1, hidden): [h] or [h, c]
        positions_out : float32 (n_outputs,), written
        states_out : like ``states_in``, written; must not share memory with it
        """
        prepared = self._prepared is states_in[0]
        self._prepared = None
        x = features
        if self._projection is not None:
            w, b, projected, zeros = self._projection
            np.dot(w, x, out=projected)
            projected += b
            np.maximum(projected, zeros, out=projected)
            x = projected
        if self._is_gru:
            x = self._gru(x, states_in[0], states_out[0], prepared)
        else:
            x = self._lstm(x, states_in[0], states_in[1], states_out[0], states_out[1], prepared)
        w, b, ones, half = self._head
        np.dot(w, x, out=positions_out)
        positions_out += b
        np.tanh(positions_out, out=positions_out)
        positions_out += ones
        positions_out *= half

    def _gru(self, x, h_in, h_out, prepared):
        gx = self._gates_x
        zr, z, r, n, ones, half = self._views
        dot, tanh, subtract = np.dot, np.tanh, np.subtract
        for layer, weights in enumerate(self._layers):
            w, bias_x, _, _, _, zr_h, rh = weights
            h, h_new = h_in[layer, 0], h_out[layer, 0]
            dot(w, x, out=gx)
            gx += bias_x
            if not prepared:
                self._recurrent(weights, h)
            zr += zr_h
            tanh(zr, out=zr)
            zr += ones                   # 2z, 2r
            z *= half
            rh *= r                      # linear_before_reset=1: r ⊙ (R_h h + Rb_h)
            n += rh
            tanh(n, out=n)
            subtract(h, n, out=h_new)    # h' = n + z ⊙ (h - n) = (1 - z) ⊙ n + z ⊙ h
            h_new *= z
            h_new += n
            x = h_new
        return x

    def _lstm(self, x, h_in, c_in, h_out, c_out, prepared):
        g = self._gates_x
        iof, i, o, f, cell, ones, half = self._views
        dot, tanh, multiply = np.dot, np.tanh, np.multiply
        for layer, weights in enumerate(self._layers):
            w, _, bias, gh = weights
            h_new, c_new = h_out[layer, 0], c_out[layer, 0]
            dot(w, x, out=g)
            if not prepared:
                self._recurrent(weights, h_in[layer, 0])
            g += gh
            g += bias
            tanh(g, out=g)
            iof += ones
            iof *= half
            multiply(f, c_in[layer, 0], out=c_new)
            i *= cell
            c_new += i
            tanh(c_new, out=h_new)
            h_new *= o
            x = h_new
        return x


class NumpyBackend(Backend):
    """Runs the decoder with numpy alone; the reference for the device."""

    name = "numpy"
    install_hint = "pip install numpy"

    def __init__(self, weights):
        super().__init__(weights)
        self._weights = weights
        self._rnn = NumpyRnn(weights)
        self._state_count = 2 if weights.cell == "lstm" else 1
        self._state_shape = weights.state_shape
        self._run = self._rnn.run

    @classmethod
    def unavailable_reason(cls):
        return None

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False):
        return cls(onnx_weights.load_rnn_weights(onnx_path))

    def initial_state(self):
        return zero_state(self._weights)

    def step(self, features, state):
        # The positions and the state are new arrays every step (0.2-0.3 µs each): a caller may keep
        # what an earlier step returned (the self-test and the tests do), so nothing is reused.
        features = self._features(features)
        shape, float32 = self._state_shape, np.float32
        if self._state_count == 1:
            new_state = (np.empty(shape, float32),)
        else:
            new_state = (np.empty(shape, float32), np.empty(shape, float32))
        positions = np.empty(self.n_outputs, float32)
        self._run(features, state, positions, new_state)
        return positions, new_state

    def prepare(self, state):
        self._rnn.prepare(state)

    def state_arrays(self, state):
        return [np.array(item, dtype=np.float32) for item in state]
