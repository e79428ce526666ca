"""Fuzzing the device path's loaders: corrupted input must give a NeurohandError.

The contract for every loader here: a truncated, bit-flipped, garbage or
wrongly typed input is refused with a ``NeurohandError`` subclass whose message
names the file, field or problem -- never an IndexError, KeyError,
struct.error, ValueError, MemoryError or UnicodeDecodeError traceback -- and
nothing allocates memory in proportion to a length field instead of the file.

Covered: the recording reader (random truncation and multi-byte corruption,
garbage files, chunk headers with absurd lengths, wrongly typed HEAD JSON, very
many channels), FeaturePipeline.from_config, the ONNX reader, deploy bundles
(manifest types, path traversal, damaged files), the hands' frame validation
and the runtime config loader.  Minimal reproducers of the bugs this fuzzing
found, and the checks added with their fixes, are in
tests/device/test_fuzz_regressions.py.

Seeded: NEUROHAND_FUZZ_SEED=N reproduces a run (default fixed); every failure
message names the seed and the case.
"""
import copy
import json
import os
import random
import shutil
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest

from neurohand.decoder.onnx_weights import load_rnn_weights, read_onnx
from neurohand.decoder.pipeline import FeaturePipeline
from neurohand.deploy.bundle import load_bundle, make_bundle
from neurohand.deploy.runtime.config import load_runtime_config
from neurohand.firmware_bridge.shared.errors import (
    BundleError, ConfigError, NeurohandError, ProtocolError, RecordingError)
from neurohand.firmware_bridge.hands import neurohand_protocol as nhp
from neurohand.firmware_bridge.hands import ppp, psyonic
from neurohand.firmware_bridge.recording.file_format import RecordingTruncatedWarning, RecordingWriter, open_recording
from neurohand.firmware_bridge.virtual import hand as virtual_hand
from protobuf_builder import pb_field, pb_text, pb_varint  # noqa: F401

DATA = os.path.join(os.path.dirname(__file__), "data")
DEFAULT_SEED = 20240612


def fuzz_seed(offset=0):
    text = os.environ.get("NEUROHAND_FUZZ_SEED", "")
    return (int(text) if text and text != "random" else DEFAULT_SEED) + offset


