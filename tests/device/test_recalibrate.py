"""On-device recalibration: a new bundle re-fitted to a session with numpy alone; the old one untouched.

The bundle is the committed fixture run (tests/device/data/replay_run: 4 channels at 2 kHz, GRU 32);
the sessions are simulated on the fly from the fixture's own patient and then changed in known ways.
"""
import json
import os
import shutil

import numpy as np
import pytest

from neurohand.decoder import onnx_edit, onnx_weights
from neurohand.deploy import recalibrate as recal
from neurohand.deploy import selftest
from neurohand.deploy.bundle import load_bundle, make_bundle
from neurohand.deploy.cli import main as cli
from neurohand.deploy.demo import write_session_parts
from neurohand.firmware_bridge.recording.file_format import RecordingWriter, open_recording
from neurohand.firmware_bridge.recording.patient import recording_patient, recordings_patient
from neurohand.firmware_bridge.shared.errors import BundleError, ConfigError
from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

DATA = os.path.join(os.path.dirname(__file__), "data")
RUN_DIR = os.path.join(DATA, "replay_run")
#: The part of the fixture's session used: its last 40 s (the run trained on [0, 110) s, testing on its end).
PART_S = (90.0, 130.0)
GAIN = 4.0           # every channel's gain on the "new day"
LABEL_FACTOR = 0.5   # movements half as strong


def fixture_session():
    with open(os.path.join(RUN_DIR, "config.json")) as handle:
        return json.load(handle)["fixture"]["session"]


def rewrite(source, path, gain=1.0, labels=None, dtype="int16", poison_at_s=None, names=None):
    """Copy recording ``source`` to ``path``: signals times ``gain``, labels replaced by ``labels(data)``
    (columns ``names``, default the source's)."""
    with open_recording(source) as rec:
        stream = rec.label_streams["fingers"]
        signals = rec.read_signals(microvolts=dtype == "float32")
        if poison_at_s is not None:
            signals = signals.astype(np.float32)
            signals[int(poison_at_s * rec.signal_rate), 1] = np.nan
        scale = list(rec.scale_uv * gain) if dtype == "int16" else None
        with RecordingWriter(path, rec.signal_rate, rec.channel_names, dtype=dtype, scale_uv=scale,
                             metadata=rec.metadata,
                             label_streams={"fingers": {"rate": stream.rate,
                                                        "names": stream.names if names is None else names}}) as writer:
            writer.append_signals(signals)
            writer.append_labels("fingers", stream.data if labels is None else labels(stream.data))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recalibrate")
    bundle = str(folder / "bundle")
    make_bundle(RUN_DIR, bundle)
    session = str(folder / "session.nh")
    write_session_parts(SimulatorConfig(**fixture_session()), [(session, PART_S[0], PART_S[1])])
    changed = rewrite(session, folder / "changed.nh", gain=GAIN, labels=lambda y: y * LABEL_FACTOR)
    return {"folder": folder, "bundle": bundle, "session": session, "changed": changed}


