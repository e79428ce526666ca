"""The interface every inference backend implements.

A backend runs the exported decoder graph (train/export.py) one step at a
time::

    backend = SomeBackend.from_onnx(onnx_path, engine_path=None, fp16=False)
    state = backend.initial_state()
    positions, state = backend.step(features, state)   # (n_features,) float32 -> (n_outputs,) float32, 0..1
    backend.close()

The state is opaque: pass back exactly what the previous ``step`` (or
``initial_state``) returned.  ``state_arrays(state)`` copies it out as numpy
arrays (h[, c], each (num_layers, 1, hidden_size)) for tests and diagnostics,
never for the real-time loop.
"""
import numpy as np

from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError


class BackendUnavailableError(NeurohandError):
    """The requested backend's libraries are not installed on this machine."""


class Backend(object):
    """Base class; subclasses set ``name`` and ``install_hint`` and implement the methods.

    Attributes (set by subclasses once loaded)
    ----------
    name : str, registry name
    n_features, n_outputs, num_layers, hidden_size : int
    n_positions : int, class_names : tuple of str (the class head; n_outputs = n_positions + len(class_names))
    cell : "gru" or "lstm"
    selected_by : str, how create_backend chose this backend (e.g. what ``auto`` skipped)
    """

    name = None
    install_hint = ""

    def __init__(self, weights):
        """Store the shapes of the decoder from an ``onnx_weights.RnnWeights``."""
        self.cell = weights.cell
        self.n_features = weights.n_features
        self.n_outputs = weights.n_outputs
        # outputs[:n_positions] are finger positions, the rest class scores (onnx_weights.RnnWeights)
        self.n_positions = weights.n_positions
        self.class_names = weights.class_names
        self.num_layers = weights.num_layers
        self.hidden_size = weights.hidden_size
        self.selected_by = "requested"
        self._features_shape = (weights.n_features,)

    @classmethod
    def unavailable_reason(cls):
        """None if the backend can run here, else why not (what to install)."""
        raise NotImplementedError

    @classmethod
    def from_onnx(cls, onnx_path, engine_path=None, fp16=False):
        """Load the exported decoder at ``onnx_path``; return a ready backend."""
        raise NotImplementedError

    def initial_state(self):
        """A zero recurrent state."""
        raise NotImplementedError

    def step(self, features, state):
        """One decoder step: (positions ndarray (n_outputs,) float32 in 0..1, new state)."""
        raise NotImplementedError

    def prepare(self, state):
        """Compute ahead the part of the next :meth:`step` from ``state`` that needs the state alone.

        The runtime calls it once a window's command is on its way to the hand,
        so that work is off the path from the next window's last sample to the
        hand.  A step from another state ignores it.  Default: nothing (the step
        does it all).
        """

    def state_arrays(self, state):
        """Copy of ``state`` as a list of float32 arrays (num_layers, 1, hidden_size): [h] or [h, c]."""
        raise NotImplementedError

    def close(self):
        """Release what the backend holds (sessions, GPU memory); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _features(self, features):
        """``features`` as a contiguous float32 vector, checked against n_features."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != self._features_shape:
            raise UsageError("{} backend: features must have shape ({},), but got {}".format(
                self.name, self.n_features, features.shape))
        return features

    def __repr__(self):
        return "<{} backend: {} {}x{}, {} features -> {} outputs>".format(
            self.name, self.cell, self.num_layers, self.hidden_size, self.n_features, self.n_outputs)


def zero_state(weights):
    """A fresh zero state tuple for ``weights`` (GRU: (h,), LSTM: (h, c))."""
    count = 2 if weights.cell == "lstm" else 1
    return tuple(np.zeros(weights.state_shape, dtype=np.float32) for _ in range(count))


def parity_error(got, want):
    """How far ``got`` is from the reference ``want``: the largest ``|got - want| / max(1, |want|)``.

    Absolute where values lie within +-1 (positions, GRU and LSTM hidden states), relative beyond (class
    scores, an LSTM's cell state): an LSTM's cell state is not squashed and reaches tens on real data, where
    one float32 rounding step alone is several 1e-6, so an absolute tolerance would fail correct graphs there.
    NaN anywhere counts as infinitely far."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    error = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
    return error if error == error else float("inf")