def outcome(call, context):
    """Return ("ok", value) or ("error", NeurohandError); anything else fails naming ``context``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = call()
    except NeurohandError as exc:
        return "error", exc
    except Exception as exc:  # noqa: BLE001 -- the point of the test
        raise AssertionError("{}: {}: {} escaped instead of a NeurohandError".format(
            context, type(exc).__name__, exc)) from exc
    others = [w for w in caught if not issubclass(w.category, RecordingTruncatedWarning)]
    assert not others, "{}: unexpected warnings {}".format(context, [str(w.message) for w in others])
    return "ok", (value, [w for w in caught if issubclass(w.category, RecordingTruncatedWarning)])


def write(path, data):
    with open(str(path), "wb") as handle:
        handle.write(data)
    return str(path)


def damage(rng, data, n_bytes=None, burst=False):
    """Return (damaged copy, sorted offsets that really changed)."""
    damaged = bytearray(data)
    if burst:
        start = rng.randrange(len(data))
        for offset in range(start, min(len(data), start + rng.randint(2, 64))):
            damaged[offset] = rng.randrange(256)
    else:
        for _ in range(n_bytes or rng.randint(1, 16)):
            damaged[rng.randrange(len(data))] ^= rng.randint(1, 255)
    changed = [i for i, (a, b) in enumerate(zip(data, damaged)) if a != b]
    return bytes(damaged), changed


# --- recordings ---------------------------------------------------------------------

MAGIC_AND_VERSION = b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00"
GOOD_HEAD = {"format": "neurohand-recording",
             "signal": {"rate": 1000.0, "dtype": "int16", "channel_names": ["a", "b"], "scale_uv": [0.5, 1.0]},
             "label_streams": [{"name": "fingers", "rate": 100.0, "names": ["thumb", "index"]}],
             "metadata": {"subject": "S1"}}


def make_chunk(kind, payload):
    head = struct.pack("<4sQI", kind, len(payload), zlib.crc32(payload) & 0xFFFFFFFF)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


def chunk_header(kind, length, payload_crc=0):
    """A chunk header with a valid header CRC declaring ``length`` payload bytes."""
    head = struct.pack("<4sQI", kind, length, payload_crc)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def chunk_spans(data):
    """(kind, start, end, payload) of every chunk of a VALID file (the writer's output)."""
    spans, offset = [], 12
    while offset < len(data):
        kind, length = struct.unpack_from("<4sQ", data, offset)
        end = offset + 20 + length
        spans.append((kind, offset, end, data[offset + 20:end]))
        offset = end
    return spans


def recording_file(path, dtype):
    """A recording with every chunk type; returns (bytes, signals, spans)."""
    rng = np.random.RandomState(3)
    signals = []
    with RecordingWriter(str(path), 1000.0, ["a", "b", "c"], dtype, [0.5, 1.0, 2.0] if dtype == "int16" else None,
                         {"subject": "S1"}, {"fingers": {"rate": 100.0, "names": ["thumb", "index"]}},
                         flush_interval_s=0.03) as writer:
        for step, n in enumerate([40, 7, 90, 31, 64, 3, 120]):
            block = (rng.randint(-3000, 3000, size=(n, 3)).astype(dtype) if dtype == "int16"
                     else rng.normal(0, 50, size=(n, 3)).astype(np.float32))
            writer.append_signals(block)
            signals.append(block)
            writer.append_labels("fingers", np.full((n // 10, 2), step, dtype=np.float32))
            writer.add_event(step * 10, "movement", step)
    with open(str(path), "rb") as handle:
        data = handle.read()
    return data, np.concatenate(signals), chunk_spans(data)


def samples_in(spans):
    return sum(len(payload) for kind, _, _, payload in spans if kind == b"SIGS")


def expected_after_damage(spans, changed, cut):
    """What the reader (verify=True) must keep of a file damaged at ``changed``
    and cut at ``cut``, per docs/recording-format.md's reading rules.

    Returns None if the file must be refused (damage in the file header or
    the HEAD chunk), else (kept spans, unreadable SIGS spans, complete).  A
    chunk whose header bytes changed is lost -- unless only its header CRC
    field changed, its payload is untouched and the next header is intact (or
    it ends the file): then it is kept.  A chunk with an intact header and a
    changed payload is lost, except a SIGS chunk, which keeps its place and is
    unreadable.  Nothing after DONE, and no chunk reaching past the cut, loads.
    """
    changed = set(changed)
    if any(c < 12 for c in changed) or cut < 12:
        return None

    def touched(lo, hi):
        return any(lo <= c < hi for c in changed)

    kept, unreadable = [], []
    for index, span in enumerate(spans):
        kind, start, end, _ = span
        if end > cut:
            break
        header_hit = touched(start, start + 20)
        payload_hit = touched(start + 20, end)
        if header_hit:
            nxt = spans[index + 1] if index + 1 < len(spans) else None
            next_intact = (end == cut) or (nxt is not None and nxt[1] + 20 <= cut and not touched(nxt[1], nxt[1] + 20))
            recovered = not touched(start, start + 16) and not payload_hit and next_intact
            if not recovered:
                if index == 0:
                    return None
                continue
        elif payload_hit:
            if index == 0:
                return None
            if kind == b"SIGS":
                unreadable.append(span)
            continue
        kept.append(span)
        if kind == b"DONE":
            break
    if not kept or kept[0][0] != b"HEAD":
        return None
    complete = not changed and cut == spans[-1][2]
    return kept, unreadable, complete


@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_recording_random_truncation_and_multi_byte_corruption(tmp_path, dtype):
    """Random cut points and 1..16 damaged bytes or bursts anywhere: the reader
    (verify=True) loads every chunk the damage did not touch -- also those after
    a damaged one -- or refuses the file with a RecordingError when the damage
    is in its header (expected_after_damage is the model)."""
    data, signals, spans = recording_file(tmp_path / "full.nhr", dtype)
    itemsize = 3 * np.dtype(dtype).itemsize
    seed = fuzz_seed(1 if dtype == "int16" else 2)
    rng = random.Random(seed)
    path = str(tmp_path / "damaged.nhr")
    refused = loaded_partly = loaded_after_damage = 0
    for trial in range(160):
        mode = trial % 4
        cut = len(data)
        changed = []
        blob = data
        if mode in (0, 3):
            cut = rng.randrange(len(data))
        if mode in (1, 2, 3):
            blob, changed = damage(rng, data, burst=(mode == 2))
        blob = blob[:cut]
        changed = [c for c in changed if c < cut and not 10 <= c < 12]   # any minor version is readable
        write(path, blob)
        context = "seed {} trial {} ({} bytes, cut {}, changed {})".format(seed, trial, len(blob), cut, changed[:8])
        expected = expected_after_damage(spans, changed, cut)
        kind, result = outcome(lambda: open_recording(path, verify=True), context)
        if expected is None:
            assert kind == "error" and isinstance(result, RecordingError), context
            assert path in str(result), context
            refused += 1
            continue
        assert kind == "ok", "{}: {}".format(context, result)
        kept, unreadable, complete = expected
        recording, caught = result
        with recording:
            assert recording.integrity["complete"] == complete, context
            assert bool(caught) != complete, context
            assert recording.integrity["chunks"] == len(kept), context
            present = sorted(kept + unreadable, key=lambda s: s[1])
            expected_signals = np.concatenate([np.zeros((0, 3), dtype)] + [
                np.frombuffer(p, np.dtype(dtype).newbyteorder("<")).reshape(-1, 3)
                for k, _, _, p in present if k == b"SIGS"])
            assert recording.n_samples == samples_in(present) // itemsize == len(expected_signals), context
            if not unreadable:
                np.testing.assert_array_equal(recording.read_signals(), expected_signals, err_msg=context)
            rows = [np.frombuffer(p[4:], "<f4").reshape(-1, 2) for k, _, _, p in kept if k == b"LABL"]
            np.testing.assert_array_equal(recording.label_streams["fingers"].data,
                                          np.concatenate([np.zeros((0, 2), np.float32)] + rows), err_msg=context)
            events = [tuple(e) for k, _, _, p in kept if k == b"EVNT" for e in json.loads(p.decode("utf-8"))]
            assert [tuple(e) for e in recording.events] == sorted(events, key=lambda e: e[0]), context
            loaded_partly += not complete
            last_kept = kept[-1][2]
            loaded_after_damage += bool(changed) and min(changed) < last_kept
        # Without verify, a damaged signal chunk is found when read: RecordingError, never wrong data.
        kind, result = outcome(lambda: open_recording(path), context)
        if kind == "ok":
            with result[0] as recording:
                kind, samples = outcome(recording.read_signals, context)
                if kind == "ok":
                    np.testing.assert_array_equal(samples[0], expected_signals, err_msg=context)
                else:
                    assert isinstance(samples, RecordingError) and "damaged" in str(samples), context
    assert refused > 5 and loaded_partly > 50 and loaded_after_damage > 20, (refused, loaded_partly, loaded_after_damage)


def test_recording_garbage_files_are_refused(tmp_path):
    seed = fuzz_seed(3)
    rng = random.Random(seed)
    path = str(tmp_path / "garbage.nhr")
    prefixes = [b"", MAGIC_AND_VERSION[:8], MAGIC_AND_VERSION, MAGIC_AND_VERSION + make_chunk(b"HEAD", b"{")]
    for trial in range(300):
        prefix = prefixes[trial % len(prefixes)]
        blob = prefix + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 600)))
        write(path, blob)
        context = "seed {} trial {}: {!r}".format(seed, trial, blob[:40])
        kind, result = outcome(lambda: open_recording(path), context)
        assert kind == "error" and isinstance(result, RecordingError), context


def test_recording_with_a_valid_head_then_garbage_loads_the_head_only(tmp_path):
    seed = fuzz_seed(4)
    rng = random.Random(seed)
    path = str(tmp_path / "tail.nhr")
    head = MAGIC_AND_VERSION + make_chunk(b"HEAD", json.dumps(GOOD_HEAD).encode("ascii"))
    for trial in range(200):
        blob = head + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600)))
        write(path, blob)
        context = "seed {} trial {}".format(seed, trial)
        kind, result = outcome(lambda: open_recording(path), context)
        assert kind == "ok", context
        recording, caught = result
        with recording:
            assert caught and recording.n_samples == 0 and recording.integrity["chunks"] == 1, context


