"""Regression tests for the loader bugs the fuzzing found (tests/device/test_fuzz_loaders.py).

Each test is a minimal reproducer of a corrupted input that once escaped as
something other than a NeurohandError naming the problem (RecursionError,
OverflowError, TypeError, struct.error, UnicodeDecodeError, MemoryError,
BadZipFile ...), plus the checks added with the fixes: the shared JSON reader
(nesting limit, UTF-8 whatever the locale), bounds on sizes, field names in
recording header errors.
"""
import copy
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from neurohand.decoder import pipeline as pipeline_module
from neurohand.decoder.onnx_weights import CONFIG_METADATA_KEY, GRAPH_FORMAT_KEY, load_rnn_weights
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.bundle import load_bundle, make_bundle
from neurohand.deploy.runtime.config import load_runtime_config
from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import BundleError, ConfigError, RecordingError, UsageError
from neurohand.firmware_bridge.recording.file_format import (
    MAX_CHANNELS, RecordingTruncatedWarning, RecordingWriter, open_recording)
from protobuf_builder import pb_field, pb_text, pb_varint  # noqa: F401

DATA = os.path.join(os.path.dirname(__file__), "data")
DEEP_JSON = b"[" * 100000 + b"]" * 100000          # valid JSON, nested deeper than the recursion limit
HUGE_INT = b"1" + b"0" * 400                         # valid JSON integer, too large for a float


def write(path, data):
    with open(str(path), "wb") as handle:
        handle.write(data)
    return str(path)


# --- the shared checks ------------------------------------------------------------------

def test_check_number_refuses_an_integer_too_large_for_a_float():
    with pytest.raises(UsageError, match="rate must be a finite number, but got an integer of 401 digits"):
        checks.check_number("rate", 10 ** 400)
    assert checks.check_number("rate", 10 ** 300) == 1e300


@pytest.mark.parametrize("value, message", [
    ([1.0, True], "only numbers"), ([[1.0], [None]], "only numbers"), (["1"], "only numbers"),
    ([10 ** 400], "too large"), ([[1.0, 2.0], [1.0]], "ragged"), ({"a": 1}, "only numbers"),
])
def test_check_real_array_refuses_what_numpy_would_accept_or_crash_on(value, message):
    with pytest.raises(UsageError, match=message):
        checks.check_real_array("x", value)


def test_check_real_array_accepts_nested_numbers_and_arrays():
    import numpy as np
    array = checks.check_real_array("x", [[1, 2.5], np.array([3, 4], dtype=np.int16)])
    assert array.dtype == np.float64 and array.tolist() == [[1.0, 2.5], [3.0, 4.0]]


@pytest.mark.parametrize("depth, ok", [(checks.MAX_JSON_DEPTH, True), (checks.MAX_JSON_DEPTH + 1, False),
                                       (900, False), (100000, False)])
def test_parse_json_limits_nesting(depth, ok):
    text = "[" * depth + "]" * depth
    if ok:
        assert checks.json_depth(checks.parse_json(text)) == depth
    else:
        with pytest.raises(ValueError, match="nested more than {} levels".format(checks.MAX_JSON_DEPTH)):
            checks.parse_json(text)


def test_parse_json_counts_objects_as_levels_and_refuses_invalid_utf8():
    assert checks.json_depth({"a": [{"b": 1}]}) == 3 and checks.json_depth(5) == 0
    with pytest.raises(ValueError):
        checks.parse_json(b'{"a": "\xff"}')
    assert checks.parse_json('{"caf\\u00e9": 1}'.encode("utf-8")) == {"caf\u00e9": 1}


def test_load_json_file_names_the_file_and_refuses_non_objects(tmp_path):
    path = write(tmp_path / "x.json", b"[1, 2]")
    with pytest.raises(ConfigError, match=r"thing '.*x\.json' must hold a JSON object, not list"):
        checks.load_json_file(path, "thing")
    assert checks.load_json_file(path, "thing", require_object=False) == [1, 2]
    with pytest.raises(ConfigError, match="cannot read thing '.*missing.json'"):
        checks.load_json_file(str(tmp_path / "missing.json"), "thing")


# --- recordings -------------------------------------------------------------------------

MAGIC_AND_VERSION = b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00"
GOOD_HEAD = (b'{"format":"neurohand-recording","label_streams":[],"metadata":{},'
             b'"signal":{"channel_names":["a"],"dtype":"int16","rate":1000.0,"scale_uv":[1.0]}}')


