"""The TCN row of ``neurohand bench decoding`` (deploy/bench/decoding.py and report.py): trained and scored on
the bench's quick path, rendered next to the RNN, and left out on request (``--no-tcn``)."""
import pytest

from neurohand.deploy.bench import decoding
from neurohand.deploy.bench import report as bench_report


def render(result):
    headline, lines = bench_report.RENDERERS["decoding"](result)
    return headline, "\n".join(lines)


def test_quick_bench_trains_the_tcn_with_the_rnn_s_recipe_and_shows_its_row(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    entry = decoding.simulator(str(tmp_path), True, None)         # 40 s simulated, 1 epoch: the quick path
    tcn = entry["scores"]["tcn"]
    assert len(tcn["r2"]) == len(entry["label_names"]) and isinstance(tcn["mean_r2"], float)
    # The RNN's seed and budget (quick: one epoch), from evaluate --tcn's own report of its training.
    assert tcn["seed"] == decoding.TRAIN_SEED
    assert tcn["training"]["epochs_run"] == entry["training"]["epochs_run"] == 1
    headline, text = render({"datasets": {"sim": entry}, "tcn": True})
    table = text.split("| decoder |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[:4]] == [
        "| rnn", "| tcn (temporal convolutional network, Bai et al. 2018)", "| wiener", "| kalman"]
    assert "| {:.3f} |".format(tcn["mean_r2"]) in rows[1]
    assert ("test mean R², sim: RNN vs TCN", "{:.3f}".format(entry["scores"]["rnn"]["mean_r2"]),
            "{:.3f}".format(tcn["mean_r2"])) in [row[:3] for row in headline]


def test_without_the_tcn_evaluate_is_not_asked_for_it(monkeypatch):
    commands = []

    class Stop(Exception):
        pass

    def step(command, what, target="decoding"):
        commands.append(command)
        if "evaluate" in command:
            raise Stop()
        return "{}", 0.0
    monkeypatch.setattr(decoding, "run_step", step)
    monkeypatch.setattr(decoding, "json_output", lambda stdout, what: {})
    for with_tcn in (True, False):
        with pytest.raises(Stop):
            decoding.train_and_evaluate("rec", "run", True, None, "sim", with_tcn)
    assert ["--tcn" in command for command in commands if "evaluate" in command] == [True, False]


def test_run_passes_the_switch_to_each_data_set_and_records_it(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(decoding, "run_step", lambda command, what, target="decoding": ("", 0.0))
    monkeypatch.setattr(decoding, "train_and_evaluate",
                        lambda recording, run_dir, quick, max_minutes, label, with_tcn=True:
                        asked.append(with_tcn) or {"seconds": {}, "scores": {}, "training": {}})
    absent = str(tmp_path / "absent.mat")       # NinaPro skipped: the simulator alone trains
    result = decoding.run(True, ninapro_file=absent, with_tcn=False)
    assert asked == [False] and result["tcn"] is False
    assert "The TCN was left out (--no-tcn)." in render(result)[1]
    asked[:] = []
    assert decoding.run(True, ninapro_file=absent)["tcn"] is True and asked == [True]


def test_bench_cli_no_tcn_option():
    import argparse
    from neurohand.deploy.cli import bench

    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    assert bench.options_from(parser.parse_args(["bench", "decoding"])).tcn is True
    assert bench.options_from(parser.parse_args(["bench", "decoding", "--no-tcn"])).tcn is False
