"""A model with a movement-class head on the device: backends, bundle, self-test, runtime, keys and replay.

The class-head models are the replay fixture's model (tests/device/data/replay_run) with its output
layer widened here, in the protobuf bytes, by one row per class and the class names put into the
model config of its metadata: what train/export.py writes for a run with a class head (positions
first, then one sigmoid score per class), made without torch so that these tests run on the device.
The widened rows have zero weights, so each class's score is its bias alone: the decided class is
known in advance, whatever the signal.
"""
import json
import os
import shutil
import threading

import numpy as np
import pytest

from neurohand.decoder import classes as measures
from neurohand.decoder import onnx_weights
from neurohand.decoder.backends import create_backend
from neurohand.deploy import replay as replay_module
from neurohand.deploy.bundle import load_bundle, make_bundle, open_bundle_backend
from neurohand.deploy.cli import main as cli
from neurohand.deploy.demo import write_session_parts
from neurohand.deploy.runtime import run_fast_replay
from neurohand.deploy.runtime.classes import ClassDecider, confidence
from neurohand.deploy.runtime.config import RuntimeConfig
from neurohand.deploy.runtime.decode import DecodedCommand
from neurohand.deploy.runtime.replay_source import recording_items
from neurohand.deploy.runtime.safety import SafetySupervisor
from neurohand.deploy.runtime.stats import RuntimeStats, format_status_line
from neurohand.deploy.runtime.writer import HandWriterStage
from neurohand.deploy.selftest import run_selftest
from neurohand.deploy.session import load_decoder, run_on_chip
from neurohand.firmware_bridge.hands import create_hand, keyboard
from neurohand.firmware_bridge.recording.file_format import open_recording
from neurohand.firmware_bridge.shared.errors import BundleError, ConfigError, UsageError
from neurohand.firmware_bridge.virtual.chip import RecordingSource, VirtualChip
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

from protobuf_builder import pb_field, pb_text

RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")
HELDOUT_S = 12.0
CLASSES = ["rest", "m1", "m2"]
N_FINGERS = 5


# --- a class head in the protobuf bytes ----------------------------------------------------------

def _tensor(name, array):
    array = np.ascontiguousarray(array, dtype="<f4")
    return (b"".join(pb_field(1, 0, d) for d in array.shape) + pb_field(2, 0, 1) + pb_text(8, name)
            + pb_field(9, 2, array.tobytes()))


def _output(name, shape):
    dims = b"".join(pb_field(1, 2, pb_field(1, 0, d)) for d in shape)
    tensor_type = pb_field(1, 0, 1) + pb_field(2, 2, dims)          # float, shape
    return pb_text(1, name) + pb_field(2, 2, pb_field(1, 2, tensor_type))


def _field(message, number, what):
    for n, _, value in onnx_weights._fields(message, {}, what):
        if n == number:
            return value
    return None


def widen_head(data, class_names, class_bias, class_weight=None):
    """``data`` (ONNX bytes) with one output row per class after the positions, named in the config."""
    model = onnx_weights.parse_onnx(data)
    weight = model.initializers[onnx_weights.HEAD_WEIGHT]
    extra = np.zeros((len(class_names), weight.shape[1])) if class_weight is None else class_weight
    weight = np.concatenate([weight, extra]).astype(np.float32)
    bias = np.concatenate([model.initializers[onnx_weights.HEAD_BIAS], class_bias]).astype(np.float32)
    out = b""
    for number, wire, value in onnx_weights._fields(data, {}, "ModelProto"):
        if number == 7:
            graph = b""
            for n, w, v in onnx_weights._fields(value, {}, "GraphProto"):
                if n == 5 and _field(v, 8, "TensorProto") == onnx_weights.HEAD_WEIGHT.encode():
                    v = _tensor(onnx_weights.HEAD_WEIGHT, weight)
                elif n == 5 and _field(v, 8, "TensorProto") == onnx_weights.HEAD_BIAS.encode():
                    v = _tensor(onnx_weights.HEAD_BIAS, bias)
                elif n == 12 and _field(v, 1, "ValueInfoProto") == onnx_weights.OUTPUT_POSITIONS.encode():
                    v = _output(onnx_weights.OUTPUT_POSITIONS, (1, weight.shape[0]))
                elif n == 13:
                    continue        # intermediate shapes: none is read, and the head's would be stale
                graph += pb_field(n, w, v)
            value = graph
        elif number == 14 and _field(value, 1, "entry") == onnx_weights.CONFIG_METADATA_KEY.encode():
            config = json.loads(_field(value, 2, "entry").decode("utf-8"))
            config["class_names"] = list(class_names)
            value = pb_text(1, onnx_weights.CONFIG_METADATA_KEY) + pb_text(2, json.dumps(config))
        out += pb_field(number, wire, value)
    return out