def make_chunk(kind, payload):
    head = struct.pack("<4sQI", kind, len(payload), zlib.crc32(payload) & 0xFFFFFFFF)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


def test_recording_head_nested_too_deep_is_a_recording_error(tmp_path):
    # Was: RecursionError from json.loads in _Scanner._take_header.
    path = write(tmp_path / "deep.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", DEEP_JSON))
    with pytest.raises(RecordingError, match="invalid header: nested more than"):
        open_recording(path)


@pytest.mark.parametrize("kind", [b"EVNT", b"DONE"])
def test_recording_chunk_nested_too_deep_is_skipped_with_a_warning(tmp_path, kind):
    # Was: RecursionError from json.loads in _take_events / _check_totals.
    path = write(tmp_path / "deep.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", GOOD_HEAD) + make_chunk(kind, DEEP_JSON)
                 + make_chunk(b"SIGS", b"\x07\x00"))
    with pytest.warns(RecordingTruncatedWarning, match=kind.decode()):
        recording = open_recording(path)
    with recording:
        # A damaged EVNT chunk no longer hides the chunks after it; nothing may follow DONE.
        assert recording.n_samples == (1 if kind == b"EVNT" else 0)


@pytest.mark.parametrize("field", [b'"rate":1000.0', b'"scale_uv":[1.0]'])
def test_recording_head_number_too_large_for_a_float_is_a_recording_error(tmp_path, field):
    # Was: OverflowError from float() in checks.check_number / np.asarray in _check_scales.
    name = field.split(b":")[0]
    huge = GOOD_HEAD.replace(field, name + b":" + (HUGE_INT if name == b'"rate"' else b"[" + HUGE_INT + b"]"))
    path = write(tmp_path / "huge.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", huge))
    with pytest.raises(RecordingError, match="invalid header: .*(signal rate|scale_uv)"):
        open_recording(path)


def _head(change):
    head = json.loads(GOOD_HEAD.decode("ascii"))
    head["label_streams"] = [{"name": "fingers", "rate": 100.0, "names": ["thumb"]}]
    change(head)
    return json.dumps(head).encode("ascii")


@pytest.mark.parametrize("change, message", [
    (lambda h: h["signal"].pop("rate"), "field 'signal.rate' is missing"),
    (lambda h: h["signal"].pop("dtype"), "field 'signal.dtype' is missing"),
    (lambda h: h["signal"].pop("channel_names"), "field 'signal.channel_names' is missing"),
    (lambda h: h["signal"].pop("scale_uv"), "field 'signal.scale_uv' is missing"),
    (lambda h: h.pop("signal"), "field 'signal' is missing"),
    (lambda h: h.pop("label_streams"), "field 'label_streams' is missing"),
    (lambda h: h.__setitem__("signal", [1]), "signal must be an object"),
    (lambda h: h.__setitem__("label_streams", {"a": 1}), "label_streams must be a list"),
    (lambda h: h["label_streams"].__setitem__(0, "x"), r"label_streams\[0\] must be an object"),
    (lambda h: h["label_streams"][0].pop("rate"), r"field 'label_streams\[0\].rate' is missing"),
    (lambda h: h["label_streams"][0].__setitem__("name", [1]), r"label_streams\[0\].name must be a string"),
])
def test_recording_head_errors_name_the_field(tmp_path, change, message):
    # Was: "invalid header: 'rate'" (a KeyError's text) or "list indices must be integers or slices, not str".
    path = write(tmp_path / "head.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", _head(change)))
    with pytest.raises(RecordingError, match="invalid header: " + message):
        open_recording(path)


def test_recording_with_many_channel_names_finds_every_duplicate(tmp_path):
    # _check_names counted each name in the whole list (quadratic: 7 s for 20,000 names).
    names = ["ch{}".format(i) for i in range(20000)] + ["ch7", "ch19999", "ch7"]
    with pytest.raises(UsageError, match="'ch19999', 'ch7' appear more than once"):
        RecordingWriter(str(tmp_path / "r.nhr"), 1000.0, names, "float32")
    head = _head(lambda h: h["signal"].update(channel_names=names, scale_uv=[1.0] * len(names)))
    path = write(tmp_path / "dup.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", head))
    with pytest.raises(RecordingError, match="channel names must be unique"):
        open_recording(path)