@pytest.mark.parametrize("kind", [b"HEAD", b"SIGS", b"LABL", b"EVNT", b"DONE", b"ZZZZ"])
@pytest.mark.parametrize("length", [2 ** 63, 2 ** 64 - 1, 2 ** 32 + 5, 1 << 40])
def test_recording_absurd_chunk_lengths_allocate_nothing(tmp_path, kind, length):
    head = MAGIC_AND_VERSION + make_chunk(b"HEAD", json.dumps(GOOD_HEAD).encode("ascii"))
    prefix = MAGIC_AND_VERSION if kind == b"HEAD" else head
    path = write(tmp_path / "absurd.nhr", prefix + chunk_header(kind, length) + b"\x00" * 100)
    context = "{} chunk declaring {} bytes".format(kind, length)
    tracemalloc.start()
    try:
        for verify in (False, True):
            kind_of, result = outcome(lambda: open_recording(path, verify=verify), context)
            if kind == b"HEAD":
                assert kind_of == "error" and "incomplete HEAD chunk" in str(result), context
            else:
                assert kind_of == "ok", context
                recording, caught = result
                with recording:
                    assert caught and "incomplete" in str(caught[0].message), context
                    assert str(length) in recording.integrity["message"], context
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, "{}: peak {} bytes".format(context, peak)


def _head_with(change):
    head = copy.deepcopy(GOOD_HEAD)
    change(head)
    return head


WRONG_HEADS = [
    (lambda h: h.__setitem__("format", 5), "not a neurohand-recording header"),
    (lambda h: h.__setitem__("signal", [1, 2]), "invalid header"),
    (lambda h: h.__setitem__("signal", "abc"), "invalid header"),
    (lambda h: h.__setitem__("signal", None), "invalid header"),
    (lambda h: h.pop("signal"), "signal"),
    (lambda h: h.pop("metadata"), "metadata"),
    (lambda h: h.__setitem__("metadata", [1]), "metadata"),
    (lambda h: h["signal"].__setitem__("rate", "1000"), "signal rate"),
    (lambda h: h["signal"].__setitem__("rate", float("nan")), "signal rate"),
    (lambda h: h["signal"].__setitem__("rate", -5), "signal rate"),
    (lambda h: h["signal"].__setitem__("rate", True), "signal rate"),
    (lambda h: h["signal"].__setitem__("rate", [1000]), "signal rate"),
    (lambda h: h["signal"].__setitem__("dtype", [1]), "dtype"),
    (lambda h: h["signal"].__setitem__("dtype", {"a": 1}), "dtype"),
    (lambda h: h["signal"].__setitem__("dtype", "int64"), "dtype"),
    (lambda h: h["signal"].__setitem__("channel_names", {"a": 1}), "channel names"),
    (lambda h: h["signal"].__setitem__("channel_names", "ab"), "channel names"),
    (lambda h: h["signal"].__setitem__("channel_names", [1, 2]), "channel names"),
    (lambda h: h["signal"].__setitem__("channel_names", []), "channel names"),
    (lambda h: h["signal"].__setitem__("channel_names", ["a", "a"]), "channel names"),
    (lambda h: h["signal"].__setitem__("scale_uv", "0.5"), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", [[0.5, 1.0]]), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", {"a": 1}), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", [0.5, -1.0]), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", [0.5, float("inf")]), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", None), "scale_uv"),
    (lambda h: h["signal"].__setitem__("scale_uv", [0.5] * 100000), "scale_uv"),
    (lambda h: h.__setitem__("label_streams", 5), "invalid header"),
    (lambda h: h.__setitem__("label_streams", "x"), "invalid header"),
    (lambda h: h.__setitem__("label_streams", {"a": 1}), "invalid header"),
    (lambda h: h.__setitem__("label_streams", [{"name": "x"}]), "invalid header"),
    (lambda h: h["label_streams"][0].__setitem__("rate", 0), "rate"),
    (lambda h: h["label_streams"][0].__setitem__("names", []), "names"),
    (lambda h: h["label_streams"][0].__setitem__("name", [1]), "invalid header"),
    (lambda h: h["label_streams"].append(copy.deepcopy(h["label_streams"][0])), "not unique"),
]


@pytest.mark.parametrize("change, message", WRONG_HEADS)
def test_recording_head_with_wrong_types_is_refused_by_name(tmp_path, change, message):
    payload = json.dumps(_head_with(change)).encode("ascii")
    path = write(tmp_path / "head.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", payload))
    kind, result = outcome(lambda: open_recording(path), payload[:200])
    assert kind == "error" and isinstance(result, RecordingError), payload[:200]
    assert "invalid header" in str(result) and message in str(result), str(result)
    assert path in str(result)


@pytest.mark.parametrize("head_json", [b"", b"null", b"[]", b"5", b'"x"', b"{", b"\xff\xfe", b'{"format": "\xc3\xa9"}'])
def test_recording_head_that_is_not_a_json_object_is_refused(tmp_path, head_json):
    path = write(tmp_path / "head.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", head_json))
    kind, result = outcome(lambda: open_recording(path), head_json)
    assert kind == "error" and "invalid header" in str(result)


# A JSON array of invalid events, and DONE totals that disagree: the chunk is
# read (and counted), its invalid events dropped; the others are skipped.
COUNTED = (b'[[1, "a"]]', b'[[-1, "a", 0]]', b"[[1, 2, 3]]", b"[1]", b'{"n_samples": "0"}')


@pytest.mark.parametrize("kind, payload, message", [
    (b"EVNT", b'{"a": 1}', "EVNT"), (b"EVNT", b"5", "EVNT"), (b"EVNT", b'[[1, "a"]]', "EVNT"),
    (b"EVNT", b'[[-1, "a", 0]]', "EVNT"), (b"EVNT", b'[[1, 2, 3]]', "EVNT"), (b"EVNT", b"\xff", "EVNT"),
    (b"DONE", b"[1]", "DONE"), (b"DONE", b"\xff", "DONE"), (b"DONE", b'{"n_samples": "0"}', "DONE"),
    (b"LABL", b"\x01\x00", "too short"), (b"LABL", struct.pack("<I", 7) + b"\x00" * 8, "stream 7"),
    (b"LABL", struct.pack("<I", 2 ** 32 - 1), "stream"), (b"LABL", struct.pack("<I", 0) + b"\x00" * 5, "whole number"),
    (b"SIGS", b"\x00" * 3, "whole number"), (b"HEAD", b"{}", "second HEAD"),
])
def test_recording_chunks_with_wrong_content_are_skipped_with_a_warning(tmp_path, kind, payload, message):
    """The chunk is skipped and the signal chunk after it still loads (after
    DONE nothing may follow: those bytes are reported, not loaded)."""
    head = MAGIC_AND_VERSION + make_chunk(b"HEAD", json.dumps(GOOD_HEAD).encode("ascii"))
    path = write(tmp_path / "chunk.nhr", head + make_chunk(kind, payload) + make_chunk(b"SIGS", b"\x01\x00" * 2))
    state, result = outcome(lambda: open_recording(path), payload)
    assert state == "ok"
    recording, caught = result
    with recording:
        assert len(caught) == 1 and message in str(caught[0].message), [str(w.message) for w in caught]
        assert not recording.integrity["complete"]
        counted = payload in COUNTED
        if kind == b"DONE":
            assert recording.n_samples == 0 and recording.integrity["chunks"] == 1 + counted
        else:
            assert recording.n_samples == 1 and recording.integrity["chunks"] == 2 + counted
            assert recording.read_signals().tolist() == [[1, 1]] and len(recording.events) == 0