def tree(path):
    """{relative path: bytes} of every file under ``path``: the old bundle must stay byte for byte."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as handle:
                files[os.path.relpath(full, path)] = handle.read()
    return files


def leftovers(folder):
    return [name for name in os.listdir(str(folder)) if name.startswith(".bundle")]


def run_cli(capsys, *args):
    capsys.readouterr()
    code = cli.main(["recalibrate"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the fit ----------------------------------------------------------------------

def test_recalibration_recovers_a_known_change_and_leaves_the_old_bundle(world, tmp_path, capsys):
    before = tree(world["bundle"])
    out = tmp_path / "day2"
    code, text, err = run_cli(capsys, world["bundle"], world["changed"], "--out", out, "--json")
    assert code == 0, err
    result = json.loads(text)
    for key in ("out", "lambda", "r2_before", "r2_after", "seconds_used", "elapsed_s"):
        assert isinstance(result[key], (float, str)), key
    assert result["seconds_used"] == pytest.approx(PART_S[1] - PART_S[0])
    # Gains x4 and movements x0.5 wreck the old bundle; re-fitted, it decodes as on the unchanged session.
    assert result["r2_before"] < -3.0
    assert result["r2_after"] > -1.0 and result["r2_after"] > result["r2_before"] + 3.0
    assert tree(world["bundle"]) == before

    old, new = load_bundle(world["bundle"]), load_bundle(str(out))
    selftest.require_passed_selftest(new, "numpy")          # self-tested before it appeared
    note = new.config["recalibration"]
    assert note["from_bundle"]["digest"] == old.digest and note["lambda"] == result["lambda"]
    assert note["session"]["path"] == os.path.abspath(world["changed"]) and note["previous"] is None
    assert new.config["patient"] == fixture_session()["seed"]
    # The fixture run does not name its patient (runs before the trainer recorded it): not checked, and said.
    assert result["patient"]["session"] == fixture_session()["seed"] and result["patient"]["bundle"] is None
    assert result["patient"]["checked"] is False and "cannot be detected" in result["patient"]["note"]
    assert note["patient_check"] == {"session": fixture_session()["seed"], "bundle": None, "checked": False}
    assert result["kept_class_rows"] == []
    # The log-amplitude features moved by log(4): what a fourfold gain does to them.
    names = old.config["pipeline"]["feature_names"]
    shift = np.subtract(new.config["pipeline"]["normalisation"]["mean"], old.config["pipeline"]["normalisation"]["mean"])
    mav = [i for i, name in enumerate(names) if name.startswith("mav_")]
    assert np.all(np.abs(shift[mav] - np.log(GAIN)) < 0.4), shift[mav]
    # Only the output layer of the model changed.
    old_model, new_model = onnx_weights.read_onnx(old.model_path), onnx_weights.read_onnx(new.model_path)
    for name, array in old_model.initializers.items():
        same = np.array_equal(array, new_model.initializers[name])
        assert same == (name not in (onnx_weights.HEAD_WEIGHT, onnx_weights.HEAD_BIAS)), name
    assert leftovers(tmp_path) == []


def test_a_failed_self_test_leaves_nothing_and_replaces_nothing(world, tmp_path, monkeypatch):
    before = tree(world["bundle"])
    existing = tmp_path / "existing"
    shutil.copytree(world["bundle"], str(existing))
    kept = tree(str(existing))
    real = selftest.run_selftest

    def failing(bundle, backend, fp16=False):
        report = real(bundle, backend, fp16)
        report.update(passed=False, max_abs_error=0.5)
        return report
    monkeypatch.setattr(selftest, "run_selftest", failing)
    # Over an existing bundle with --force: the same staging folder a new --out would get, removed.
    with pytest.raises(BundleError, match="self-test"):
        recal.recalibrate(world["bundle"], world["session"], str(existing), seconds=20.0, force=True)
    assert tree(str(existing)) == kept
    assert tree(world["bundle"]) == before and leftovers(tmp_path) == []


def test_fit_head_finds_a_known_output_layer():
    rng = np.random.RandomState(0)
    hidden = np.tanh(rng.standard_normal((3000, 6)))
    weight, bias = rng.standard_normal((2, 6)), np.array([0.3, -0.5])
    targets = recal.predict(hidden, weight, bias)
    got_weight, got_bias = recal.fit_head(hidden, targets, np.zeros((2, 6)), np.zeros(2), 1e-9, passes=8)
    assert np.abs(got_weight - weight).max() < 1e-3 and np.abs(got_bias - bias).max() < 1e-3
    # A strong ridge keeps the old weights; an output whose labels do not move keeps its row.
    old = rng.standard_normal((2, 6))
    strong, _ = recal.fit_head(hidden, targets, old, np.zeros(2), 1e6)
    assert np.abs(strong - old).max() < 1e-3
    kept, _ = recal.fit_head(hidden, targets, old, np.zeros(2), 1e-9, refit=np.array([True, False]))
    assert np.array_equal(kept[1], old[1]) and np.abs(kept[0] - weight[0]).max() < 1e-2


# --- bad input ----------------------------------------------------------------------

def _simulated(folder, name, **options):
    settings = dict(fixture_session(), seconds=2.0)
    settings.update(options)
    path = str(folder / name)
    write_session_parts(SimulatorConfig(**settings), [(path, 0.0, 2.0)])
    return path


@pytest.fixture(scope="module")
def bad_inputs(world):
    folder = world["folder"]
    patient = fixture_session()["seed"]
    run = folder / "run-with-patient"
    shutil.copytree(RUN_DIR, str(run))
    with open(str(run / "config.json")) as handle:
        config = json.load(handle)
    config["patient"] = patient
    with open(str(run / "config.json"), "w") as handle:
        json.dump(config, handle)
    patient_bundle = str(folder / "patient-bundle")
    make_bundle(str(run), patient_bundle)
    return {
        "channels": (world["bundle"], _simulated(folder, "three.nh", n_channels=3), [], "3 channels"),
        "rate": (world["bundle"], _simulated(folder, "slow.nh", rate=1000.0), [], "1000 Hz"),
        "short": (world["bundle"], world["session"], ["--seconds", "10"], "at least 20 s"),
        "longer than the file": (world["bundle"], world["session"], ["--seconds", "50"], "holds only 40.0 s"),
        "still labels": (world["bundle"], rewrite(world["session"], folder / "still.nh",
                                                  labels=lambda y: np.full_like(y, 0.3)), [], "do not move"),
        "other patient": (patient_bundle, _simulated(folder, "other.nh", seed=patient + 1), [],
                          "patient {}".format(patient + 1)),
        "nan": (world["bundle"], rewrite(world["session"], folder / "nan.nh", dtype="float32", poison_at_s=25.0),
                [], "NaN"),
        "ridge": (world["bundle"], world["session"], ["--ridge", "-1"], "--ridge"),
        "ridge text": (world["bundle"], world["session"], ["--ridge", "strong"], "--ridge"),
        "missing session": (world["bundle"], str(folder / "absent.nh"), [], "absent.nh"),
    }


@pytest.mark.parametrize("case", ["channels", "rate", "short", "longer than the file", "still labels", "other patient",
                                  "nan", "ridge", "ridge text", "missing session"])
def test_bad_session_is_refused_in_one_line(bad_inputs, case, tmp_path, capsys):
    bundle, session, extra, words = bad_inputs[case]
    before = tree(bundle)
    out = tmp_path / "new"
    code, _, err = run_cli(capsys, bundle, session, "--out", out, "--quiet", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert words in err, err
    assert not out.exists() and leftovers(tmp_path) == [] and tree(bundle) == before


def test_same_patient_passes_the_patient_check(bad_inputs, world, capsys, tmp_path):
    bundle, _, _, _ = bad_inputs["other patient"]
    same = _simulated(tmp_path, "same.nh")
    code, _, err = run_cli(capsys, bundle, same, "--out", tmp_path / "new")
    assert code == 2 and "of patient" not in err and "at least 20 s" in err, err
    # Both name patient K: checked, and the new bundle keeps the patient for the next recalibration.
    code, text, err = run_cli(capsys, bundle, world["session"], "--out", tmp_path / "ok", "--seconds", "20",
                              "--json")
    assert code == 0, err
    assert json.loads(text)["patient"]["checked"] is True
    assert load_bundle(str(tmp_path / "ok")).config["patient"] == fixture_session()["seed"]


def test_out_may_not_be_the_old_bundle_or_in_it(world, tmp_path, capsys):
    bundle = world["bundle"]
    before = tree(bundle)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    cases = [([bundle], "input"), ([os.path.join(bundle, "sub")], "input"), ([bundle, "--force"], "input"),
             ([str(precious)], "--force"), ([str(precious), "--force"], "not a bundle"),
             ([world["session"]], "input")]
    for args, words in cases:
        code, _, err = run_cli(capsys, bundle, world["session"], "--out", *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert tree(bundle) == before and (precious / "notes.txt").read_text() == "keep"


# --- the ONNX writer ----------------------------------------------------------------

def _golden(name):
    with open(os.path.join(DATA, name), "rb") as handle:
        return handle.read()


def test_onnx_writer_round_trips_and_changes_nothing_else():
    data = _golden("golden_gru.onnx")
    model = onnx_weights.parse_onnx(data)
    assert onnx_edit.replace_initializers(data, {"head.weight": model.initializers["head.weight"]}) == data
    values = {"head.weight": model.initializers["head.weight"] * -2.0 + 0.125,
              "rnn.1.B": np.arange(48, dtype=np.float64).reshape(1, 48)}      # float64 is cast to the tensor's float32
    edited = onnx_weights.parse_onnx(onnx_edit.replace_initializers(data, values))
    for name, array in model.initializers.items():
        expected = values[name].astype(np.float32) if name in values else array
        assert edited.initializers[name].dtype == array.dtype and np.array_equal(edited.initializers[name], expected)
    assert edited.metadata == model.metadata and [n.op_type for n in edited.nodes] == [n.op_type for n in model.nodes]
    onnx_weights.load_rnn_weights(onnx_edit.replace_initializers(data, values))    # still a decoder graph


@pytest.mark.parametrize("values, words", [
    ({"head.weight": np.zeros((5, 7))}, "shape"),
    ({"nothing": np.zeros(1)}, "no initializer"),
    ({"head.bias": np.array([0.0, np.nan, 0.0, 0.0, 0.0])}, "NaN"),
    ({"head.bias": np.zeros(5, dtype=np.complex128)}, "does not fit"),
])
def test_onnx_writer_refuses_what_would_change_the_model(values, words):
    with pytest.raises(ConfigError, match=words):
        onnx_edit.replace_initializers(_golden("golden_gru.onnx"), values)


def test_onnx_writer_refuses_a_damaged_file():
    data = _golden("golden_gru.onnx")
    with pytest.raises(ConfigError):
        onnx_edit.replace_initializers(data[:len(data) // 2], {"head.bias": np.zeros(5)})


def test_plain_graph_is_rewritten_with_the_same_layer(tmp_path):
    """model.onnx and model_plain.onnx of one bundle get the same new output layer (by structure, checked by value)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(os.path.join(DATA, "golden_gru.onnx"), str(run / "model.onnx"))
    shutil.copyfile(os.path.join(DATA, "golden_gru_plain.onnx"), str(run / "model_plain.onnx"))
    (run / "config.json").write_text(json.dumps({"pipeline": {"mode": "test"}}))
    make_bundle(str(run), str(tmp_path / "bundle"))
    bundle = load_bundle(str(tmp_path / "bundle"))
    old_weight, old_bias = onnx_weights.load_rnn_weights(bundle.model_path).head
    rng = np.random.RandomState(1)
    weight, bias = rng.standard_normal(old_weight.shape), rng.standard_normal(old_bias.shape)
    files = recal._model_files(bundle, weight, bias, old_weight, old_bias)
    plain = onnx_weights.parse_onnx(files["model_plain.onnx"])
    assert np.array_equal(plain.initializers["model.head.weight"], weight.astype(np.float32))
    assert np.array_equal(plain.initializers["model.head.bias"], bias.astype(np.float32))
    # A plain graph whose layer is not model.onnx's is refused, not left stale.
    with pytest.raises(BundleError, match="not the one in model.onnx"):
        recal.plain_head_names(files["model_plain.onnx"], old_weight, old_bias, "model_plain.onnx")
    onnxruntime = pytest.importorskip("onnxruntime")     # the workstation checks the files run alike
    from neurohand.decoder.backends import create_backend
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    numpy_backend = create_backend("numpy", str(tmp_path / "model.onnx"))
    sessions = [onnxruntime.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                for name in ("model.onnx", "model_plain.onnx")]
    state = numpy_backend.initial_state()
    ort_states = [np.zeros((2, 1, 8), dtype=np.float32) for _ in sessions]
    for step in range(40):
        features = rng.standard_normal(numpy_backend.n_features).astype(np.float32)
        expected, state = numpy_backend.step(features, state)
        for index, session in enumerate(sessions):
            positions, ort_states[index] = session.run(["positions", "h_out"],
                                                       {"features": features[None], "h_in": ort_states[index]})
            assert np.abs(positions[0] - expected).max() < 1e-5