def test_recording_channel_count_is_capped(tmp_path):
    names = ["c{}".format(i) for i in range(MAX_CHANNELS + 1)]
    with pytest.raises(UsageError, match="at most {} names".format(MAX_CHANNELS)):
        RecordingWriter(str(tmp_path / "r.nhr"), 1000.0, names, "float32")
    head = _head(lambda h: h["signal"].update(channel_names=names, scale_uv=[1.0] * len(names)))
    path = write(tmp_path / "wide.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", head))
    with pytest.raises(RecordingError, match="channel names must be at most"):
        open_recording(path)


# --- runtime config ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b'{"data_timeout_ms": ' + HUGE_INT + b"}",
                                     b'{"calibration": {"lo": [' + HUGE_INT + b"]}}", DEEP_JSON])
def test_runtime_config_huge_number_or_deep_nesting_is_a_config_error(tmp_path, content):
    # Was: OverflowError (checks.check_number) and RecursionError (json.load).
    path = write(tmp_path / "runtime.json", content)
    with pytest.raises(ConfigError, match="runtime config"):
        load_runtime_config(path)


# --- feature pipeline configs ---------------------------------------------------------------

with open(os.path.join(DATA, "pipelines.json"), encoding="utf-8") as _handle:
    SMALL = json.load(_handle)["small_1k_4ch"]
WHERE = "bundle/config.json"


def small_with(change):
    config = copy.deepcopy(SMALL)
    change(config)
    return config


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _set_filter(key, value):
    return lambda c: c["filter"].__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    # Was: TypeError at pipeline.py _check_filter_description: list(50)
    (_set_filter("notch_hz", 50), "filter.notch_hz must be a list"),
    (_set_filter("notch_hz", True), "filter.notch_hz must be a list"),
    (_set_filter("notch_hz", [True]), "filter.notch_hz cut-off True"),
    # Was: silently ignored
    (_set_filter("band_hz", "10-300"), "filter.band_hz must be null or a pair"),
    (_set_filter("band_hz", [10.0]), "filter.band_hz must be null or a pair"),
    (_set_filter("band_hz", [300.0, 10.0]), "filter.band_hz low edge must be below"),
    (_set_filter("band_order", "2"), "filter.band_order must be an integer"),
    (_set_filter("notch_q", [30]), "filter.notch_q must be a number"),
    # Was: TypeError/ValueError at features.py WindowFeatures.__init__ (bands unpacked before band_bins checks them)
    (_set("bandpower_bands_hz", None), "bandpower_bands_hz must be a list"),
    (_set("bandpower_bands_hz", 5), "bandpower_bands_hz must be a list"),
    (_set("bandpower_bands_hz", [[10.0, 20.0, 30.0]]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [[10.0]]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [None]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [["a", "b"]]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [[10.0, [20.0]]]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [[False, 20.0]]), "each band power band must be a pair"),
    (_set("bandpower_bands_hz", [[10.0, 10 ** 400]]), r"bandpower_bands_hz\[0\] high edge must be a finite"),
    # Was: MemoryError (np.arange of the window) and ZeroDivisionError (power scale) in WindowFeatures.__init__
    (_set("window_samples", 10 ** 12), "window_samples must be at most"),
    (_set("window_samples", 2 ** 63), "window_samples must be at most"),
    # Was: accepted
    (_set("n_channels", 10 ** 12), "n_channels must be at most"),
    (_set("stride_samples", 10 ** 12), "stride_samples must be at most"),
    (lambda c: c["sos"][0].__setitem__(0, True), "filter coefficients .* holds True"),
    (lambda c: c["sos"][0].__setitem__(0, 10 ** 400), "filter coefficients .* too large"),
    # Was: OverflowError in checks.check_number
    (_set("signal_rate", 10 ** 400), "signal_rate must be a finite number"),
    (_set("threshold_uv", 10 ** 400), "threshold_uv must be a finite number"),
])
def test_pipeline_config_finding(change, message):
    with pytest.raises(ConfigError, match=WHERE + ": " + message):
        FeaturePipeline.from_config(small_with(change), where=WHERE)