def test_recording_with_many_channels_loads_in_bounded_memory(tmp_path):
    n_channels = 3000
    head = _head_with(lambda h: h["signal"].update(channel_names=["ch{}".format(i) for i in range(n_channels)],
                                                   scale_uv=[0.5] * n_channels))
    rows = np.arange(4 * n_channels, dtype="<i2").reshape(4, n_channels)
    path = write(tmp_path / "wide.nhr", MAGIC_AND_VERSION + make_chunk(b"HEAD", json.dumps(head).encode("ascii"))
                 + make_chunk(b"SIGS", rows.tobytes()) + make_chunk(b"SIGS", b"\x00" * (2 * n_channels - 2)))
    tracemalloc.start()
    try:
        state, result = outcome(lambda: open_recording(path), "wide")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state == "ok"
    recording, caught = result
    with recording:
        assert recording.n_channels == n_channels and recording.n_samples == 4
        assert caught and "whole number" in str(caught[0].message)
        np.testing.assert_array_equal(recording.read_signals(), rows)
    assert peak < 8 << 20, peak


# --- feature pipeline configs -------------------------------------------------------------

with open(os.path.join(DATA, "pipelines.json")) as _handle:
    PIPELINES = json.load(_handle)
SMALL = PIPELINES["small_1k_4ch"]
WHERE = "bundle/config.json"


def normalised_small():
    config = copy.deepcopy(SMALL)
    n_features = len(config["feature_names"])
    config["normalisation"] = {"mean": [0.0] * n_features, "std": [1.0] * n_features}
    return config


def pipeline_with(change):
    config = normalised_small()
    change(config)
    return config


def _setter(key, value):
    return lambda c: c.__setitem__(key, value)


PIPELINE_REQUIRED = ("signal_rate", "n_channels", "mode", "dtype", "window_samples", "stride_samples", "car", "sos",
                     "features", "bandpower_bands_hz", "threshold_uv", "log", "log_epsilon", "normalisation")
NAN, INF = float("nan"), float("inf")

WRONG_PIPELINES = [(lambda c, k=key: c.pop(k), "missing keys") for key in PIPELINE_REQUIRED] + [
    (_setter("format", "neurohand-bundle"), "format"), (_setter("format", None), "format"),
    (_setter("version", 2), "version"), (_setter("version", "1"), "version"),
    (_setter("signal_rate", "1000"), "signal_rate"), (_setter("signal_rate", NAN), "signal_rate"),
    (_setter("signal_rate", INF), "signal_rate"), (_setter("signal_rate", 0), "signal_rate"),
    (_setter("signal_rate", True), "signal_rate"), (_setter("signal_rate", None), "signal_rate"),
    (_setter("n_channels", 0), "n_channels"), (_setter("n_channels", 4.0), "n_channels"),
    (_setter("n_channels", "4"), "n_channels"), (_setter("n_channels", [4]), "n_channels"),
    (_setter("mode", "rawish"), "mode"), (_setter("mode", 1), "mode"), (_setter("mode", ["raw"]), "mode"),
    (_setter("dtype", "float16"), "dtype"), (_setter("dtype", None), "dtype"),
    (_setter("window_samples", 0), "window_samples"), (_setter("window_samples", 50.0), "window_samples"),
    (_setter("window_samples", "50"), "window_samples"), (_setter("window_samples", 1), "window"),
    (_setter("stride_samples", -1), "stride_samples"), (_setter("stride_samples", None), "stride_samples"),
    (_setter("car", "yes"), "car and log"), (_setter("log", 1), "car and log"), (_setter("car", None), "car and log"),
    (_setter("features", "mav"), "features"), (_setter("features", [1]), "features"),
    (_setter("features", []), "feature"), (_setter("features", ["mav", "mav"]), "repeat"),
    (_setter("features", ["mavv"]), "did you mean 'mav'"), (_setter("features", {"mav": 1}), "features"),
    (_setter("threshold_uv", -1), "threshold_uv"), (_setter("threshold_uv", "0"), "threshold_uv"),
    (_setter("log_epsilon", 0), "log_epsilon"), (_setter("log_epsilon", NAN), "log_epsilon"),
    (_setter("sos", "abc"), "filter coefficients"), (_setter("sos", [[1, 2, 3]]), "shape"),
    (_setter("sos", [[[1, 0, 0, 1, 0, 0]]]), "shape"), (_setter("sos", {"a": 1}), "filter coefficients"),
    (_setter("sos", [[1, 0, 0, 1, 0, 0], [1, 0]]), "filter coefficients"),
    (lambda c: c["sos"][0].__setitem__(0, NAN), "NaN or infinity"),
    (lambda c: c["sos"][1].__setitem__(4, INF), "NaN or infinity"),
    (lambda c: c["sos"][1].__setitem__(4, -INF), "NaN or infinity"),
    (lambda c: c["sos"][0].__setitem__(3, 2.0), "a0"),
    (lambda c: c["sos"][0].__setitem__(5, 1.0), "unstable"),
    (lambda c: c["sos"][2].__setitem__(5, 1.5), "unstable"),
    (lambda c: c["sos"][2].__setitem__(4, -2.5), "unstable"),
    (lambda c: c["sos"][2].__setitem__(4, "x"), "filter coefficients"),
    (lambda c: c["sos"][2].__setitem__(4, None), "filter coefficients"),
    (_setter("normalisation", [1, 2]), "normalisation"), (_setter("normalisation", "z"), "normalisation"),
    (lambda c: c["normalisation"].pop("std"), "normalisation"),
    (lambda c: c["normalisation"]["mean"].pop(), "one per feature"),
    (lambda c: c["normalisation"].__setitem__("mean", [[0.0] * len(c["feature_names"])]), "one per feature"),
    (lambda c: c["normalisation"]["std"].__setitem__(3, 0.0), "non-positive"),
    (lambda c: c["normalisation"]["std"].__setitem__(3, NAN), "non-finite"),
    (lambda c: c["normalisation"]["mean"].__setitem__(3, INF), "non-finite"),
    (lambda c: c["normalisation"]["mean"].__setitem__(3, "x"), "not numeric"),
    (lambda c: c["filter"].__setitem__("band_hz", [10.0, 900.0]), "Nyquist"),
    (lambda c: c["filter"].__setitem__("notch_hz", [50.0, "x"]), "cut-off"),
    (_setter("filter", [1]), "filter must be an object"),
    (lambda c: c["bandpower_bands_hz"].append([100.0, 700.0]), "Nyquist"),
    (lambda c: c["bandpower_bands_hz"].__setitem__(0, [30.0, 20.0]), "0 < low < high"),
    (lambda c: c["bandpower_bands_hz"].__setitem__(0, [0.0, 20.0]), "0 < low < high"),
    (lambda c: c["bandpower_bands_hz"].__setitem__(0, [10.0, 10.5]), "no FFT bin"),
    (_setter("mode", "envelope"), "envelope mode takes no filter"),
    (_setter("n_channels", 1), "at least 2 channels"),
]


