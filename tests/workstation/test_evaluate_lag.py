"""The intent-to-command lag in ``neurohand evaluate``: present for the RNN and the baselines, and
measured on the right time axis (a decoder replaced by the truth delayed a known time shows that time)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from neurohand.deploy.cli import main as cli  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import RecordingWriter  # noqa: E402
from neurohand.train import evaluate, trainer  # noqa: E402
from test_train_data import TINY_CONFIG  # noqa: E402

RATE = 100.0
MOVE_S, REST_S = 2.0, 2.0
LAG_KEYS = ("onset_p50", "onset_p90", "release_p50", "xcorr", "onsets", "onsets_missed", "reason")


def make_movement_recording(path, repetitions=10, seed=0):
    """NinaPro's layout: each repetition a 2 s movement (rounded ramps of two of three fingers) then
    2 s rest, with 'movement' and 'repetition' events; signals a noisy mix of the finger positions."""
    rng = np.random.default_rng(seed)
    period = MOVE_S + REST_S
    n = int((1.0 + repetitions * period) * RATE)
    t = np.arange(n) / RATE
    labels = np.zeros((n, 3))
    events = []
    for k in range(repetitions):
        start = 1.0 + k * period
        rise = np.clip((t - start) / 0.3, 0, 1) * np.clip((start + MOVE_S - t) / 0.3, 0, 1)
        labels[:, k % 3] += rise
        labels[:, (k + 1) % 3] += 0.6 * rise
        events += [(int(start * RATE), "repetition", k + 1), (int(start * RATE), "movement", 1 + k % 3),
                   (int((start + MOVE_S) * RATE), "repetition", 0), (int((start + MOVE_S) * RATE), "movement", 0)]
    mixing = rng.uniform(0.2, 1.0, (3, 4))
    signals = (labels @ mixing + 0.05 * rng.random((n, 4)) + 0.05).astype(np.float32)
    with RecordingWriter(str(path), RATE, ["ch{}".format(i) for i in range(4)], dtype="float32",
                         metadata={"signal_kind": "envelope"},
                         label_streams={"fingers": {"rate": RATE, "names": ["f0", "f1", "f2"]}}) as writer:
        writer.append_signals(signals)
        writer.append_labels("fingers", labels.astype(np.float32))
        for sample, kind, value in sorted(events):
            writer.add_event(sample, kind, value)
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluate_lag")
    recording = make_movement_recording(base / "r.nhr")
    run_dir = str(base / "run")
    config = dict(TINY_CONFIG, pipeline={"window_s": 0.2, "stride_s": 0.02})
    trainer.train_run([recording], run_dir, config, seed=1, progress=False)
    return run_dir, recording


def test_evaluate_reports_lag_for_the_rnn_and_the_baselines(run, capsys):
    run_dir, recording = run
    assert cli.main(["evaluate", run_dir, recording, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for lag in [result["lag_ms"]] + [result["baselines"][name]["lag_ms"] for name in ("wiener", "kalman")]:
        for key in LAG_KEYS:
            assert key in lag, key
        # Test repetitions 2, 5 and 7: three movements of two fingers each, every one accounted for.
        assert lag["movements"] == 3
        assert lag["onsets"] + lag["onsets_missed"] + lag["onsets_not_measured"] == 6
        assert lag["xcorr"] is not None and abs(lag["xcorr"]) < 1000
    assert cli.main(["evaluate", run_dir, recording]) == 0
    table = capsys.readouterr().out
    assert "onset ms" in table.splitlines()[0] and "xcorr" in table.splitlines()[0]
    assert "lag (rnn" in table


@pytest.mark.parametrize("delay_s", [0.0, 0.15, -0.06])
def test_a_decoder_that_is_the_truth_delayed_shows_that_delay(run, monkeypatch, delay_s):
    """stream_decode replaced by the scaled labels at each window end minus ``delay_s``: the lag is the
    delay within one label sample (10 ms), onsets and releases alike, and nothing is missed."""
    run_dir, recording = run
    real_decode = evaluate.stream_decode

    def delayed_truth(pipeline, onnx_path, rec, segments, block_samples):
        decoded = real_decode(pipeline, onnx_path, rec, segments, block_samples)
        config, _ = evaluate.load_run(run_dir)
        scaling = evaluate.dataset.LabelScaling.from_config(config["labels"]["scaling"])
        return [(evaluate.truth_on_grid(rec, scaling, ends - delay_s * RATE), ends) for _, ends in decoded]

    monkeypatch.setattr(evaluate, "stream_decode", delayed_truth)
    lag = evaluate.evaluate_run(run_dir, recording, with_baselines=False)["lag_ms"]
    step_ms = 1000.0 / RATE
    assert lag["onsets_missed"] == lag["releases_missed"] == 0
    assert lag["onsets"] == lag["releases"] == 6
    for key in ("onset_p50", "onset_p90", "release_p50", "xcorr"):
        # The decoder steps every 20 ms: a crossing shows up at the next step, up to a stride late.
        assert delay_s * 1000 - step_ms <= lag[key] <= delay_s * 1000 + 20 + step_ms, (key, lag)