# --- a class head -------------------------------------------------------------------

CLASS_NAMES = ["rest", "grip"]


def with_model_config(data, change):
    """The ONNX bytes ``data`` with its model-config metadata entry replaced by ``change(config)``.

    ModelProto.metadata_props (field 14) holds StringStringEntryProto key (1) / value (2) entries; every other
    byte is kept, so the graph's head (5 rows) is unchanged and only how its rows are read changes."""
    out = bytearray()
    for number, _, start, value_start, end in onnx_edit._field_spans(data, "ModelProto"):
        if number == 14:
            entry = data[value_start:end]
            fields = {n: bytes(entry[v:e]) for n, _, _, v, e in onnx_edit._field_spans(entry, "entry")}
            if fields.get(1, b"").decode() == onnx_weights.CONFIG_METADATA_KEY:
                config = change(json.loads(fields[2].decode()))
                entry = onnx_edit._length_delimited(1, fields[1]) + onnx_edit._length_delimited(
                    2, json.dumps(config).encode())
                out += onnx_edit._length_delimited(14, entry)
                continue
        out += data[start:end]
    return bytes(out)


def class_head_graph(data):
    """``data`` (an ONNX decoder with 5 outputs) read as 3 positions and the class scores of CLASS_NAMES."""
    return with_model_config(data, lambda config: dict(config, n_outputs=3, class_names=CLASS_NAMES))


