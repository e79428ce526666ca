"""neurohand bench recalibration: its bookkeeping (figures from fixed rows), its cropping and scoring, and the
CLI that keeps its results when 'all' (which does not run it) rewrites results.json.

The benchmark itself (--quick: 1 patient, 2 sessions, 5 trainings) takes longer than the suite's budget;
these tests check every piece it is built of, and run it once at its smallest (2 patients, 2 channels at 1 kHz,
30-s sessions, one epoch) with --jobs 1 and --jobs 2: the fresh interpreters of --jobs must give the same
figures (15-50 s with the load on the machine, most of it the workers importing torch)."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.deploy.bench import recalibration as rb  # noqa: E402
from neurohand.deploy.bench import report as bench_report  # noqa: E402
from neurohand.deploy.cli import bench  # noqa: E402
from neurohand.deploy.cli.main import main  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import open_recording  # noqa: E402
from neurohand.train import evaluate, metrics, splits, trainer  # noqa: E402
from test_train_data import TINY_CONFIG, make_recording  # noqa: E402

SETTINGS = {"patients": 2, "sessions": 3, "session_s": 190.0, "full_s": 150.0, "held_out_s": 40.0,
            "seconds": [30, 60], "scratch_training": {}, "finetune_training": {}}


def row(patient, session, full, unchanged, init60, device60, scratch60):
    def r2(value):
        return {"mean_r2": value, "mean_r": None if value is None else value + 0.3}
    return {"patient": patient, "session": session, "full": r2(full), "unchanged": r2(unchanged),
            "init_from_60s": r2(init60), "on_device_60s": r2(device60), "scratch_60s": r2(scratch60),
            "init_from_30s": r2(init60 - 0.1), "on_device_30s": r2(None if patient else 0.0),
            "scratch_30s": r2(scratch60 - 0.1)}


def test_summary_is_ratios_of_means_margins_targets_and_decay_per_day():
    rows = [row(0, 1, 0.4, 0.2, 0.38, 0.30, 0.20), row(0, 2, 0.2, 0.0, 0.18, 0.10, 0.10),
            row(1, 1, 0.6, 0.1, 0.50, 0.50, 0.30), row(1, 2, 0.4, -0.3, 0.30, 0.20, 0.30)]
    day1 = [{"within_day": {"mean_r2": 0.5, "mean_r": 0.7}}, {"within_day": {"mean_r2": 0.3, "mean_r": 0.5}}]
    result = rb.summarise(rows, day1, SETTINGS)
    full, init60, device60, scratch60 = 0.4, 0.34, 0.275, 0.225
    assert result["fraction_of_full"]["init_from_60s"] == pytest.approx(init60 / full, abs=1e-3)
    assert result["fraction_of_full"]["on_device_60s"] == pytest.approx(device60 / full, abs=1e-3)
    assert result["margin_over_scratch_60s"] == pytest.approx(init60 - scratch60, abs=1e-4)
    # A day where the on-device recalibration failed (None) is left out of its mean only.
    assert result["mean_r2"]["on_device_30s"] == 0.0
    targets = {t["name"]: t for t in result["targets"]}
    assert targets["fraction_of_full.init_from_60s"]["pass"] is False      # 0.85 < 0.9
    assert targets["fraction_of_full.on_device_60s"]["pass"] is False      # 0.69 < 0.8
    assert targets["margin_over_scratch_60s"]["pass"] is True              # 0.115 >= 0.1
    later = result["decay"]["later_days"]
    assert [d["day"] for d in later] == [2, 3]
    assert later[0]["unchanged_r2"] == pytest.approx(0.15) and later[1]["unchanged_r2"] == pytest.approx(-0.15)
    assert later[0]["full_r2"] == pytest.approx(0.5) and later[0]["unchanged_fraction_of_full"] == 0.3
    assert result["decay"]["day1"]["within_day_r2"] == pytest.approx(0.4)
    ratios = [0.38 / 0.4, 0.18 / 0.2, 0.5 / 0.6, 0.3 / 0.4]
    assert result["fraction_of_full_median_per_day"]["init_from_60s"] == pytest.approx(np.median(ratios), abs=1e-3)
    headline, lines = rb.render(dict(result, wall_s=12.0))
    assert [h[3] for h in headline] == ["MISSED", "MISSED", "pass"]
    assert any(line.startswith("| 2 | 0.150 |") for line in lines)
    # Without deploy/recalibrate.py: null with the reason, and the target is not judged.
    rows = [{k: v for k, v in r.items() if not k.startswith("on_device")} for r in rows]
    result = rb.summarise(rows, day1, SETTINGS, "not available (test)")
    assert result["on_device"] is None and result["on_device_reason"] == "not available (test)"
    assert result["fraction_of_full"]["on_device_60s"] is None
    assert {t["name"]: t["pass"] for t in result["targets"]}["fraction_of_full.on_device_60s"] is None
    json.dumps(result, allow_nan=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("recalibration_bench")
    recording = str(make_recording(base / "day.nhr", seconds=60.0, seed=2))
    run_dir = str(base / "run")
    trainer.train_run([recording], run_dir, TINY_CONFIG, seed=1, progress=False, light=True)
    return base, recording, run_dir


def test_crop_keeps_the_first_seconds_of_signals_labels_and_events(tiny):
    base, recording, _ = tiny
    cropped = rb.crop(recording, str(base / "first20.nhr"), 20.0)
    with open_recording(recording) as whole, open_recording(cropped) as part:
        assert part.n_samples == 2000 and part.channel_names == whole.channel_names
        np.testing.assert_array_equal(part.read_signals(), whole.read_signals(0, 2000))
        np.testing.assert_array_equal(part.label_streams["fingers"].data, whole.label_streams["fingers"].data[:2000])
        assert [(e.sample, e.value) for e in part.events] == [(e.sample, e.value) for e in whole.events
                                                              if e.sample < 2000]
        assert part.metadata["cropped_s"] == [0.0, 20.0]
    with pytest.raises(ValueError, match="fewer than"):
        rb.crop(recording, str(base / "too_long.nhr"), 61.0)


def test_score_equals_the_device_style_streaming_decode_of_the_block(tiny):
    _, recording, run_dir = tiny
    held = rb.HeldOut(recording, 15.0)
    got = rb.score(run_dir, held)
    config, onnx_path = evaluate.load_run(run_dir)
    pipeline, rec, _, _ = evaluate.prepare(config, recording)
    segment = splits.Segment(held.start, held.stop, "test")
    (outputs, ends), = evaluate.stream_decode(pipeline, onnx_path, rec, [segment], block_samples=5)
    truth = evaluate.truth_on_grid(rec, trainer.dataset.LabelScaling.from_config(config["labels"]["scaling"]), ends)
    expected = metrics.score(truth, outputs)
    assert got["mean_r2"] == pytest.approx(expected["mean_r2"], abs=1e-5)
    assert got["mean_r"] == pytest.approx(expected["mean_pearson_r"], abs=1e-5)
    assert not os.path.exists(os.path.join(run_dir, "report.png"))      # light run


def test_cli_registers_it_outside_all_and_all_keeps_its_results(tmp_path, monkeypatch, capsys):
    assert "recalibration" in bench.TARGETS and "recalibration" not in bench.target_names([])
    assert main(["bench", "recalibration", "--jobs", "0", "--quick"]) == 2
    assert "--jobs" in capsys.readouterr().err
    earlier = bench_report.new_document("neurohand bench all", False, ["parser", "recalibration"], {})
    earlier["targets"]["parser"] = {"status": "ok", "seconds": 1.0, "result": {"old": True}}
    earlier["targets"]["recalibration"] = {"status": "ok", "seconds": 2.0, "result": {"margin_over_scratch_60s": 0.2}}
    earlier["complete"] = True
    bench_report.write_results(str(tmp_path), earlier)
    monkeypatch.setattr(bench, "TARGETS", {"parser": lambda quick, options: {"new": True},
                                           "recalibration": bench.TARGETS["recalibration"]})
    assert main(["bench", "all", "--json", "--results-dir", str(tmp_path)]) == 0
    with open(str(tmp_path / "results.json")) as handle:
        document = json.load(handle)
    assert document["targets"]["parser"]["result"] == {"new": True}
    kept = document["targets"]["recalibration"]
    assert kept["result"] == {"margin_over_scratch_60s": 0.2} and kept["kept_from"] == earlier["started_utc"]
    assert document["target_order"] == ["parser", "recalibration"]


# The benchmark at the smallest sizes it takes (2 channels at 1 kHz, 30-s sessions, one epoch): figures mean
# nothing.  Most of this test's time is the fresh interpreters importing torch, which no size changes.
TINY = {"session_s": 30.0, "full_s": 22.0, "held_out_s": 6.0, "seconds": [20], "channels": 2, "rate_hz": 1000.0,
        "scratch_training": {"epochs": 1, "patience": 5}, "finetune_training": {"epochs": 1}}
TIMINGS = ("train_s", "recalibrate_s", "wall_s", "cpu_s", "jobs", "elapsed_s")


def figures(value):
    """``value`` without its timings (which differ between any two runs)."""
    if isinstance(value, dict):
        return {key: figures(item) for key, item in value.items() if key not in TIMINGS}
    if isinstance(value, list):
        return [figures(item) for item in value]
    return value


def test_jobs_in_fresh_interpreters_give_the_figures_of_one_process():
    one = rb.run(True, patients=2, sessions=2, jobs=1, progress=False, overrides=TINY)
    two = rb.run(True, patients=2, sessions=2, jobs=2, progress=False, overrides=TINY)
    assert one["jobs"] == 1 and two["jobs"] == 2
    assert [(r["patient"], r["session"]) for r in two["rows"]] == [(0, 1), (1, 1)]
    assert all(r["on_device_20s"]["mean_r2"] is not None for r in two["rows"]), two["rows"]
    assert figures(two) == figures(one)
    json.dumps(two, allow_nan=False)


def test_finetune_overrides_reach_the_fine_tuning_runs_only():
    settings = rb._settings(True)
    result = rb.summarise([], [], dict(settings, finetune_training=dict(settings["finetune_training"],
                                                                         learning_rate=3e-3)))
    assert result["settings"]["finetune_training"]["learning_rate"] == 3e-3
    assert rb._check_finetune('{"learning_rate": 3e-3, "freeze_recurrent_epochs": 2}') == {
        "learning_rate": 3e-3, "freeze_recurrent_epochs": 2}
    from neurohand.firmware_bridge.shared.errors import UsageError
    for bad, words in (("[1]", "JSON object"), ("{nope", "JSON object"), ('{"learning_rat": 1}', "learning_rat")):
        with pytest.raises(UsageError, match=words):
            rb._check_finetune(bad)
    # run() merges them into the fine-tuning settings only (checked before anything is measured).
    with pytest.raises(UsageError, match="learning_rat"):
        rb.run(True, progress=False, finetune={"learning_rat": 1})


@pytest.mark.parametrize("args", [["--seconds", "10"], ["--seconds", "60,x"], ["--finetune", "[1]"],
                                  ["--finetune", '{"learning_rat": 1}']])
def test_module_options_refuse_bad_values_in_one_line(args, capsys):
    with pytest.raises(SystemExit) as stopped:
        rb.main(["--quick", "--patients", "0"] + args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].count("error:") == 1