@pytest.mark.parametrize("change, message", WRONG_PIPELINES)
def test_pipeline_config_with_wrong_content_is_refused_by_name(change, message):
    config = pipeline_with(change)
    kind, result = outcome(lambda: FeaturePipeline.from_config(config, where=WHERE), message)
    assert kind == "error" and isinstance(result, ConfigError), message
    assert WHERE in str(result) and message in str(result), str(result)


@pytest.mark.parametrize("config", [None, [], "config", 5, [SMALL]])
def test_pipeline_config_that_is_not_an_object_is_refused(config):
    with pytest.raises(ConfigError, match="expected a JSON object"):
        FeaturePipeline.from_config(config, where=WHERE)


JSON_ODDITIES = [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 64, 10 ** 400, 0.5, -0.0, 1e308, NAN, INF, -INF, "", "x", "raw",
                 [], [0], [[]], [None], [[1.0] * 6], [[0.0] * 6], {}, {"mean": []}, [1.0, 2.0], [True, 1.0], [50.0], "float64"]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            for path in _paths(item, prefix + (key,)):
                yield path
    elif isinstance(value, list) and len(value) <= 8:
        for index, item in enumerate(value):
            for path in _paths(item, prefix + (index,)):
                yield path


def test_pipeline_config_random_mutations_never_escape():
    seed = fuzz_seed(5)
    rng = random.Random(seed)
    base = normalised_small()
    paths = [p for p in _paths(base) if p and p[0] != "feature_names"]
    refused = 0
    for trial in range(600):
        config = copy.deepcopy(base)
        changes = []
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            parent = config
            try:
                for key in path[:-1]:
                    parent = parent[key]
                value = copy.deepcopy(rng.choice(JSON_ODDITIES))
                if rng.random() < 0.15 and isinstance(parent, dict):
                    parent.pop(path[-1], None)
                    changes.append(("delete", path))
                else:
                    parent[path[-1]] = value
                    changes.append((path, value))
            except (KeyError, IndexError, TypeError):
                continue   # an earlier change replaced the container
        context = "seed {} trial {}: {}".format(seed, trial, changes)
        kind, result = outcome(lambda: FeaturePipeline.from_config(config, expected_channels=4, where=WHERE), context)
        if kind == "error":
            assert isinstance(result, ConfigError) and WHERE in str(result), context
            refused += 1
    assert refused > 400


# --- ONNX models -----------------------------------------------------------------------

def pb_value_info(name, dims):
    shape = b"".join(pb_field(1, 2, pb_field(1, 0, d)) for d in dims)
    tensor_type = pb_field(1, 0, 1) + pb_field(2, 2, shape)
    return pb_text(1, name) + pb_field(2, 2, pb_field(1, 2, tensor_type))


def pb_model(graph, graph_format="rnn-step-1"):
    metadata = pb_field(14, 2, pb_text(1, "neurohand.graph_format") + pb_text(2, graph_format)) if graph_format else b""
    return pb_field(1, 0, 8) + pb_field(8, 2, pb_text(1, "") + pb_field(2, 0, 17)) + pb_field(7, 2, graph) + metadata


def pb_node(op_type, inputs=(), outputs=(), attributes=b""):
    return (b"".join(pb_text(1, name) for name in inputs) + b"".join(pb_text(2, name) for name in outputs)
            + pb_text(4, op_type) + attributes)


def pb_int_attribute(name, value):
    return pb_field(5, 2, pb_text(1, name) + pb_field(3, 0, value) + pb_field(20, 0, 2))


def pb_read_varint(data, pos):
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def pb_top_level_field_ends(data):
    """Offsets where a top-level field of a valid message ends (protobuf has
    no end marker: a cut there leaves a shorter valid message)."""
    ends, pos = [], 0
    while pos < len(data):
        key, pos = pb_read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = pb_read_varint(data, pos)
        elif wire == 2:
            size, pos = pb_read_varint(data, pos)
            pos += size
        else:
            pos += 4 if wire == 5 else 8
        ends.append(pos)
    return ends


def test_onnx_random_truncation_is_refused_naming_the_file(tmp_path):
    """Random cuts, and every cut between top-level fields: protobuf has no end
    marker, so those leave a valid shorter message, refused because it lacks
    the metadata train/export.py always writes."""
    seed = fuzz_seed(6)
    rng = random.Random(seed)
    for name in ("golden_gru.onnx", "golden_lstm.onnx"):
        with open(os.path.join(DATA, name), "rb") as handle:
            data = handle.read()
        path = str(tmp_path / name)
        boundaries = pb_top_level_field_ends(data)[:-1]      # the last one is the whole file
        assert len(boundaries) >= 4, boundaries
        cuts = [0, 1, 2, len(data) - 1] + boundaries + [rng.randrange(len(data)) for _ in range(150)]
        for cut in cuts:
            write(path, data[:cut])
            context = "seed {}: {} cut at {}".format(seed, name, cut)
            kind, result = outcome(lambda: load_rnn_weights(path), context)
            assert kind == "error" and isinstance(result, ConfigError), context
            assert path in str(result), context


