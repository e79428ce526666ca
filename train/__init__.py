"""Workstation side: the PyTorch model and its backend, importers, training,
evaluation, baselines, reports and ONNX export.

Modern Python and torch are fine here; nothing ``neurohand run`` imports reaches this."""
