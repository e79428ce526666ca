"""Splits and the dataset stage (features + causally aligned labels); also the small synthetic
recordings the other training tests share (``make_recording``)."""
import collections

import numpy as np
import pytest

pytest.importorskip("scipy")

from neurohand.decoder.pipeline import FeaturePipeline  # noqa: E402
from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.firmware_bridge.recording.file_format import RecordingWriter  # noqa: E402
from neurohand.train import dataset, splits  # noqa: E402

Event = collections.namedtuple("Event", ["sample", "kind", "value"])

# A small model and short schedule, so a training run takes seconds.
TINY_CONFIG = {
    "model": {"hidden_size": 8, "num_layers": 1, "input_projection": None, "dropout": 0.0},
    "training": {"epochs": 2, "batch_size": 4, "sequence_s": 4.0, "tbptt_steps": 50, "patience": 5},
}


def make_recording(path, seconds=120.0, rate=100.0, n_channels=4, n_outputs=3, repetitions=True, seed=0,
                   label_rate=None, label_stream="fingers", movements=False, metadata=None):
    """An envelope-like recording whose signals are a linear mix of smooth finger positions (0..1).

    With ``repetitions``: 10 repetitions, each movement 2 s then 1 s rest, as NinaPro lays them out."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    label_rate = label_rate or rate
    n_labels = int(seconds * label_rate)
    t = np.arange(n_labels) / label_rate
    phases = rng.uniform(0, 2 * np.pi, n_outputs)
    periods = rng.uniform(2.0, 6.0, n_outputs)
    labels = 0.5 + 0.45 * np.sin(2 * np.pi * t[:, None] / periods + phases)
    at_signal = labels[np.minimum((np.arange(n) / rate * label_rate).astype(int), n_labels - 1)]
    mixing = rng.uniform(0.2, 1.0, (n_outputs, n_channels))
    signals = (at_signal @ mixing + 0.05 * rng.random((n, n_channels)) + 0.05).astype(np.float32)
    with RecordingWriter(str(path), rate, ["ch{}".format(i) for i in range(n_channels)], dtype="float32",
                         metadata=dict({"signal_kind": "envelope"}, **(metadata or {})),
                         label_streams={label_stream: {"rate": label_rate,
                                                       "names": ["f{}".format(k) for k in range(n_outputs)]}}) as w:
        w.append_signals(signals)
        w.append_labels(label_stream, labels.astype(np.float32))
        if repetitions:
            period = int(3 * rate)
            for k in range(min(10, n // period)):
                w.add_event(k * period, "repetition", k + 1)
                w.add_event(k * period + int(2 * rate), "repetition", 0)
                if movements:       # with ``movements``: movement 1 in the first second, 2 in the next
                    w.add_event(k * period, "movement", 1)
                    w.add_event(k * period + int(rate), "movement", 2)
                    w.add_event(k * period + int(2 * rate), "movement", 0)
    return path


def repetition_events(rate=100.0, n_repetitions=10, move_s=2.0, rest_s=1.0, lead_s=1.0):
    events = [Event(0, "repetition", 0)]
    for k in range(n_repetitions):
        start = int((lead_s + k * (move_s + rest_s)) * rate)
        events.append(Event(start, "repetition", k + 1))
        events.append(Event(start + int(move_s * rate), "repetition", 0))
    return events


def test_repetition_split_tests_on_2_5_7_and_keeps_rest_with_its_repetition():
    events = repetition_events()
    n = int((1.0 + 10 * 3.0) * 100)
    method, segments = splits.plan_split(n, events, splits.check_split_settings({}), guard_samples=20)
    assert method == "repetition"
    runs = splits.repetition_runs(n, events)
    # Rest before repetition 1 belongs to it; rest after repetition k to k.
    assert runs[0] == (0, 400, 1) and runs[1] == (400, 700, 2)
    covered = np.zeros(n, dtype=int)
    for segment in segments:
        covered[segment.start:segment.stop] += 1
    assert np.all(covered == 1)
    repetition_of = np.zeros(n, dtype=int)
    for start, stop, repetition in runs:
        repetition_of[start:stop] = repetition
    for segment in segments:
        reps = set(repetition_of[segment.start:segment.stop].tolist())
        expected = {"test": {2, 5, 7}, "validation": {4}}.get(segment.split)
        if expected is None:
            assert not reps & {2, 4, 5, 7}
        else:
            assert reps <= expected
    assert {r for s in segments if s.split == "test" for r in repetition_of[s.start:s.stop]} == {2, 5, 7}


def test_time_split_leaves_a_guard_gap():
    method, segments = splits.plan_split(1000, [], splits.check_split_settings({}), guard_samples=15)
    assert method == "time"
    assert [s.split for s in segments] == ["train", "validation", "test"]
    assert segments[0] == (0, 700, "train")
    assert segments[1].start - segments[0].stop == 15 and segments[2].start - segments[1].stop == 15
    assert segments[2].stop == 1000


@pytest.mark.parametrize("settings, message", [
    ({"method": "repetitions"}, "did you mean 'repetition'"),
    ({"test_repetitions": [2], "validation_repetitions": [2]}, "both"),
    ({"test_fraction": 0.5, "validation_fraction": 0.45}, "at least 10 %"),
    ({"tets_repetitions": [1]}, "did you mean 'test_repetitions'"),
])
def test_split_settings_are_checked(settings, message):
    with pytest.raises(UsageError, match=message):
        splits.check_split_settings(settings)


def test_repetition_split_needs_the_repetitions():
    events = repetition_events(n_repetitions=3)
    with pytest.raises(UsageError, match="none of the test repetitions"):
        splits.plan_split(1000, events, splits.check_split_settings({"method": "repetition", "test_repetitions": [9]}), 20)
    with pytest.raises(UsageError, match="needs repetition events"):
        splits.plan_split(1000, [], splits.check_split_settings({"method": "repetition"}), 20)


def test_label_rows_are_causal_at_another_rate():
    # Windows ending at samples 100, 150, 200 of a 1 kHz signal end at 99, 149, 199 ms;
    # a 100 Hz label stream has rows 9, 14, 19 at or before those times.
    rows = dataset.label_rows([100, 150, 200], 1000.0, 100.0, 50)
    np.testing.assert_array_equal(rows, [9, 14, 19])
    np.testing.assert_array_equal(dataset.label_rows([1, 8], 100.0, 100.0, 10), [0, 7])
    with pytest.raises(UsageError, match="label stream ends"):
        dataset.label_rows([1000], 100.0, 100.0, 10)


def test_label_scaling_and_smoothing():
    labels = np.array([[0.0, 100.0], [5.0, 150.0], [10.0, 200.0]])
    scaling = dataset.LabelScaling.fit(labels)
    assert scaling.kind == "minmax"
    np.testing.assert_allclose(scaling.apply(labels), [[0, 0], [0.5, 0.5], [1, 1]])
    restored = dataset.LabelScaling.from_config(scaling.to_config())
    np.testing.assert_allclose(restored.invert(restored.apply(labels)), labels)
    assert dataset.LabelScaling.fit(np.array([[0.2], [0.9]])).kind == "none"
    smooth = dataset.smooth_labels(np.array([[0.0], [0.0], [3.0], [0.0], [0.0]]), 3)
    np.testing.assert_allclose(smooth[:, 0], [0, 1, 1, 1, 0])


def test_sequences_never_share_samples_across_splits(tmp_path):
    path = make_recording(tmp_path / "r.nhr", seconds=40.0)
    recording = dataset.load_recording(str(path))
    pipeline = FeaturePipeline.design(100.0, 4, {"mode": "envelope", "window_s": 0.2, "stride_s": 0.05})
    plans = dataset.split_recordings([recording], splits.check_split_settings({}), dataset.guard_samples(pipeline))
    sequences, scaling = dataset.build_sequences(pipeline, [recording], plans)
    assert scaling.kind == "none"            # finger positions stay as they are
    spans = {name: np.zeros(recording.n_samples, dtype=bool) for name in splits.SPLIT_NAMES}
    for name in splits.SPLIT_NAMES:
        for sequence in sequences[name]:
            for end in sequence.ends:
                spans[name][end - pipeline.window_samples:end] = True
    assert not np.any(spans["test"] & spans["train"])
    assert not np.any(spans["validation"] & spans["train"])
    assert not np.any(spans["test"] & spans["validation"])
    # Labels are the stream's rows at each window's last sample; features are normalised on train.
    first = sequences["train"][0]
    np.testing.assert_allclose(first.labels, recording.labels.data[first.ends - 1])
    train_features = np.concatenate([s.features for s in sequences["train"]])
    np.testing.assert_allclose(train_features.mean(axis=0), 0.0, atol=1e-4)


def test_auto_falls_back_to_time_blocks_with_too_few_repetitions():
    events = repetition_events(n_repetitions=3)       # no repetition 4 for validation, none 5 or 7
    method, segments = splits.plan_split(1000, events, splits.check_split_settings({}), 20)
    assert method == "time" and [s.split for s in segments] == ["train", "validation", "test"]
    method, _ = splits.plan_split(1000, events, splits.check_split_settings({"validation_repetitions": [3]}), 20)
    assert method == "repetition"


def test_lead_labels_moves_targets_earlier_and_holds_the_last_row():
    labels = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert dataset.lead_labels(labels, 2)[:, 0].tolist() == [2.0, 3.0, 3.0, 3.0]
    assert dataset.lead_labels(labels, 0)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("lead", [-0.1, 1.5, "x"])
def test_target_lead_is_checked(lead):
    from neurohand.train import trainer
    with pytest.raises(UsageError, match="target_lead_s"):
        trainer.resolve_settings({"training": {"target_lead_s": lead}}, "envelope")