def test_onnx_random_bytes_are_refused(tmp_path):
    seed = fuzz_seed(7)
    rng = random.Random(seed)
    path = str(tmp_path / "random.onnx")
    for trial in range(400):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
        write(path, blob)
        context = "seed {} trial {}: {!r}".format(seed, trial, blob[:40])
        kind, result = outcome(lambda: read_onnx(path), context)
        if kind == "error":
            assert isinstance(result, ConfigError) and path in str(result), context
        kind, result = outcome(lambda: load_rnn_weights(path), context)
        assert kind == "error" and isinstance(result, ConfigError) and path in str(result), context


FEATURES_IO = pb_field(11, 2, pb_value_info("features", [1, 4]))

NOT_OUR_GRAPHS = [
    (b"", "no graph"),
    (pb_field(1, 0, 8), "no graph"),
    (pb_field(1, 0, 8) + pb_field(7, 2, b""), "neurohand.graph_format"),
    (pb_model(b"", graph_format="something-else"), "neurohand.graph_format"),
    (pb_model(pb_field(1, 2, pb_node("Relu", ["a"], ["b"]))), "expected GRU or LSTM"),
    (pb_model(pb_field(1, 2, pb_node("GRU")) + pb_field(1, 2, pb_node("LSTM"))), "expected GRU or LSTM"),
    (pb_model(pb_field(1, 2, pb_node("GRU", attributes=pb_int_attribute("hidden_size", 8)))), "features"),
    (pb_model(pb_field(1, 2, pb_node("GRU", attributes=pb_int_attribute("hidden_size", 8)))
              + pb_field(11, 2, pb_value_info("features", [2, 4]))), "expected (1, n_features)"),
    (pb_model(pb_field(1, 2, pb_node("GRU", ["features", "W", "R", "B"],
                                     attributes=pb_int_attribute("hidden_size", 8)
                                     + pb_int_attribute("linear_before_reset", 1))) + FEATURES_IO), "reads"),
    (pb_model(pb_field(1, 2, pb_node("GRU", ["features", "rnn.0.W", "rnn.0.R", "rnn.0.B"],
                                     attributes=pb_int_attribute("hidden_size", 8)
                                     + pb_int_attribute("linear_before_reset", 1))) + FEATURES_IO),
     "initializer 'rnn.0.W' is missing"),
    (pb_model(pb_field(1, 2, pb_node("GRU", attributes=pb_int_attribute("hidden_size", 8))) + FEATURES_IO),
     "linear_before_reset"),
    (pb_model(pb_field(1, 2, pb_node("LSTM", ["features", "rnn.0.W", "rnn.0.R", "rnn.0.B"],
                                     attributes=pb_int_attribute("hidden_size", 8)
                                     + pb_int_attribute("input_forget", 1))) + FEATURES_IO), "input_forget"),
    (pb_model(pb_field(5, 2, pb_text(8, "w") + pb_field(2, 0, 1) + pb_field(1, 0, 3) + pb_field(9, 2, b"\x00" * 8))),
     "8 bytes of data for shape [3]"),
    (pb_model(pb_field(5, 2, pb_text(8, "w") + pb_field(2, 0, 8))), "unsupported data type 8"),
    (pb_model(pb_field(5, 2, pb_text(8, "w") + pb_field(2, 0, 1) + pb_field(14, 0, 1))), "external file"),
    (pb_model(pb_field(5, 2, pb_text(8, "w") + pb_field(2, 0, 1) + pb_field(1, 0, 2 ** 62)
                       + pb_field(1, 0, 2 ** 62) + pb_field(9, 2, b"\x00" * 4))), "bytes of data for shape"),
    (pb_field(1, 0, 8) + b"\x80" * 11, "varint longer than 10 bytes"),
    (pb_field(7, 2, b"") + b"\x0b", "unsupported protobuf wire type"),
    (pb_field(7, 2, b"")[:-1] + pb_varint(2 ** 40), "runs past the end"),
]


@pytest.mark.parametrize("blob, message", NOT_OUR_GRAPHS)
def test_onnx_valid_protobuf_that_is_not_our_graph_is_refused(tmp_path, blob, message):
    path = write(tmp_path / "other.onnx", blob)
    tracemalloc.start()
    try:
        kind, result = outcome(lambda: load_rnn_weights(path), blob[:60])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kind == "error" and isinstance(result, ConfigError), blob[:60]
    assert path in str(result) and message in str(result), str(result)
    assert peak < 1 << 20, peak


# --- deploy bundles ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_bundle")
    run = root / "run"
    run.mkdir()
    shutil.copyfile(os.path.join(DATA, "golden_gru.onnx"), str(run / "model.onnx"))
    (run / "config.json").write_text(json.dumps({"pipeline": {"mode": "test"}, "model": {"cell": "gru"}}))
    make_bundle(str(run), str(root / "bundle"))
    return root / "bundle"


