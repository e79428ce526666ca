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

The names live in :mod:`neurohand.decoder.backend_registry` (standard library
only, so every ``--backend`` option takes its choices from there); a backend's
module is imported when that backend is asked for or tried.
"""
import os

from neurohand.decoder.backend_registry import AUTO_ORDER, BACKEND_CHOICES, BACKENDS, backend_class
from neurohand.decoder.backends.base import Backend, BackendUnavailableError
from neurohand.firmware_bridge.shared.checks import check_file_exists, check_option
from neurohand.firmware_bridge.shared.errors import UsageError

__all__ = ["BACKENDS", "AUTO_ORDER", "BACKEND_CHOICES", "Backend", "BackendUnavailableError",
           "available_backends", "backend_class", "create_backend"]


def available_backends():
    """Names of the backends that can run on this machine, in registry order."""
    return [name for name in BACKENDS if backend_class(name).unavailable_reason() is None]


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
        chosen = backend_class(name)
        if fp16 and name != "tensorrt":
            raise UsageError("fp16 applies to the tensorrt backend only, not {!r}".format(name))
        reason = chosen.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError("backend {!r} is not available: {}".format(name, reason))
        return chosen.from_onnx(onnx_path, engine_path=engine_path, fp16=fp16)
    skipped = []
    for candidate in AUTO_ORDER:
        chosen = backend_class(candidate)
        reason = chosen.unavailable_reason()
        if reason is not None:
            skipped.append("{}: {}".format(candidate, reason))
            continue
        use_fp16 = fp16 and candidate == "tensorrt"
        backend = chosen.from_onnx(onnx_path, engine_path=engine_path, fp16=use_fp16)
        note = "auto picked {}".format(candidate)
        if skipped:
            note += " (skipped {})".format("; ".join(skipped))
        if fp16 and not use_fp16:
            note += "; fp16 ignored (TensorRT only)"
        backend.selected_by = note
        return backend
    raise BackendUnavailableError("no backend available: {}".format("; ".join(skipped)))
