"""`neurohand demo` end to end with small settings: every stage, the report folder, the summary."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from neurohand.deploy.demo import (COLLECTED_QUALITY, COLLECTED_RECORDING, MARKER, hand_delays,  # noqa: E402
                                   train_accepts)
from neurohand.firmware_bridge.shared.errors import RecordingError  # noqa: E402
from neurohand.deploy.replay import r2_scores  # noqa: E402
from neurohand.train import metrics  # noqa: E402

SMALL = ["--train-seconds", "60", "--heldout-seconds", "8", "--replay-seconds", "6", "--channels", "4",
         "--rate", "2000", "--epochs", "3", "--backend", "numpy"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "demo-output")
    result = run_cli("demo", "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr
    return out, result


def test_demo_writes_the_report_folder(demo):
    out, _ = demo
    for name in ("summary.json", "decoded.png", "latency.png", "training-report.png", "replay-stats.json",
                 "train.nhr", "heldout.nhr", COLLECTED_RECORDING, COLLECTED_QUALITY, MARKER):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for name in ("decoded.png", "latency.png", "training-report.png"):
        with open(os.path.join(out, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert os.path.isfile(os.path.join(out, "bundle", "manifest.json"))
    assert os.listdir(os.path.join(out, "bundle", "selftest"))          # the self-test result was recorded


def test_demo_summary_holds_every_stage(demo):
    out, result = demo
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    replay = summary["replay"]
    assert replay["mode"] == "realtime" and replay["seconds"] == 6.0 and replay["devices"] == "process"
    assert len(replay["r2"]) == 5 and replay["label_names"][0] == "thumb"
    assert replay["frames"]["received"] >= 0.9 * 6 * 2000 / 20 and replay["frames"]["missing"] == 0
    assert replay["safety_events"] == 0
    assert replay["latency_us"]["count"] > 0 and replay["latency_us"]["p50"] > 0
    assert summary["training"]["epochs_run"] == 3
    assert summary["selftest"]["passed"] and summary["selftest"]["backend"] == "numpy"
    assert set(summary["evaluate"]["baselines"]) == {"wiener", "kalman"}
    assert set(summary["stage_seconds"]) == {"simulate", "collect", "train", "bundle", "selftest", "evaluate",
                                             "replay"}
    delay = summary["hand_delay_ms"]
    assert 0 < delay["p50"] <= delay["p99"] <= delay["max"]
    # Progress lines for each stage on stderr, the table on stdout.
    for stage in range(1, 8):
        assert "[{}/7]".format(stage) in result.stderr
    assert "finger" in result.stdout and "latency" in result.stdout and "safety events" in result.stdout


def test_demo_reports_the_class_head_next_to_lda(demo):
    """The simulator's movements train a class head (class_head "auto"); the demo scores it in the replay and
    on the test split, beside the LDA, and draws its confusion matrix."""
    out, result = demo
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    classes = summary["replay"]["classes"]
    assert classes["class_names"][0] == "rest" and len(classes["confusion"]) >= len(classes["class_names"])
    assert sum(map(sum, classes["confusion"])) > 0 and 0.0 <= classes["balanced_accuracy"] <= 1.0
    tested = summary["evaluate"]["classes_balanced_accuracy"]
    assert set(tested) == {"rnn", "lda"}
    with open(os.path.join(out, "confusion.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    line = [text for text in result.stdout.splitlines() if text.startswith("classes ")]
    assert line and "replay balanced accuracy {:.3f}".format(classes["balanced_accuracy"]) in line[0]
    assert "lda {:.3f}".format(tested["lda"]) in line[0]


def test_demo_collect_stage_records_what_train_reads(demo):
    """The collect stage: 7.5 s through virtual chip and glove, nothing lost, the file as train reads it."""
    from neurohand.train import dataset
    out, result = demo
    with open(os.path.join(out, "summary.json")) as handle:
        collected = json.load(handle)["collect"]
    assert 7.4 <= collected["seconds"] <= 7.6 and collected["trials"] == 4
    assert collected["chip_frames_lost"] == 0 and collected["chip_samples_missing"] == 0
    assert collected["glove_samples_lost"] == 0 and collected["signal_identical"]
    assert collected["unusable"] is None
    # Against the virtual devices' schedules, at the tests' 2 kHz as at the demo's 10 kHz (issue 15: p99 <= 5 ms).
    assert collected["alignment_ms"]["n"] > 100 and collected["alignment_ms"]["p99"] <= 5.0
    assert collected["train_accepts"]["repetitions"] == [1, 2] and collected["train_accepts"]["movements"] == [1, 2]
    # The file itself, read as train reads it: glove labels for every sample, the protocol's events.
    data = dataset.load_recording(os.path.join(out, COLLECTED_RECORDING))
    assert data.labels.name == "glove" and list(data.labels.names) == ["thumb", "index", "middle", "ring", "little"]
    assert len(data.labels.data) >= data.n_samples / data.signal_rate * data.labels.rate
    assert data.signals.shape[1] == 4 and data.signal_rate == 2000.0
    assert [e.value for e in data.events if e.kind == "repetition"] == [1, 2]
    assert [e.value for e in data.events if e.kind == "movement" and e.value] == [1, 2, 1, 2]
    with open(os.path.join(out, COLLECTED_QUALITY)) as handle:
        assert "verdict: usable" in handle.read()
    # One progress line on stderr, one table line on stdout.
    for text in (result.stderr, result.stdout):
        assert "collected into collected.nh, chip frames lost 0, glove samples lost 0" in text
        assert "train accepts it: label stream 'glove' (5 fingers), repetitions 1,2, movements 1,2" in text


def test_train_accepts_refuses_a_recording_without_repetitions(tmp_path):
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    path = str(tmp_path / "no-events.nh")
    with RecordingWriter(path, signal_rate=1000.0, channel_names=["a"], dtype="int16", scale_uv=[1.0],
                         label_streams={"glove": {"rate": 100.0, "names": ["thumb"]}}) as writer:
        writer.append_signals(np.zeros((1000, 1), dtype=np.int16))
        writer.append_labels("glove", np.zeros((100, 1)))
        writer.add_event(0, "movement", value=1)
    with pytest.raises(RecordingError, match="no repetition or movement events"):
        train_accepts(path)


def test_demo_replaces_only_its_own_folder(demo, tmp_path):
    out, _ = demo
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    result = run_cli("demo", "--out", str(precious), *SMALL)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "not an earlier demo's folder" in result.stderr
    assert (precious / "data.txt").read_text() == "keep me"


def test_replay_r2_is_the_training_metric():
    rng = np.random.RandomState(1)
    truth = rng.uniform(size=(40, 5))
    prediction = truth + rng.normal(scale=0.2, size=truth.shape)
    assert np.allclose(r2_scores(truth, prediction), metrics.r2_score(truth, prediction))


def test_hand_delays_attribute_commands_to_the_window_they_answer():
    # 2 kHz, stride 40, frames of 20: the window ending at 400 completes with frame 19, sent at sample 380.
    samples = np.array([380.0 + 2.0, 380.0 + 19.0, 420.0 + 4.0])
    assert np.allclose(hand_delays(samples, 2000.0, 40, 20), np.array([2.0, 19.0, 4.0]) / 2000.0)


def test_fast_replay_scores_what_evaluate_decodes(demo):
    """Same recording range, same causal decode: replay --fast (post-processing reduced to the 0..1 clamp)
    gives evaluate's streaming outputs and the same R²."""
    from neurohand.decoder.pipeline import FeaturePipeline
    from neurohand.deploy import replay
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.recording.file_format import open_recording
    from neurohand.train import dataset, evaluate, splits

    out, _ = demo
    config, onnx_path = evaluate.load_run(os.path.join(out, "run"))
    held_out = os.path.join(out, "heldout.nhr")
    data = dataset.load_recording(held_out, "fingers")
    seconds = 6.0
    segment = splits.Segment(0, int(seconds * data.signal_rate), "test")
    [(outputs, ends)] = evaluate.stream_decode(FeaturePipeline.from_config(config["pipeline"]), onnx_path, data,
                                               [segment], 100)
    with open_recording(held_out) as recording:
        outcome = replay.replay_fast(load_decoder(os.path.join(out, "bundle"), "numpy"), recording,
                                     replay.ReplayRange(recording, 0.0, seconds, "fast"),
                                     RuntimeConfig(max_slew_per_s=None, smoothing="exponential",
                                                   status_interval_s=0))
    assert np.array_equal(outcome.samples, ends)                  # every window, the same ends
    assert np.allclose(outcome.positions, np.clip(outputs, 0.0, 1.0), atol=1e-6)
    scaling = dataset.LabelScaling.from_config(config["labels"]["scaling"])
    truth = scaling.apply(data.labels.data[dataset.label_rows(ends, data.signal_rate, data.labels.rate,
                                                              len(data.labels.data))])
    assert np.allclose(outcome.truth, truth)
    scored = outcome.scored
    expected = metrics.r2_score(truth[scored], np.clip(outputs, 0.0, 1.0)[scored])
    reported = np.array([np.nan if v is None else v for v in outcome.summary["r2"]])
    assert np.any(np.isfinite(expected))
    assert np.allclose(reported, expected, atol=1e-6, equal_nan=True)
