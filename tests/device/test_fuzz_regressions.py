"""Regression tests for the loader bugs the fuzzing found (tests/device/test_fuzz_loaders.py).

Each test is a minimal reproducer of a corrupted input that once escaped as
something other than a NeurohandError naming the problem (RecursionError,
OverflowError, TypeError, struct.error, UnicodeDecodeError, MemoryError,
BadZipFile ...), plus the checks added with the fixes: the shared JSON reader
(nesting limit, UTF-8 whatever the locale), bounds on sizes, field names in
recording header errors.
"""
import collections
import copy
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zlib

import pytest

from neurohand.decoder import pipeline as pipeline_module
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.firmware_bridge import checks
from neurohand.firmware_bridge.errors import ConfigError, RecordingError, UsageError
from neurohand.firmware_bridge.recording import (
    MAX_CHANNELS, RecordingTruncatedWarning, RecordingWriter, open_recording)
from neurohand.deploy.runtime.config import load_runtime_config

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
    with pytest.raises(ConfigError, match="thing '.*missing.json' cannot be read"):
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
def test_recording_chunk_nested_too_deep_ends_the_scan_with_a_warning(tmp_path, kind):
    # Was: RecursionError from json.loads in _take_events / _check_totals.
    path = write(tmp_path / "deep.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", GOOD_HEAD) + make_chunk(kind, DEEP_JSON))
    with pytest.warns(RecordingTruncatedWarning, match=kind.decode()):
        open_recording(path).close()


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