@pytest.fixture
def bundle(pristine_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(str(pristine_bundle), str(path))
    return path


def manifest_of(bundle_path):
    with open(str(bundle_path / "manifest.json")) as handle:
        return json.load(handle)


def rewrite_manifest(bundle_path, manifest):
    with open(str(bundle_path / "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


def _manifest_setter(*path_and_value):
    *path, value = path_and_value

    def change(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _rename_entry(old, new):
    def change(manifest):
        manifest["files"][new] = manifest["files"].pop(old)
    return change


WRONG_MANIFESTS = [
    (lambda m: m.clear(), "not a neurohand bundle manifest"),
    (_manifest_setter("format", 1), "not a neurohand bundle manifest"),
    (_manifest_setter("format", ["neurohand-bundle"]), "not a neurohand bundle manifest"),
    (lambda m: m.pop("format"), "not a neurohand bundle manifest"),
    (_manifest_setter("format_version", "1"), "format version '1'"),
    (_manifest_setter("format_version", 2), "format version 2"),
    (_manifest_setter("format_version", None), "format version None"),
    (lambda m: m.pop("format_version"), "format version None"),
    (lambda m: m.pop("files"), "must list exactly"),
    (_manifest_setter("files", ["model.onnx", "config.json", "golden.npz"]), "must list exactly"),
    (_manifest_setter("files", "model.onnx"), "must list exactly"),
    (_manifest_setter("files", None), "must list exactly"),
    (lambda m: m["files"].pop("golden.npz"), "must list exactly"),
    (_manifest_setter("files", "extra.bin", {"sha256": "0" * 64, "bytes": 1}), "must list exactly"),
    # Path traversal: only the three fixed names are ever opened.
    (_rename_entry("model.onnx", "../model.onnx"), "must list exactly"),
    (_rename_entry("model.onnx", "sub/../model.onnx"), "must list exactly"),
    (_rename_entry("config.json", "/etc/passwd"), "must list exactly"),
    (_rename_entry("config.json", "./config.json"), "must list exactly"),
    (_manifest_setter("files", "../../outside", {"sha256": "0" * 64, "bytes": 1}), "must list exactly"),
    (_manifest_setter("files", "model.onnx", "bytes", -1), "model.onnx' has"),
    (_manifest_setter("files", "model.onnx", "bytes", "6399"), "model.onnx' has"),
    (_manifest_setter("files", "model.onnx", "bytes", None), "model.onnx' has"),
    (lambda m: m["files"]["config.json"].pop("bytes"), "config.json' has"),
    (_manifest_setter("files", "golden.npz", "sha256", "0" * 64), "golden.npz' does not match its SHA-256"),
    (_manifest_setter("files", "golden.npz", "sha256", 5), "golden.npz' does not match its SHA-256"),
    (lambda m: m["files"]["golden.npz"].pop("sha256"), "golden.npz' does not match its SHA-256"),
]


@pytest.mark.parametrize("change, message", WRONG_MANIFESTS)
def test_bundle_manifest_with_wrong_types_or_names_is_refused(bundle, change, message):
    manifest = manifest_of(bundle)
    change(manifest)
    rewrite_manifest(bundle, manifest)
    kind, result = outcome(lambda: load_bundle(str(bundle)), message)
    assert kind == "error" and isinstance(result, BundleError), message
    assert message in str(result) and str(bundle) in str(result), str(result)


def test_bundle_manifest_extra_keys_are_ignored(bundle):
    # Forward compatibility: a newer producer may add informative keys.
    manifest = manifest_of(bundle)
    manifest["added_by_a_newer_version"] = {"x": [1, 2]}
    manifest.pop("produced_by")
    rewrite_manifest(bundle, manifest)
    assert load_bundle(str(bundle)).manifest["added_by_a_newer_version"] == {"x": [1, 2]}


@pytest.mark.parametrize("name", ["manifest.json", "model.onnx", "config.json", "golden.npz"])
def test_bundle_files_damaged_at_random_offsets_are_refused_by_name(pristine_bundle, tmp_path, name):
    seed = fuzz_seed(8)
    rng = random.Random(seed + len(name))
    with open(str(pristine_bundle / name), "rb") as handle:
        original = handle.read()
    for trial in range(25):
        path = tmp_path / "b{}".format(trial)
        shutil.copytree(str(pristine_bundle), str(path))
        if trial % 3 == 0:
            blob = original[:rng.randrange(len(original))]
        else:
            blob, _ = damage(rng, original, burst=(trial % 3 == 2))
        write(path / name, blob)
        context = "seed {} trial {}: {} damaged".format(seed, trial, name)
        kind, result = outcome(lambda: load_bundle(str(path)), context)
        if name == "manifest.json" and kind == "ok":
            continue  # damage inside the "produced_by" strings keeps a valid manifest
        assert kind == "error" and isinstance(result, BundleError), context
        assert name in str(result) or "manifest" in str(result), context


def test_bundle_that_is_not_a_directory_or_has_no_manifest(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        load_bundle(write(tmp_path / "file", b"x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(str(tmp_path / "empty"))


# --- hands: frame validation -----------------------------------------------------------------

def _hand_garbage(rng, avoid, bad_first):
    """Random bytes without the byte pair/bytes in ``avoid`` and not starting with ``bad_first``."""
    while True:
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
        if data[0] in bad_first or any(a in data for a in avoid):
            continue
        return data


def test_neurohand_hand_stream_finds_every_intact_frame_among_garbage():
    """Commands and telemetry among garbage (never containing the sync bytes)
    and frames with one byte damaged after the header: exactly the intact
    frames come out, in order; every damaged one counts as a bad CRC."""
    seed = fuzz_seed(9)
    rng = random.Random(seed)
    parser = nhp.StreamParser()
    receiver = virtual_hand._NeurohandReceiver({"framing_errors": 0, "bad_checksums": 0})
    stream, sent_commands, sent_telemetry, damaged = [], [], [], 0
    while len(sent_commands) < 1500:
        if rng.random() < 0.2:
            stream.append(_hand_garbage(rng, [nhp.SYNC], {nhp.SYNC[1]}))
        n = rng.randint(1, nhp.MAX_FINGERS)
        positions = [rng.randint(0, 65535) / 65535.0 for _ in range(n)]
        seq = rng.randint(0, 65535)
        telemetry = rng.random() < 0.2
        frame = nhp.encode_telemetry(seq, positions, 2, 31.5, 0.2) if telemetry else nhp.encode_command(seq, positions)
        if frame.find(nhp.SYNC, 1) >= 0:
            continue
        if rng.random() < 0.1:
            broken = bytearray(frame)
            broken[rng.randrange(7, len(frame))] ^= rng.randint(1, 255)
            if broken.find(nhp.SYNC, 1) >= 0:
                continue
            stream.append(bytes(broken))
            damaged += 1
            continue
        stream.append(frame)
        (sent_telemetry if telemetry else sent_commands).append((seq, tuple(p for p in positions)))
    data = b"".join(stream) + b"\x00" * nhp.StreamParser.MAX_FRAME
    frames, commands, position = [], [], 0
    while position < len(data):
        step = rng.randint(1, 64)
        frames.extend(parser.feed(data[position:position + step]))
        commands.extend(receiver.feed(data[position:position + step]))
        position += step
    context = "seed {}".format(seed)
    got_commands = [(f.seq, f.positions) for f in frames if isinstance(f, nhp.CommandFrame)]
    assert [s for s, _ in got_commands] == [s for s, _ in sent_commands], context
    for (_, got), (_, sent) in zip(got_commands, sent_commands):
        assert np.allclose(got, sent, atol=1.0 / 65535), context
    assert [f.seq for f in frames if isinstance(f, nhp.TelemetryFrame)] == [s for s, _ in sent_telemetry], context
    assert parser.bad_crc == damaged and parser.bad_header == 0, context
    assert [c[0] for c in commands] == [s for s, _ in sent_commands], context


@pytest.mark.parametrize("feed", ["stream_parser", "neurohand_receiver", "psyonic_stuffed", "psyonic_raw",
                                  "psyonic_replies", "unstuffer"])
def test_hand_receivers_never_raise_on_random_bytes(feed):
    seed = fuzz_seed(10)
    rng = random.Random(seed)
    counters = {"framing_errors": 0, "bad_checksums": 0, "wrong_address": 0, "bad_replies": 0, "replies": 0}
    consumer = {
        "stream_parser": lambda: nhp.StreamParser().feed,
        "neurohand_receiver": lambda: virtual_hand._NeurohandReceiver(counters).feed,
        "psyonic_stuffed": lambda: virtual_hand._PsyonicReceiver(counters, True, psyonic.DEFAULT_ADDRESS).feed,
        "psyonic_raw": lambda: virtual_hand._PsyonicReceiver(counters, False, psyonic.DEFAULT_ADDRESS).feed,
        "psyonic_replies": lambda: psyonic._ReplyParser(True, counters).feed,
        "unstuffer": lambda: ppp.Unstuffer(max_payload=64).feed,
    }[feed]()
    # Random bytes biased towards the protocols' special bytes, so framing paths run.
    special = list(nhp.SYNC) + [ppp.FLAG, ppp.ESCAPE, psyonic.DEFAULT_ADDRESS, psyonic.POSITION_COMMAND + 2, 1, 0x81]
    for trial in range(300):
        data = bytes(rng.choice(special) if rng.random() < 0.3 else rng.getrandbits(8)
                     for _ in range(rng.randint(0, 300)))
        try:
            result = consumer(data)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError("seed {} trial {} {}: {}: {} on {!r}".format(
                seed, trial, feed, type(exc).__name__, exc, data)) from exc
        if feed == "unstuffer":
            assert all(len(frame) <= 64 for frame in result)


def test_psyonic_receiver_counts_exactly_among_garbage():
    """Stuffed commands, garbage bursts (never a frame delimiter, never 15
    bytes), damaged checksums and wrong addresses: each counted where it belongs."""
    seed = fuzz_seed(11)
    rng = random.Random(seed)
    counters = {"framing_errors": 0, "bad_checksums": 0, "wrong_address": 0}
    receiver = virtual_hand._PsyonicReceiver(counters, True, psyonic.DEFAULT_ADDRESS)
    parts, sent, expected = [ppp.stuff(b"\x01\x02")], [], {"framing_errors": 1, "bad_checksums": 0, "wrong_address": 0}
    for _ in range(600):
        degrees = [rng.uniform(-140, 140) for _ in range(6)]
        choice = rng.random()
        if choice < 0.1:
            while True:
                garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
                if ppp.FLAG not in garbage and ppp.ESCAPE not in garbage and len(garbage) != psyonic.COMMAND_LENGTH:
                    break
            parts.append(garbage + bytes([ppp.FLAG]))     # an unframed burst ends at the next flag
            expected["framing_errors"] += 1
        elif choice < 0.2:
            frame = bytearray(psyonic.encode_position_command(degrees, stuffing=False))
            frame[rng.randrange(2, 14)] ^= rng.choice([1, 2, 4, 8, 16, 64])
            parts.append(ppp.stuff(bytes(frame)))
            expected["bad_checksums"] += 1
        elif choice < 0.25:
            parts.append(psyonic.encode_position_command(degrees, address=psyonic.DEFAULT_ADDRESS + 1))
            expected["wrong_address"] += 1
        else:
            frame = psyonic.encode_position_command(degrees)
            parts.append(frame)
            sent.append(psyonic.decode_position_command(ppp.Unstuffer().feed(frame)[0])[2])
    data = b"".join(parts)
    received, position = [], 0
    while position < len(data):
        step = rng.randint(1, 50)
        received.extend(receiver.feed(data[position:position + step]))
        position += step
    assert [raw for _, _, raw in received] == sent, "seed {}".format(seed)
    assert counters == expected, "seed {}".format(seed)


@pytest.mark.parametrize("frame", [b"", b"\x00", bytes(14), bytes(16), bytes(200)])
def test_hand_frame_decoders_refuse_wrong_lengths(frame):
    with pytest.raises(ProtocolError):
        nhp.decode_frame(frame)
    with pytest.raises(ProtocolError):
        psyonic.decode_reply(frame)
    with pytest.raises(ProtocolError):
        psyonic.decode_position_command(frame)


# --- runtime config -------------------------------------------------------------------------

RUNTIME_EXAMPLE = {"safe_posture": "open", "data_timeout_ms": 100, "writer_period_ms": 20, "recovery_windows": 5,
                   "smoothing": "exponential", "smoothing_tau_ms": [0, 30, 30, 30, 30], "max_slew_per_s": 10,
                   "calibration": {"lo": [0.05, 0, 0, 0, 0], "hi": 0.9}}


@pytest.mark.parametrize("key", sorted(RUNTIME_EXAMPLE) + ["stride_ms", "frame_queue_events", "record_backlog_ms",
                                                          "status_interval_s"])
def test_runtime_config_wrong_types_are_refused_naming_file_and_key(tmp_path, key):
    path = str(tmp_path / "runtime.json")
    for value in ["x", [[1]], {"a": 1}, True, -5, NAN, INF, 10 ** 400, [10 ** 400], [], ["a"], [None]]:
        settings = dict(RUNTIME_EXAMPLE)
        settings[key] = value
        with open(path, "w") as handle:
            json.dump(settings, handle)
        kind, result = outcome(lambda: load_runtime_config(path), "{}={!r}".format(key, value))
        if kind == "ok":
            continue   # e.g. a negative number where any number is allowed
        assert isinstance(result, ConfigError) and path in str(result), (key, value, result)
        assert key.split("_")[0] in str(result), (key, value, str(result))


def test_runtime_config_random_damage_is_refused_naming_the_file(tmp_path):
    seed = fuzz_seed(12)
    rng = random.Random(seed)
    text = json.dumps(RUNTIME_EXAMPLE).encode("ascii")
    path = str(tmp_path / "runtime.json")
    refused = 0
    for trial in range(300):
        if trial % 3 == 0:
            blob = text[:rng.randrange(len(text))]
        elif trial % 3 == 1:
            blob, _ = damage(rng, text, n_bytes=rng.randint(1, 4))
        else:
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        write(path, blob)
        context = "seed {} trial {}: {!r}".format(seed, trial, blob)
        kind, result = outcome(lambda: load_runtime_config(path), context)
        if kind == "error":
            assert isinstance(result, ConfigError) and path in str(result), context
            refused += 1
    assert refused > 200
