"""neurohand train --init-from: fine-tuning an earlier run on a short new session."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.decoder.pipeline import FeaturePipeline  # noqa: E402
from neurohand.firmware_bridge.shared.digest import sha256_of  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import trainer  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402

# minmax scaling, so that keeping the earlier run's label scaling is visible (fingers in 0..1 would get none).
OLD_CONFIG = dict(TINY_CONFIG, labels={"scaling": "minmax"})


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    base = tmp_path_factory.mktemp("init_from")
    recording = str(make_recording(base / "day1.nhr", seconds=60.0, seed=0))
    run_dir = str(base / "day1")
    trainer.train_run([recording], run_dir, OLD_CONFIG, seed=1, progress=False, light=True)
    # Day two: 30 s, another mixing and other label ranges, no repetition events (the time split).
    new = str(make_recording(base / "day2.nhr", seconds=30.0, seed=7, repetitions=False))
    return base, run_dir, recording, new


def weights(run_dir):
    return trainer.load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["best_model"]


def config_of(run_dir):
    with open(os.path.join(run_dir, "config.json")) as handle:
        return json.load(handle)


def sha256(path):
    return sha256_of(path)


def finetune(base, name, old_run, new, training, **kwargs):
    run_dir = str(base / name)
    summary = trainer.train_run([new], run_dir, {"training": training}, seed=2, progress=False, init_from=old_run,
                                light=True, **kwargs)
    return run_dir, summary


def test_fine_tuning_starts_from_the_old_weights_and_records_where_from(old):
    base, old_run, _, new = old
    # A learning rate too small to move anything: the best weights are the old run's.
    run_dir, summary = finetune(base, "still", old_run, new, {"epochs": 1, "learning_rate": 1e-12})
    before, after = weights(old_run), weights(run_dir)
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_allclose(after[name].numpy(), before[name].numpy(), atol=1e-6)
    config, previous = config_of(run_dir), config_of(old_run)
    record = {"run_dir": os.path.abspath(old_run), "config_sha256": sha256(os.path.join(old_run, "config.json")),
              "checkpoint_sha256": sha256(os.path.join(old_run, "checkpoint.pt")),
              "recordings_sha256": previous["recordings_sha256"]}
    assert config["init_from"] == summary["init_from"] == record
    assert config["model"] == previous["model"]
    # Label scaling kept (the new session's labels span other ranges), normalisation fitted anew.
    assert config["labels"]["scaling"] == previous["labels"]["scaling"]
    assert config["labels"]["scaling"]["kind"] == "minmax"
    old_norm = FeaturePipeline.from_config(previous["pipeline"]).normalisation
    new_norm = FeaturePipeline.from_config(config["pipeline"]).normalisation
    assert not np.allclose(old_norm[0], new_norm[0])
    # The fine-tuning settings, and a 30 s session split in time with a validation block.
    training = config["settings"]["training"]
    assert training["learning_rate"] == 1e-12 and training["l2sp"] == trainer.FINETUNE_DEFAULTS["l2sp"]
    assert training["weight_decay"] == 0.0
    assert config["split"]["recordings"][0]["method"] == "time"
    assert summary["n_windows"]["validation"] > 50 and summary["n_windows"]["test"] > 50


def test_frozen_recurrent_layers_stay_and_l2sp_pulls_toward_the_old_weights(old):
    base, old_run, _, new = old
    before = weights(old_run)
    frozen, _ = finetune(base, "frozen", old_run, new, {"epochs": 1, "learning_rate": 3e-2, "l2sp": 0.0,
                                                        "freeze_recurrent_epochs": 1})
    after = weights(frozen)
    for name in before:
        if name.startswith(trainer.RECURRENT_PREFIX):
            assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["head.weight"], before["head.weight"])

    def distance(run_dir):
        got = weights(run_dir)
        return float(sum(((got[k] - before[k]) ** 2).sum() for k in before))

    free, _ = finetune(base, "free", old_run, new, {"epochs": 1, "learning_rate": 3e-2, "l2sp": 0.0})
    pulled, _ = finetune(base, "pulled", old_run, new, {"epochs": 1, "learning_rate": 3e-2, "l2sp": 10.0})
    assert 0 < distance(pulled) < 0.5 * distance(free)


def test_resume_continues_and_force_cannot_write_over_the_earlier_run(old, capsys):
    base, old_run, _, new = old
    run_dir, first = finetune(base, "resumed", old_run, new, {"epochs": 1})
    assert first["epochs_run"] == 1
    summary = trainer.train_run([new], run_dir, {"training": {"epochs": 2}}, seed=2, progress=False,
                                init_from=old_run, resume=True, light=True)
    assert summary["epochs_run"] == 2
    # Other earlier weights are other training: refused.
    other = str(base / "day1_changed")
    shutil.copytree(old_run, other)
    document = trainer.load_checkpoint(os.path.join(other, "checkpoint.pt"))
    document["best_model"]["head.bias"] += 1.0
    torch.save(document, os.path.join(other, "checkpoint.pt"))
    with pytest.raises(UsageError, match="other settings"):
        trainer.train_run([new], run_dir, {"training": {"epochs": 3}}, seed=2, progress=False, init_from=other,
                          resume=True)
    assert cli.main(["train", new, "--init-from", old_run, "--out", old_run, "--force", "--quiet"]) == 2
    assert "input" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(old_run, "model.onnx"))


@pytest.mark.parametrize("kind, match", [
    ("channels", "channels at"),
    ("outputs", "decodes"),
    ("model section", "may not give a 'model' section"),
    ("no run", "--init-from"),
])
def test_refusals_name_what_is_wrong(old, kind, match, capsys):
    base, old_run, _, new = old
    config, init = None, old_run
    if kind == "channels":
        new = str(make_recording(base / "three.nhr", seconds=30.0, n_channels=3, repetitions=False))
    elif kind == "outputs":
        new = str(make_recording(base / "two.nhr", seconds=30.0, n_outputs=2, repetitions=False))
    elif kind == "model section":
        config = str(base / "model.json")
        with open(config, "w") as handle:
            json.dump({"model": {"hidden_size": 4}}, handle)
    else:
        init = str(base / "missing")
    out = str(base / "refused")
    args = ["train", new, "--init-from", init, "--out", out, "--quiet", "--epochs", "1"]
    assert cli.main(args + (["--config", config] if config else [])) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(os.path.join(out, "config.json"))


def test_fine_tuning_settings_need_init_from(old):
    _, _, recording, _ = old
    with pytest.raises(UsageError, match="fine-tuning only"):
        trainer.resolve_settings({"training": {"l2sp": 0.1}}, "envelope")


def test_runs_record_the_patient_their_recordings_are_of(old, tmp_path):
    base, old_run, _, _ = old
    assert config_of(old_run)["patient"] is None                      # its recording does not say
    day1 = str(make_recording(tmp_path / "p7-day1.nhr", seconds=40.0, seed=3, metadata={"patient": "P7"}))
    other = str(make_recording(tmp_path / "p8.nhr", seconds=40.0, seed=4, metadata={"patient": "P8"}))
    run = str(tmp_path / "p7")
    trainer.train_run([day1], run, dict(TINY_CONFIG, training={"epochs": 1}), seed=1, progress=False, light=True)
    assert config_of(run)["patient"] == "P7"
    mixed = str(tmp_path / "mixed")
    trainer.train_run([day1, other], mixed, dict(TINY_CONFIG, training={"epochs": 1}), seed=1, progress=False,
                      light=True)
    assert config_of(mixed)["patient"] is None                        # no one patient's decoder
    # A short new session that does not say keeps the patient of the run it was fine-tuned from.
    silent = str(make_recording(tmp_path / "day2.nhr", seconds=30.0, seed=5, repetitions=False))
    tuned, _ = finetune(tmp_path, "tuned", run, silent, {"epochs": 1})
    assert config_of(tuned)["patient"] == "P7"