def class_run(folder, class_bias, class_names=CLASSES):
    """A copy of the replay fixture's run whose model has a class head deciding argmax(class_bias)."""
    run = os.path.join(str(folder), "run")
    shutil.copytree(RUN_DIR, run)
    with open(os.path.join(RUN_DIR, "model.onnx"), "rb") as handle:
        data = handle.read()
    with open(os.path.join(run, "model.onnx"), "wb") as handle:
        handle.write(widen_head(data, class_names, class_bias))
    return run


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Bundles whose heads decide m1 and rest, and the held-out recording (with movement events)."""
    folder = tmp_path_factory.mktemp("classes")
    bundles = {}
    for name, bias in (("m1", [0.0, 2.0, -1.0]), ("rest", [3.0, 0.0, -1.0])):
        bundles[name] = str(folder / ("bundle_" + name))
        make_bundle(class_run(folder / name, bias), bundles[name])
        assert cli.main(["selftest", bundles[name], "--backend", "numpy"]) == 0
    with open(os.path.join(RUN_DIR, "config.json")) as handle:
        fixture = json.load(handle)["fixture"]
    recording = str(folder / "heldout.nhr")
    start = fixture["train_s"]
    write_session_parts(SimulatorConfig(**fixture["session"]), [(recording, start, start + HELDOUT_S)])
    return {"bundles": bundles, "recording": recording, "folder": folder}


# --- backends and the bundle ---------------------------------------------------------------------

def test_every_backend_reads_the_head_as_positions_then_class_scores(bench):
    model = load_bundle(bench["bundles"]["m1"]).model_path
    features = np.linspace(-1, 1, 36).astype(np.float32)
    seen = []
    for name in ("numpy", "onnxruntime"):
        try:
            backend = create_backend(name, model)
        except Exception as exc:        # onnxruntime is not on every device
            if name == "numpy":
                raise
            print("skipped {}: {}".format(name, exc))
            continue
        assert (backend.n_outputs, backend.n_positions, backend.class_names) == (8, 5, tuple(CLASSES))
        outputs, _ = backend.step(features, backend.initial_state())
        seen.append(np.asarray(outputs).reshape(-1))
        backend.close()
    # The class scores are sigmoid(bias) (zero weights), in class order.
    np.testing.assert_allclose(seen[0][5:], 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0]))), rtol=1e-6)
    for other in seen[1:]:
        np.testing.assert_allclose(other, seen[0], atol=1e-5)


def test_the_fake_tensorrt_backend_reads_the_head_as_the_others(bench, tmp_path, monkeypatch):
    from fake_tensorrt import FakeGpuStack
    FakeGpuStack("10.3.0").install(monkeypatch)
    model = load_bundle(bench["bundles"]["m1"]).model_path
    features = np.linspace(-1, 1, 36).astype(np.float32)
    reference = create_backend("numpy", model)
    expected, _ = reference.step(features, reference.initial_state())
    reference.close()
    backend = create_backend("tensorrt", model, engine_path=str(tmp_path / "model.engine"))
    try:
        assert (backend.n_outputs, backend.n_positions, backend.class_names) == (8, 5, tuple(CLASSES))
        outputs, _ = backend.step(features, backend.initial_state())
    finally:
        backend.close()
    np.testing.assert_allclose(np.asarray(outputs).reshape(-1), expected, atol=1e-4)


def test_a_model_without_a_head_has_every_output_a_position():
    weights = onnx_weights.load_rnn_weights(os.path.join(RUN_DIR, "model.onnx"))
    assert (weights.n_positions, weights.class_names) == (weights.n_outputs, ())


@pytest.mark.parametrize("names, message", [(["rest"], "at least 2"), (["rest", "rest"], "distinct"),
                                            (["rest", ""], "distinct"), ("rest", "list")])
def test_bad_class_names_in_the_model_config_are_refused(names, message):
    with pytest.raises(ConfigError, match=message):
        onnx_weights.class_names_of({onnx_weights.CONFIG_METADATA_KEY: json.dumps({"class_names": names})}, 8)


def test_the_bundle_records_the_classes_and_labels_name_the_positions(bench):
    bundle = load_bundle(bench["bundles"]["m1"])
    assert bundle.manifest["io"] == {"n_features": 36, "n_outputs": 8, "class_names": CLASSES}
    assert bundle.class_names == tuple(CLASSES) and len(bundle.label_names) == N_FINGERS
    backend, _ = open_bundle_backend(bundle, "numpy")
    backend.close()
    # A model whose classes differ from the manifest's is refused.
    bundle.manifest["io"]["class_names"] = ["rest", "m1", "m9"]
    with pytest.raises(BundleError, match="movement classes"):
        open_bundle_backend(bundle, "numpy")


def test_golden_vectors_cover_the_class_scores_and_a_wrong_class_row_fails(bench, tmp_path):
    bundle = load_bundle(bench["bundles"]["m1"])
    features, outputs = bundle.golden_vectors()
    assert outputs.shape[2] == 8
    backend = create_backend("numpy", bundle.model_path)
    try:
        report = run_selftest(bundle, backend)
        assert report["passed"] and report["class_names"] == CLASSES and report["max_abs_error_classes"] == 0.0
        # The same bundle with one class score of the golden vectors off by 0.01: the self-test fails.
        corrupt = outputs.copy()
        corrupt[1, 3, 6] += 0.01
        bundle.golden_vectors = lambda: (features, corrupt)
        report = run_selftest(bundle, backend)
    finally:
        backend.close()
    assert not report["passed"]
    assert report["max_abs_error_classes"] == pytest.approx(0.01, rel=1e-3)
    assert report["max_abs_error_outputs"] == pytest.approx(0.01, rel=1e-3)


# --- deciding the class ----------------------------------------------------------------------------

def sigmoid(logits):
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))


def test_the_decision_is_the_softmax_argmax_and_its_confidence_the_softmax():
    rng = np.random.RandomState(3)
    decider = ClassDecider(CLASSES)
    for _ in range(50):
        logits = rng.normal(0, 3, 3)
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert decider.decide(sigmoid(logits)) == int(np.argmax(softmax))
        assert confidence(sigmoid(logits), int(np.argmax(logits))) == pytest.approx(softmax.max(), rel=1e-5)


def test_low_confidence_decides_no_class():
    decider = ClassDecider(CLASSES, min_confidence=0.6)
    assert decider.decide(sigmoid([0.0, 0.1, 0.0])) is None           # softmax top about 0.36
    assert decider.decide(sigmoid([0.0, 3.0, 0.0])) == 1              # about 0.91


def test_the_vote_takes_the_most_frequent_of_the_last_windows_ties_to_the_newest():
    decider = ClassDecider(CLASSES, vote_windows=3)
    one, two = sigmoid([0, 5, 0]), sigmoid([0, 0, 5])
    assert [decider.decide(s) for s in (one, two, two, one, one, two)] == [1, 2, 2, 2, 1, 1]
    decider.reset()
    assert decider.decide(two) == 2 and decider.decided == 2


# --- the writer: the class goes with the positions, none in the safe posture ---------------------

def class_keys_hand(tmp_path, bindings, class_names=tuple(CLASSES)):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"format": "neurohand-keys", "version": 1, "bindings": bindings}))
    sink = keyboard.RecordingKeySink()
    return create_hand("keys:" + str(path), n_outputs=N_FINGERS, sink=sink, class_names=class_names), sink


def actions(sink):
    return [(action, key) for _, action, key in sink.events]


def command(t, decided):
    return DecodedCommand(0, t, t, np.zeros(N_FINGERS), np.zeros(N_FINGERS + 3), decided)


def test_a_class_key_is_held_while_decided_and_released_in_the_safe_posture(tmp_path):
    hand, sink = class_keys_hand(tmp_path, [{"class": "m1", "key": "KEY_A"}, {"class": 2, "key": "KEY_B"},
                                            {"fingers": ["thumb"], "on": 0.5, "off": 0.3, "key": "KEY_W"}])
    supervisor = SafetySupervisor("open", 0.1, 1, N_FINGERS, 0.0)
    writer = HandWriterStage(hand, supervisor, RuntimeStats(), lambda: 0.0, N_FINGERS, measure_latency=False,
                             class_names=CLASSES)
    supervisor.on_good_window(0.0)
    writer.step(command(0.0, 1), 0.0)
    writer.step(None, 0.02)                       # keep-alive: the class stays
    assert hand.pressed == ("KEY_A",) and writer.current_class == 1
    writer.step(command(0.04, 2), 0.04)           # hand-over: A released before B pressed
    assert actions(sink) == [("press", "KEY_A"), ("release", "KEY_A"), ("press", "KEY_B")]
    writer.step(None, 0.2)                        # no fresh data: data timeout, safe posture
    assert supervisor.state == "safe" and hand.pressed == () and writer.current_class is None
    writer.step(command(0.21, 2), 0.21)           # not recovered yet: still no class
    assert hand.pressed == ()
    assert writer.class_summary() == {"current": "none", "counts": {"none": 0, "rest": 0, "m1": 1, "m2": 1}}
    line = format_status_line(1.0, RuntimeStats(), {}, {"windows_decoded": 2, "windows_skipped": 0},
                              writer.counters, supervisor.state, decided_class="m2")
    assert line.endswith("| class m2")


def test_drivers_without_classes_never_hear_of_them(tmp_path):
    hand = create_hand("none", n_outputs=N_FINGERS, class_names=CLASSES)
    assert not hasattr(hand, "set_class")
    supervisor = SafetySupervisor("open", 0.1, 1, N_FINGERS, 0.0)
    supervisor.on_good_window(0.0)
    writer = HandWriterStage(hand, supervisor, RuntimeStats(), lambda: 0.0, N_FINGERS, class_names=CLASSES)
    writer.step(command(0.0, 2), 0.0)
    assert hand.counters["frames_sent"] == 1 and writer.current_class == 2


@pytest.mark.parametrize("binding, class_names, message", [
    ({"class": "m7", "key": "KEY_A"}, CLASSES, "unknown movement class 'm7'; the bundle's classes are rest, m1, m2"),
    ({"class": 3, "key": "KEY_A"}, CLASSES, "unknown movement class 3"),
    ({"class": "m1", "key": "KEY_A"}, (), "the bundle's model has no class head"),
    ({"class": "m1", "key": "KEY_A", "on": 0.5}, CLASSES, "a class binding takes only class, key, name, not on"),
    ({"class": True, "key": "KEY_A"}, CLASSES, "unknown movement class True"),
    ({"class": "m1", "key": "a"}, CLASSES, "'key' must be a Linux key name"),
])
def test_bad_class_bindings_are_one_line_errors(tmp_path, binding, class_names, message):
    with pytest.raises(ConfigError) as caught:
        class_keys_hand(tmp_path, [binding], class_names)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_class_settings_have_ranges_and_are_refused_without_a_head():
    with pytest.raises(UsageError, match="class_vote_windows"):
        RuntimeConfig(class_vote_windows=0)
    with pytest.raises(UsageError, match="class_min_confidence"):
        RuntimeConfig(class_min_confidence=1.5)
    RuntimeConfig(class_vote_windows=100, class_min_confidence=1.0).check_classes(CLASSES)
    with pytest.raises(UsageError, match="no class head|has none"):
        RuntimeConfig(class_vote_windows=3).check_classes(())


# --- fast replay and the replay's class scores ------------------------------------------------------

def test_fast_replay_splits_positions_and_classes_and_counts_them(bench):
    decoder = load_decoder(bench["bundles"]["m1"], "numpy")
    commands = []
    with open_recording(bench["recording"]) as recording:
        items = recording_items(recording, 1000, 0, recording.n_samples)
        document = run_fast_replay(decoder.pipeline, decoder.backend, items, recording.scale_uv,
                                   config=RuntimeConfig(recovery_windows=3), on_command=commands.append)
    assert all(c.positions.shape == (N_FINGERS,) and c.outputs.shape == (8,) for c in commands)
    decided = [c.decided for c in commands]
    # None until the supervisor is ok (3 good windows), then m1 (the largest bias) every window.
    assert decided[:2] == [None, None] and set(decided[2:]) == {1}
    classes = document["classes"]
    assert classes["names"] == CLASSES and classes["current"] == "none"       # the shutdown's safe posture
    # Fast replay hands a block's commands to the writer after the block decoded: the two decided before
    # the supervisor was ok may be sent (with no class) once it is.
    counts = classes["counts"]
    assert counts["m1"] + counts["none"] == document["writer"]["new_commands_sent"] and counts["none"] <= 2
    assert counts["rest"] == counts["m2"] == 0 and counts["m1"] == len(commands) - 2


def expected_scores(recording_path, summary, decided_index):
    """The per-step measures of a head that always decides ``decided_index``, computed from the events."""
    with open_recording(recording_path) as recording:
        events = list(recording.events)
        rate = recording.signal_rate
    first = int(round(summary["scored_from_s"] * rate))
    stride = load_decoder_stride(summary["bundle"])
    ends = np.arange(stride, int(summary["seconds"] * rate) + 1, stride)
    ends = ends[ends >= first]
    truth = measures.step_classes(events, ends)
    names = measures.class_names(truth)
    known = np.array([n in CLASSES for n in names])
    index = np.array([CLASSES.index(n) if n in CLASSES else -1 for n in names])[known]
    confusion = measures.confusion_matrix(index, np.full(index.shape, decided_index), range(len(CLASSES)))
    return confusion, int(np.count_nonzero(~known))


def load_decoder_stride(bundle_path):
    decoder = load_decoder(bundle_path, "numpy")
    try:
        return decoder.pipeline.stride_samples
    finally:
        decoder.close()


@pytest.mark.parametrize("which, decided_index", [("m1", 1), ("rest", 0)])
def test_fast_replay_reports_the_class_measures(bench, capsys, which, decided_index):
    capsys.readouterr()
    assert cli.main(["replay", bench["bundles"][which], bench["recording"], "--json", "--backend", "numpy",
                     "--quiet", "--jobs", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    classes = summary["classes"]
    confusion, unknown = expected_scores(bench["recording"], summary, decided_index)
    assert classes["class_names"] == CLASSES and classes["confusion"] == confusion.tolist()
    assert classes["steps_unknown_class"] == unknown
    assert classes["accuracy"] == pytest.approx(measures.accuracy(confusion))
    assert classes["balanced_accuracy"] == pytest.approx(measures.balanced_accuracy(confusion))
    assert 0 < confusion[0].sum() < confusion.sum()          # rest and a movement both scored
    assert classes["trial_accuracy"] == (1.0 if decided_index else 0.0) or classes["trials"] == 0
    assert classes["rest_trial_accuracy"] == (0.0 if decided_index else 1.0)
    capsys.readouterr()
    assert cli.main(["replay", bench["bundles"][which], bench["recording"], "--backend", "numpy", "--quiet",
                     "--jobs", "1"]) == 0
    assert "classes        accuracy {:.3f}".format(classes["accuracy"]) in capsys.readouterr().out


def test_movement_values_map_to_the_head_through_the_values_training_saved():
    # A head trained on movements 0, 3 and 5 names them from the recording's metadata; the values say
    # which output each event value is, whatever the names.
    events = [(0, "movement", 0), (100, "movement", 3), (200, "movement", 5), (300, "movement", 0)]
    ends = np.arange(5, 400, 10)
    truth = [0 if e <= 100 or e > 300 else (1 if e <= 200 else 2) for e in ends]   # causal: value at end - 1
    names = ["rest", "flex", "grip"]
    scores = replay_module.score_class_head(names, events, ends, truth, 100.0, values=[0, 3, 5])
    assert scores["accuracy"] == 1.0 and scores["steps_unknown_class"] == 0
    shifted = replay_module.score_class_head(names, events, ends, truth, 100.0, values=[0, 5, 3])
    assert shifted["accuracy"] < 0.9
    unnamed = replay_module.score_class_head(names, events, ends, truth, 100.0)
    assert unnamed["steps_unknown_class"] == 20                     # "flex" and "grip" are not "3" and "5"


def test_a_recording_without_movement_events_has_no_class_scores():
    assert replay_module.score_class_head(CLASSES, [(0, "repetition", 1)], np.array([10]), [1], 50.0) is None


# --- `run --hand keys:MAP` -----------------------------------------------------------------------------

@pytest.mark.parametrize("which, binding, message", [
    ("m1", {"class": "m5", "key": "KEY_A"}, "unknown movement class 'm5'"),
    (None, {"class": "m1", "key": "KEY_A"}, "has no class head"),
])
def test_run_refuses_a_key_map_the_bundle_cannot_serve_in_one_line(bench, tmp_path, capsys, which, binding,
                                                                    message):
    if which is None:
        bundle = str(tmp_path / "plain")
        make_bundle(RUN_DIR, bundle)
        assert cli.main(["selftest", bundle, "--backend", "numpy"]) == 0
    else:
        bundle = bench["bundles"][which]
    mapping = tmp_path / "keys.json"
    mapping.write_text(json.dumps({"format": "neurohand-keys", "version": 1, "bindings": [binding]}))
    capsys.readouterr()
    code = cli.main(["run", "--bundle", bundle, "--chip", str(tmp_path / "no-chip-here"), "--hand",
                     "keys:" + str(mapping), "--backend", "numpy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


def test_a_run_on_pseudo_terminals_presses_the_class_key_and_releases_it_at_the_end(bench, tmp_path,
                                                                                      monkeypatch):
    sinks = []

    def recording_sink(keys):
        sinks.append(keyboard.RecordingKeySink())
        return sinks[-1]

    monkeypatch.setattr(keyboard, "UinputKeySink", recording_sink)
    mapping = tmp_path / "keys.json"
    mapping.write_text(json.dumps({"format": "neurohand-keys", "version": 1, "bindings": [
        {"name": "grip", "class": "m1", "key": "KEY_G"}, {"class": "rest", "key": "KEY_R"}]}))
    recording = open_recording(bench["recording"])
    chip = VirtualChip(RecordingSource(recording), loop=True)
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    try:
        decoder = load_decoder(bench["bundles"]["m1"], "numpy")
        document = run_on_chip(decoder, chip_path, "keys:" + str(mapping), RuntimeConfig(recovery_windows=3),
                               duration_s=1.0, quiet=True, install_signals=False)
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
        recording.close()
    (sink,) = sinks
    # Pressed once the supervisor was ok, held, released by the safe posture at shutdown; rest never.
    assert actions(sink) == [("press", "KEY_G"), ("release", "KEY_G")] and sink.closed
    assert document["classes"]["counts"]["m1"] == document["writer"]["new_commands_sent"] > 0
    assert document["classes"]["current"] == "none"


def test_a_recorded_run_marks_each_change_of_the_class(bench, tmp_path):
    decoder = load_decoder(bench["bundles"]["m1"], "numpy")
    path = str(tmp_path / "run.nhr")
    with open_recording(bench["recording"]) as recording:
        items = recording_items(recording, 1000, 0, 2 * int(recording.signal_rate))
        run_fast_replay(decoder.pipeline, decoder.backend, items, recording.scale_uv, recording.channel_names,
                        config=RuntimeConfig(recovery_windows=3), record_path=path)
    with open_recording(path) as recorded:
        events = [(e.kind, e.value) for e in recorded.events if e.kind == "class"]
        assert list(recorded.label_streams["decoded"].names) == ["thumb", "index", "middle", "ring", "little"]
    assert events == [("class", 1)]          # m1 from the third window on (none before: nothing written)


def test_confusion_png_where_matplotlib_exists_and_a_one_line_refusal_where_not(bench, tmp_path, capsys):
    import importlib.util
    png = tmp_path / "confusion.png"
    capsys.readouterr()
    code = cli.main(["replay", bench["bundles"]["m1"], bench["recording"], "--backend", "numpy", "--quiet",
                     "--jobs", "1", "--seconds", "3", "--confusion-png", str(png)])
    err = capsys.readouterr().err.strip().splitlines()
    if importlib.util.find_spec("matplotlib") is None:          # the device
        assert code == 2 and len(err) == 1 and "needs matplotlib" in err[0] and not png.exists()
    else:
        assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_manifest_with_bad_class_names_is_refused(bench, tmp_path):
    bundle = str(tmp_path / "bundle")
    shutil.copytree(bench["bundles"]["m1"], bundle)
    path = os.path.join(bundle, "manifest.json")
    with open(path) as handle:
        manifest = json.load(handle)
    manifest["io"]["class_names"] = ["rest", "rest"]
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(BundleError, match="class_names"):
        load_bundle(bundle)
