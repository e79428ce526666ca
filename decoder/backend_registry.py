"""The inference backends by name: the one list that ``create_backend``, ``auto``
and every ``--backend`` option share.

Standard library only, and each backend named by where its class lives rather
than imported, so the command line can offer the choices without importing
numpy, and naming a backend costs nothing until it is used.
"""
import importlib

# Explicit registry: name -> "module:class".  The torch backend steps the
# training model itself; it is a workstation tool that lives with the training
# code (train/), is never picked by "auto", and is imported only when asked for.
BACKENDS = {
    "tensorrt": "neurohand.decoder.backends.tensorrt_backend:TensorRTBackend",
    "onnxruntime": "neurohand.decoder.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "numpy": "neurohand.decoder.backends.numpy_backend:NumpyBackend",
    "torch": "neurohand.train.torch_backend:TorchBackend",
}
# What "auto" tries, in order of preference.  numpy before ONNX Runtime: both step a batch-1 RNN in about
# 20 us in a tight loop, but in the real-time loop, where a step follows 20 ms of other work, ONNX Runtime's
# took 218-264 us at p50 against numpy's 73-86 us (15-30-s replays on the 2-core workstation, loaded and
# quiet alike: docs/latency.md).
AUTO_ORDER = ("tensorrt", "numpy", "onnxruntime")
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)


def backend_class(name):
    """The class of backend ``name`` (a key of BACKENDS), imported now."""
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
