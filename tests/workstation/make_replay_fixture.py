"""Make tests/device/data/replay_run/: a small trained run for the device tests of run and replay.

The device tests (Python 3.6, no torch) cannot train, so this script trains
once on the workstation and commits the run's model.onnx and config.json.
The device tests bundle them and simulate the held-out part of the same
session on the fly (``SESSION`` below, numpy only), so the recording matches
the model's patient, channels and rate.

    .venv/bin/python tests/workstation/make_replay_fixture.py

Deterministic for a given torch version (seeded); rerun it when the run
format or the feature pipeline changes.
"""
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "device", "data", "replay_run")

#: The simulated session (shared with tests/device/test_run_replay.py): train on
#: [0, TRAIN_S), the device tests replay from TRAIN_S on.
SESSION = {"seconds": 130.0, "n_channels": 4, "rate": 2000.0, "seed": 11, "difficulty": "easy"}
TRAIN_S = 110.0
TRAINING = {
    "model": {"hidden_size": 32, "num_layers": 1, "input_projection": 32},
    "training": {"epochs": 40, "sequence_s": 4.0, "batch_size": 8, "patience": 8},
}


def main():
    from neurohand.deploy.demo import write_session_parts
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig
    from neurohand.train import trainer

    work = tempfile.mkdtemp(prefix="replay-fixture-")
    try:
        recording = os.path.join(work, "train.nhr")
        write_session_parts(SimulatorConfig(**SESSION), [(recording, 0.0, TRAIN_S)])
        run_dir = os.path.join(work, "run")
        summary = trainer.train_run([recording], run_dir, TRAINING, seed=0, progress=False)
        os.makedirs(OUT, exist_ok=True)
        shutil.copyfile(os.path.join(run_dir, "model.onnx"), os.path.join(OUT, "model.onnx"))
        with open(os.path.join(run_dir, "config.json")) as handle:
            config = json.load(handle)
        # Absolute paths of a deleted temporary directory would only confuse a reader.
        config["recordings"] = ["train.nhr (tests/workstation/make_replay_fixture.py SESSION, [0, {:g}) s)".format(
            TRAIN_S)]
        config["fixture"] = {"session": SESSION, "train_s": TRAIN_S,
                             "test_mean_r2": summary["scores"]["test"]["mean_r2"]}
        with open(os.path.join(OUT, "config.json"), "w") as handle:
            json.dump(config, handle, indent=1, sort_keys=True)
            handle.write("\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("wrote {}: test mean R2 {:.3f}, {} epochs".format(os.path.normpath(OUT), summary["scores"]["test"]["mean_r2"],
                                                           summary["epochs_run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