def test_fit_keeps_the_class_rows_of_a_class_head_graph_exactly(tmp_path):
    """Built as test_plain_graph_is_rewritten_with_the_same_layer builds its bundle: the golden graph, a
    config.json without labels; here its model config names two classes."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes(class_head_graph(_golden("golden_gru.onnx")))
    (run / "config.json").write_text(json.dumps({"pipeline": {"mode": "test"}}))
    make_bundle(str(run), str(tmp_path / "bundle"))
    bundle = load_bundle(str(tmp_path / "bundle"))
    weights = onnx_weights.load_rnn_weights(bundle.model_path)
    assert weights.class_names == tuple(CLASS_NAMES) and weights.n_positions == 3
    old_weight, old_bias = weights.head
    rng = np.random.RandomState(2)
    hidden = np.tanh(rng.standard_normal((2000, weights.hidden_size)))
    truth_weight, truth_bias = rng.standard_normal((3, weights.hidden_size)), rng.standard_normal(3)
    targets = recal.predict(hidden, truth_weight, truth_bias)
    weight, bias = recal.fit_position_rows(hidden, targets, old_weight, old_bias, 3, 1e-9)
    assert np.abs(weight[:3] - truth_weight).max() < 0.05 and np.abs(bias[:3] - truth_bias).max() < 0.05
    files = recal._model_files(bundle, weight, bias, old_weight, old_bias)
    new_weight, new_bias = onnx_weights.load_rnn_weights(files["model.onnx"]).head
    assert np.array_equal(new_weight[3:], old_weight[3:]) and np.array_equal(new_bias[3:], old_bias[3:])
    assert np.array_equal(new_weight[:3], weight[:3].astype(np.float32))


def test_a_class_head_bundle_recalibrates_its_positions_only(world, tmp_path, capsys):
    run = tmp_path / "class-run"
    shutil.copytree(RUN_DIR, str(run))
    with open(str(run / "model.onnx"), "rb") as handle:
        (run / "model.onnx").write_bytes(class_head_graph(handle.read()))
    with open(str(run / "config.json")) as handle:
        config = json.load(handle)
    positions = config["labels"]["names"][:3]
    config["labels"]["names"] = positions
    config["model"].update(n_outputs=3, class_names=CLASS_NAMES)    # train/model.py: n_outputs counts positions
    (run / "config.json").write_text(json.dumps(config))
    bundle = str(tmp_path / "class-bundle")
    make_bundle(str(run), bundle)
    session = rewrite(world["changed"], tmp_path / "changed3.nh", labels=lambda y: y[:, :3], names=positions)
    weights = onnx_weights.load_rnn_weights(load_bundle(bundle).model_path)
    out = tmp_path / "day2"
    code, text, err = run_cli(capsys, bundle, session, "--out", out, "--seconds", "24")
    assert code == 0, err
    assert "kept exactly as they were" in text and "rest, grip" in text, text
    assert "patient not checked" in text, text       # this bundle does not name its patient
    new = load_bundle(str(out))
    assert new.class_names == tuple(CLASS_NAMES)
    old_weight, old_bias = weights.head
    new_weight, new_bias = onnx_weights.load_rnn_weights(new.model_path).head
    # The class rows are the old values; the position rows were re-fitted (gains x4, movements x0.5).
    assert np.array_equal(new_weight[3:], old_weight[3:]) and np.array_equal(new_bias[3:], old_bias[3:])
    assert not np.array_equal(new_weight[:3], old_weight[:3]) and not np.array_equal(new_bias[:3], old_bias[:3])
    note = new.config["recalibration"]
    assert note["kept_class_rows"] == CLASS_NAMES and len(note["r2_after_outputs"]) == 3
    assert note["r2_after"] > note["r2_before"] + 1.0


def test_the_patient_function_lives_in_the_recording_package():
    assert recal.recording_patient is recording_patient          # still importable where it was
    assert recording_patient({"patient": 3, "subject": "x"}) == 3
    assert recording_patient({"subject": "ann"}) == "ann"
    assert recording_patient({"source": "synthetic", "simulator": {"config": {"seed": 5}}}) == 5
    assert recording_patient({"source": "collect"}) is None and recording_patient(None) is None
    # A run's patient: the one all its recordings name, else unknown (never a guess).
    assert recordings_patient([{"patient": 2}, {"source": "synthetic", "simulator": {"config": {"seed": 2}}}]) == 2
    assert recordings_patient([{"patient": 2}, {"patient": 3}]) is None
    assert recordings_patient([{"patient": 2}, {}]) is None and recordings_patient([]) is None
