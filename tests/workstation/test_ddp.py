"""Training under torchrun with two CPU processes on the gloo backend (DistributedDataParallel)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch.distributed")

from test_train_data import TINY_CONFIG, make_recording  # noqa: E402


def test_two_gloo_processes_shard_batches_and_rank_0_writes(tmp_path):
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch has no gloo backend here")
    recording = str(make_recording(tmp_path / "r.nhr", seconds=60.0))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "neurohand.deploy", "train", recording, "--out", str(tmp_path / "run"), "--config", str(config),
         "--device", "cpu", "--quiet", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only rank 0 prints and writes.
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "config.json", "metrics.json", "model.onnx",
                                                     "model_plain.onnx", "report.png"]
    # Each process ran half of the epoch's batches (the plan is padded to an even count).
    from neurohand.train import trainer
    single = trainer.train_run([recording], str(tmp_path / "single"), TINY_CONFIG, seed=0, progress=False)
    for ddp_batches, single_batches in zip(summary["history"]["batches"], single["history"]["batches"]):
        assert ddp_batches == (single_batches + 1) // 2
    assert single["world_size"] == 1
