"""Write the golden decoder models and torch's reference vectors for the device tests.

    .venv/bin/python tests/workstation/make_golden_onnx.py            # everything
    .venv/bin/python tests/workstation/make_golden_onnx.py --plain    # only the loop-free exports

Writes, under tests/device/data/:
  golden_gru.onnx   GRU, 2 layers x 8, input projection 4, 6 features -> 5 outputs
  golden_lstm.onnx  LSTM, 1 layer x 6, no projection, 5 features -> 6 outputs
  golden_<cell>_plain.onnx  the same model exported loop-free (no GRU/LSTM node)
  golden_<cell>.npz features (steps, n_features), positions (steps, n_outputs),
                    h_final [, c_final] (layers, 1, hidden): torch's results,
                    stepping from a zero state (np.load(..., allow_pickle=False))

The device tests (Python 3.6, no torch) check the numpy and fake-TensorRT
backends against these.  Deterministic: the same torch gives the same files.
"""
import os
import sys

import numpy as np
import torch

from neurohand.train.model import ModelConfig, build_model
from neurohand.train.export import export_onnx, export_plain_onnx, torch_reference

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "device", "data")
STEPS = 60
GOLDEN = {
    "gru": ModelConfig(n_features=6, n_outputs=5, cell="gru", hidden_size=8, num_layers=2, input_projection=4),
    "lstm": ModelConfig(n_features=5, n_outputs=6, cell="lstm", hidden_size=6, num_layers=1),
}


def make(cell, directory=DATA):
    config = GOLDEN[cell]
    torch.manual_seed(1234)
    model = build_model(config).eval()
    # Bigger than default init so the sigmoid outputs spread over 0..1.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)
    onnx_path = os.path.join(directory, "golden_{}.onnx".format(cell))
    report = export_onnx(model, config, onnx_path, check_steps=STEPS)
    features = (np.random.RandomState(99).standard_normal((STEPS, config.n_features)) * 1.5).astype(np.float32)
    positions, states = torch_reference(model, features)
    arrays = {"features": features, "positions": positions, "h_final": states[-1][0]}
    if cell == "lstm":
        arrays["c_final"] = states[-1][1]
    np.savez(os.path.join(directory, "golden_{}.npz".format(cell)), **arrays)
    return report


def make_plain(cell, directory=DATA, out_directory=None):
    """golden_CELL_plain.onnx: the loop-free export of the committed golden_CELL.onnx (its weights,
    put back into torch), so the TensorRT tests can build the plain graph without torch."""
    from neurohand.train.torch_backend import TorchBackend

    onnx_path = os.path.join(directory, "golden_{}.onnx".format(cell))
    backend = TorchBackend.from_onnx(onnx_path)
    model = backend._model
    path = os.path.join(out_directory or directory, "golden_{}_plain.onnx".format(cell))
    return export_plain_onnx(model, model.config, path, reference_onnx=onnx_path, check_steps=STEPS)


def main():
    plain_only = sys.argv[1:] == ["--plain"]
    for cell in GOLDEN:
        report = make_plain(cell) if plain_only else make(cell)
        print("{}: {} bytes, max abs error {}".format(
            report["path"], os.path.getsize(report["path"]), report["max_abs_error"]))
        if not plain_only:
            report = make_plain(cell)
            print("{}: {} bytes, max abs error {}".format(
                report["path"], os.path.getsize(report["path"]), report["max_abs_error"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
