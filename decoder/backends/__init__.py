"""Inference backends for the exported decoder, behind one interface.

    from neurohand.decoder.backends import create_backend
    backend = create_backend("auto", "model.onnx")      # or "tensorrt", "onnxruntime", "numpy", "torch"
    state = backend.initial_state()
    positions, state = backend.step(features, state)    # (n_features,) float32 -> (n_outputs,) float32, 0..1
    backend.close()

``auto`` takes the first installed of TensorRT, ONNX Runtime and numpy (never
torch, which is a workstation tool) and says what it picked and why in
``backend.selected_by``.  A backend asked for by name that is not installed
raises :class:`BackendUnavailableError` naming what to install; there is no
silent fallback.  See docs/backends.md.

Every backend module imports only the standard library and numpy at module
level, so this registry can hold the classes themselves.
"""
import os

from neurohand.decoder.backends.base import Backend, BackendUnavailableError
from neurohand.decoder.backends.numpy_backend import NumpyBackend
from neurohand.decoder.backends.onnxruntime_backend import OnnxRuntimeBackend
from neurohand.decoder.backends.tensorrt_backend import TensorRTBackend
from neurohand.train.torch_backend import TorchBackend
from neurohand.firmware_bridge.shared.checks import check_file_exists, check_option
from neurohand.firmware_bridge.shared.errors import UsageError

__all__ = ["BACKENDS", "AUTO_ORDER", "BACKEND_CHOICES", "Backend", "BackendUnavailableError",
           "available_backends", "create_backend"]

# Explicit registry: name -> backend class.
BACKENDS = {
    "tensorrt": TensorRTBackend,
    "onnxruntime": OnnxRuntimeBackend,
    "numpy": NumpyBackend,
    "torch": TorchBackend,
}
# What "auto" tries, in order of preference.
AUTO_ORDER = ("tensorrt", "onnxruntime", "numpy")
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)


def available_backends():
    """Names of the backends that can run on this machine, in registry order."""
    return [name for name, backend_class in BACKENDS.items() if backend_class.unavailable_reason() is None]


def create_backend(name, onnx_path, engine_path=None, fp16=False):
    """Load the exported decoder at ``onnx_path`` with backend ``name``.

    Parameters
    ----------
    name : "auto" or a key of BACKENDS
    onnx_path : str, the model.onnx written by train/export.py
    engine_path : str or None, TensorRT engine cache (built there if absent); other backends ignore it
    fp16 : bool, TensorRT half precision; an error with any other explicitly named backend

    Returns a ready :class:`Backend`; ``backend.selected_by`` says how it was chosen.
    """
    name = check_option("backend", name, BACKEND_CHOICES)
    onnx_path = check_file_exists("ONNX model", os.fspath(onnx_path))
    if name != "auto":
        backend_class = BACKENDS[name]
        if fp16 and name != "tensorrt":
            raise UsageError("fp16 applies to the tensorrt backend only, not {!r}".format(name))
        reason = backend_class.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError("backend {!r} is not available: {}".format(name, reason))
        return backend_class.from_onnx(onnx_path, engine_path=engine_path, fp16=fp16)
    skipped = []
    for candidate in AUTO_ORDER:
        backend_class = BACKENDS[candidate]
        reason = backend_class.unavailable_reason()
        if reason is not None:
            skipped.append("{}: {}".format(candidate, reason))
            continue
        use_fp16 = fp16 and candidate == "tensorrt"
        backend = backend_class.from_onnx(onnx_path, engine_path=engine_path, fp16=use_fp16)
        note = "auto picked {}".format(candidate)
        if skipped:
            note += " (skipped {})".format("; ".join(skipped))
        if fp16 and not use_fp16:
            note += "; fp16 ignored (TensorRT only)"
        backend.selected_by = note
        return backend
    raise BackendUnavailableError("no backend available: {}".format("; ".join(skipped)))