@pytest.mark.parametrize("value", [True, 10 ** 400, "1"])
def test_pipeline_normalisation_holding_non_numbers_is_refused(value):
    config = copy.deepcopy(SMALL)
    n_features = len(config["feature_names"])
    config["normalisation"] = {"mean": [0.0] * n_features, "std": [1.0] * (n_features - 1) + [value]}
    with pytest.raises(ConfigError, match="normalisation is not numeric"):
        FeaturePipeline.from_config(config, where=WHERE)


def test_pipeline_window_size_bounds():
    # The largest window allowed on few channels builds; the same window on many channels is refused.
    largest = pipeline_module.MAX_WINDOW_SAMPLES
    config = small_with(lambda c: c.update(window_samples=largest, n_channels=pipeline_module.MAX_WINDOW_VALUES // largest))
    assert FeaturePipeline.from_config(config, where=WHERE).window_samples == largest
    config["n_channels"] += 1
    with pytest.raises(ConfigError, match="values per window; at most {}".format(pipeline_module.MAX_WINDOW_VALUES)):
        FeaturePipeline.from_config(config, where=WHERE)


# --- ONNX ---------------------------------------------------------------------------------

def pb_model(graph):
    metadata = pb_field(14, 2, pb_text(1, "neurohand.graph_format") + pb_text(2, "rnn-step-1"))
    return pb_field(1, 0, 8) + pb_field(7, 2, graph) + metadata


def pb_node(op_type, inputs=(), attributes=b""):
    return b"".join(pb_text(1, name) for name in inputs) + pb_text(4, op_type) + attributes


def pb_int_attribute(name, value):
    return pb_field(5, 2, pb_text(1, name) + pb_field(3, 0, value))


def pb_features_input(width):
    shape = pb_field(1, 2, pb_field(1, 0, 1)) + pb_field(1, 2, pb_field(1, 0, width))
    return pb_field(11, 2, pb_text(1, "features") + pb_field(2, 2, pb_field(1, 2, pb_field(1, 0, 1) + pb_field(2, 2, shape))))


def pb_tensor(*fields):
    return pb_field(5, 2, pb_text(8, "w") + pb_field(2, 0, 1) + b"".join(fields))


ONNX_REPRODUCERS = [
    # UnicodeDecodeError in _text: a node name that is not UTF-8 (most single bit flips in names)
    ("node name not UTF-8", pb_model(pb_field(1, 2, pb_text(3, b"\xff\xfe"))), "node name is not UTF-8"),
    ("opset domain not UTF-8", pb_field(8, 2, pb_text(1, b"\xc3")) + pb_model(b""), "opset domain is not UTF-8"),
    # struct.error: packed floats whose length is not a multiple of 4 (8 for doubles)
    ("attribute floats of 5 bytes", pb_model(pb_field(1, 2, pb_node("Gemm", attributes=pb_field(
        5, 2, pb_text(1, "alpha") + pb_field(7, 2, b"\x00" * 5))))), "'alpha' floats: 5 bytes of packed 4-byte"),
    ("tensor float_data of 6 bytes", pb_model(pb_tensor(pb_field(1, 0, 1), pb_field(4, 2, b"\x00" * 6))),
     "float_data: 6 bytes"),
    ("tensor double_data of 9 bytes", pb_model(pb_tensor(pb_field(1, 0, 1), pb_field(10, 2, b"\x00" * 9))),
     "double_data: 9 bytes of packed 8-byte"),
    # TypeError: a field with an unexpected wire type
    ("tensor float_data as a varint", pb_model(pb_tensor(pb_field(1, 0, 1), pb_field(4, 0, 7))),
     "TensorProto field 4 has wire type 0, expected 2 or 5"),
    ("tensor dims as fixed32", pb_model(pb_tensor(pb_field(1, 5, b"\x01\x00\x00\x00"), pb_field(4, 5, b"\x00" * 4))),
     "TensorProto field 1 has wire type 5"),
    # ValueError from reshape
    ("tensor dims -1, -1", pb_model(pb_tensor(pb_field(1, 0, 2 ** 64 - 1), pb_field(1, 0, 2 ** 64 - 1),
                                              pb_field(4, 5, b"\x00" * 4))), r"impossible shape \[-1, -1\]"),
    ("tensor with 70 dims", pb_model(pb_tensor(*([pb_field(1, 0, 1)] * 70 + [pb_field(4, 5, b"\x00" * 4)]))),
     "impossible shape"),
    # TypeError: gates * None when no layer declares hidden_size
    ("GRU without hidden_size", pb_model(pb_field(1, 2, pb_node(
        "GRU", ["features", "rnn.0.W", "rnn.0.R", "rnn.0.B"], pb_int_attribute("linear_before_reset", 1)))
        + pb_features_input(4)), "GRU layer 0 attribute 'hidden_size' is None, expected int"),
    # IndexError: shape[0] of a 0-d projection weight
    ("0-d projection weight", pb_model(
        pb_field(1, 2, pb_node("GRU", attributes=pb_int_attribute("hidden_size", 8)))
        + pb_field(1, 2, pb_node("Gemm", ["features", "projection.weight", "projection.bias"],
                                 pb_int_attribute("transB", 1)))
        + pb_features_input(4)
        + pb_field(5, 2, pb_text(8, "projection.weight") + pb_field(2, 0, 1) + pb_field(9, 2, b"\x00" * 4))),
     r"'projection.weight' has shape \(\), expected 2 dimensions"),
    # Added with the fix: attributes of the wrong type, a field numbered 0
    ("Gemm transB as a string", pb_model(
        pb_field(1, 2, pb_node("GRU", attributes=pb_int_attribute("hidden_size", 8)))
        + pb_field(1, 2, pb_node("Gemm", ["features", "projection.weight", "projection.bias"],
                                 pb_field(5, 2, pb_text(1, "transB") + pb_text(4, "1"))))
        + pb_features_input(4)
        + pb_field(5, 2, pb_text(8, "projection.weight") + pb_field(2, 0, 1) + pb_field(1, 0, 1)
                   + pb_field(1, 0, 4) + pb_field(9, 2, b"\x00" * 16))),
     "attribute 'transB' is '1', expected int"),
    ("field number 0", pb_model(b"") + b"\x02\x00", "field numbered 0"),
]


@pytest.mark.parametrize("name, blob, message", ONNX_REPRODUCERS, ids=[n for n, _, _ in ONNX_REPRODUCERS])
def test_onnx_malformed_protobuf_is_a_config_error(tmp_path, name, blob, message):
    path = write(tmp_path / "model.onnx", blob)
    with pytest.raises(ConfigError, match=r"model\.onnx'.*" + message):
        load_rnn_weights(path)


def test_onnx_random_bit_flips_are_config_errors(tmp_path):
    # About 1 in 10 flips of golden_gru.onnx escaped (mostly UnicodeDecodeError).
    with open(os.path.join(DATA, "golden_gru.onnx"), "rb") as handle:
        data = handle.read()
    rng = random.Random(20240613)
    path = str(tmp_path / "flipped.onnx")
    escaped = []
    for trial in range(400):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        write(path, bytes(damaged))
        try:
            load_rnn_weights(path)
        except ConfigError:
            pass
        except Exception as exc:  # noqa: BLE001
            escaped.append((trial, type(exc).__name__, str(exc)[:60]))
    assert not escaped, "{} of 400 escaped, e.g. {}".format(len(escaped), escaped[:5])


@pytest.mark.parametrize("name", ["golden_gru.onnx", "golden_lstm.onnx"])
def test_onnx_cut_before_its_model_config_is_refused(tmp_path, name):
    # Protobuf has no end marker: golden_lstm.onnx cut after its first metadata entry
    # loaded, silently without neurohand.model_config.  (Every cut between top-level
    # fields is fuzzed in test_fuzz_loaders.py.)
    with open(os.path.join(DATA, name), "rb") as handle:
        data = handle.read()
    full = load_rnn_weights(data)
    assert sorted(full.metadata) == [GRAPH_FORMAT_KEY, CONFIG_METADATA_KEY]
    last_entry = pb_field(14, 2, pb_text(1, CONFIG_METADATA_KEY) + pb_text(2, full.metadata[CONFIG_METADATA_KEY]))
    assert data.endswith(last_entry)
    path = write(tmp_path / name, data[:-len(last_entry)])
    with pytest.raises(ConfigError, match="'neurohand.model_config' is missing"):
        load_rnn_weights(path)


@pytest.mark.parametrize("config, message", [("{", "not valid JSON"), ("[1]", "must be a JSON object"),
                                             ("[" * 100 + "]" * 100, "nested")])
def test_onnx_model_config_that_is_not_a_json_object_is_refused(tmp_path, config, message):
    with open(os.path.join(DATA, "golden_gru.onnx"), "rb") as handle:
        data = handle.read()
    stored = load_rnn_weights(data).metadata[CONFIG_METADATA_KEY]
    last_entry = pb_field(14, 2, pb_text(1, CONFIG_METADATA_KEY) + pb_text(2, stored))
    damaged = data[:-len(last_entry)] + pb_field(14, 2, pb_text(1, CONFIG_METADATA_KEY) + pb_text(2, config))
    with pytest.raises(ConfigError, match=message):
        load_rnn_weights(write(tmp_path / "model.onnx", damaged))


# --- bundles ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression_bundle")
    run = root / "run"
    run.mkdir()
    shutil.copyfile(os.path.join(DATA, "golden_gru.onnx"), str(run / "model.onnx"))
    write(run / "config.json", json.dumps({"pipeline": {}, "model": {}}).encode("ascii"))
    make_bundle(str(run), str(root / "bundle"))
    return root / "bundle"


@pytest.fixture
def bundle(pristine_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(str(pristine_bundle), str(path))
    return path


def rewrite(bundle_path, change):
    with open(str(bundle_path / "manifest.json"), encoding="utf-8") as handle:
        manifest = json.load(handle)
    change(manifest)
    write(bundle_path / "manifest.json", json.dumps(manifest).encode("utf-8"))


def rehash(bundle_path, name, content):
    """Replace bundle file ``name`` by ``content`` and make the manifest match it."""
    write(bundle_path / name, content)

    def change(manifest):
        manifest["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
    rewrite(bundle_path, change)


@pytest.mark.parametrize("entry", ["abc", [1], None, 5])
def test_bundle_manifest_file_entry_that_is_not_an_object(bundle, entry):
    # Was: AttributeError: 'str' object has no attribute 'get' (bundle.py verify_manifest).
    rewrite(bundle, lambda m: m["files"].__setitem__("model.onnx", entry))
    with pytest.raises(BundleError, match="the entry of model.onnx must be an object"):
        load_bundle(str(bundle))


@pytest.mark.parametrize("version", [True, 1.0])
def test_bundle_format_version_must_be_the_integer_1(bundle, version):
    # Was: accepted (True == 1 == 1.0 in Python).
    rewrite(bundle, lambda m: m.__setitem__("format_version", version))
    with pytest.raises(BundleError, match="has format version {!r}".format(version)):
        load_bundle(str(bundle))


def test_bundle_file_size_must_be_an_integer(bundle, pristine_bundle):
    rewrite(bundle, lambda m: m["files"]["model.onnx"].__setitem__("bytes", float(m["files"]["model.onnx"]["bytes"])))
    with pytest.raises(BundleError, match="model.onnx' has"):
        load_bundle(str(bundle))


@pytest.mark.parametrize("content", [b"[1, 2]", b'"config"', b"null"])
def test_bundle_config_that_is_not_a_json_object(bundle, content):
    rehash(bundle, "config.json", content)
    with pytest.raises(BundleError, match="config.json' must hold a JSON object"):
        load_bundle(str(bundle))


@pytest.mark.parametrize("name", ["manifest.json", "config.json"])
def test_bundle_json_nested_too_deep(bundle, name):
    # Was: RecursionError from json.load in bundle._read_json.
    if name == "manifest.json":
        write(bundle / name, DEEP_JSON)
    else:
        rehash(bundle, name, DEEP_JSON)
    with pytest.raises(BundleError, match=name + "' is not valid JSON: nested more than"):
        load_bundle(str(bundle))


def _npy(header, data):
    import io
    import numpy as np
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue() + data


def _npz(members):
    import io
    import zipfile
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return stream.getvalue()


def _golden_damaged(bundle, damage):
    with open(str(bundle / "golden.npz"), "rb") as handle:
        golden = bytearray(handle.read())
    if damage == "truncated":
        return bytes(golden[:len(golden) // 2])
    if damage == "bad zip crc":
        golden[200] ^= 0xFF      # inside features.npy's data
        return bytes(golden)
    if damage == "not a zip":
        golden[:4] = b"PK\x05\x06"
        return bytes(golden)
    outputs = _npy({"descr": "<f4", "fortran_order": False, "shape": (1, 1, 1)}, b"\x00" * 4)
    features = {
        # A header promising 4 TB: refused before anything is allocated.
        "huge shape": _npy({"descr": "<f4", "fortran_order": False, "shape": (10 ** 12,)}, b"\x00" * 8),
        "object array": _npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x00" * 8),
        "no npy header": b"plain bytes",
    }[damage]
    return _npz({"features.npy": features, "outputs.npy": outputs})


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a zip file"), ("bad zip crc", "Bad CRC-32"), ("not a zip", "golden"),
    ("huge shape", r"holds 8 bytes of data for shape \(1000000000000,\)"), ("object array", "not numbers"),
    ("no npy header", "no valid .npy header"),
])
def test_bundle_golden_vectors_damaged_under_a_matching_manifest(bundle, damage, message):
    # Was: zipfile.BadZipFile escaped Bundle.golden_vectors (it caught KeyError,
    # ValueError and OSError only).  The manifest hash normally catches damage first;
    # this is a bundle whose manifest was made for the damaged file.
    rehash(bundle, "golden.npz", _golden_damaged(bundle, damage))
    loaded = load_bundle(str(bundle))
    with pytest.raises(BundleError, match="golden vectors .*" + message):
        loaded.golden_vectors()


def test_bundle_golden_vectors_damaged_leave_no_open_file_behind(bundle):
    # np.load left its file open on a damaged archive (numpy 1.19 also printed an
    # error from NpzFile.__del__): run in a fresh interpreter where an unclosed
    # file is an error that lands on stderr.
    rehash(bundle, "golden.npz", _golden_damaged(bundle, "truncated"))
    code = ("import gc, sys\n"
            "from neurohand.deploy.bundle import load_bundle\n"
            "from neurohand.firmware_bridge.shared.errors import BundleError\n"
            "try:\n"
            "    load_bundle(sys.argv[1]).golden_vectors()\n"
            "except BundleError as exc:\n"
            "    print('refused:', exc)\n"
            "gc.collect()\n")
    process = subprocess.Popen([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", code, str(bundle)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and out.startswith("refused: golden vectors"), (out, err)
    assert err == "", err


def test_bundle_golden_vectors_still_read(pristine_bundle):
    features, outputs = load_bundle(str(pristine_bundle)).golden_vectors()
    assert features.shape[:2] == outputs.shape[:2] == (3, 250) and features.dtype == outputs.dtype == "float32"


# --- text files are UTF-8 whatever the locale -----------------------------------------------

def test_loaders_read_utf8_under_the_c_locale(bundle, tmp_path):
    # Under systemd on the Jetson LANG is often unset: Python 3.6 then decodes
    # open(path) as ASCII and refused a valid UTF-8 config.json.  Locale coercion
    # and UTF-8 mode (Python 3.7+) are switched off so the test means the same
    # under every Python.
    config = {"pipeline": {}, "model": {}, "note": "caf\u00e9 \u00b5V"}
    rehash(bundle, "config.json", json.dumps(config, ensure_ascii=False).encode("utf-8"))
    runtime = write(tmp_path / "runtime.json", '{"safe_posture": "hold", "d\u00e9lai": 5}'.encode("utf-8"))
    code = ("import sys\n"
            "from neurohand.deploy.bundle import load_bundle\n"
            "from neurohand.deploy.runtime.config import load_runtime_config\n"
            "from neurohand.firmware_bridge.shared.errors import ConfigError\n"
            "import locale\n"
            "print(locale.getpreferredencoding(False))\n"
            "print(ascii(load_bundle(sys.argv[1]).config['note']))\n"
            "try:\n"
            "    load_runtime_config(sys.argv[2])\n"
            "except ConfigError as exc:\n"
            "    print(ascii(str(exc)))\n")
    environment = dict(os.environ, LANG="C", LC_ALL="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0")
    environment.pop("PYTHONIOENCODING", None)
    process = subprocess.Popen([sys.executable, "-c", code, str(bundle), runtime], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode("utf-8", "replace")
    lines = out.decode("ascii").splitlines()
    assert lines[0] in ("ANSI_X3.4-1968", "ascii", "US-ASCII"), lines   # open(path) would decode ASCII
    assert lines[1] == ascii("caf\u00e9 \u00b5V"), lines
    # The runtime config is read: the refusal is about the unknown key, not the bytes.
    assert "runtime setting must be one of" in lines[2] and "d\\xe9lai" in lines[2], lines
