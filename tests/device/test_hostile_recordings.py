"""Recordings made odd or hostile on purpose: text that is not ASCII or not
UTF-8, damaged chunks with good ones after them, shapes that used to need 10-24
times the file's size in memory, failing disks and files that are no
recordings -- and what ``neurohand info`` prints for each.

Files are built byte by byte per docs/recording-format.md (``chunk`` below),
never with the reader under test; expected values come from what was put in.
"""
import errno
import json
import os
import random
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest

from neurohand.firmware_bridge.recording import file_format
from neurohand.firmware_bridge.recording.file_format import (
    Event, RecordingTruncatedWarning, RecordingWriter, open_recording)
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError

MAGIC = b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00"
UMLAUT, CJK, EMOJI = "J\u00fcrgen M\u00fcller-\u00d6z\u00e7elik", "\u674e\u96f7 \u795e\u7ecf", "\u270b\U0001F9BE"


def chunk(kind, payload):
    head = struct.pack("<4sQI", kind, len(payload), zlib.crc32(payload) & 0xFFFFFFFF)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


def head_json(channels=("a", "b"), streams=(("fingers", ("thumb", "index")),), metadata=None):
    return {"format": "neurohand-recording",
            "signal": {"rate": 1000.0, "dtype": "int16", "channel_names": list(channels),
                       "scale_uv": [0.5] * len(channels)},
            "label_streams": [{"name": n, "rate": 100.0, "names": list(c)} for n, c in streams],
            "metadata": {"subject": "S1"} if metadata is None else metadata}


def utf8_json(value):
    """JSON as another writer may emit it: raw UTF-8, not \\u escapes."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def head(value=None):
    payload = value if isinstance(value, bytes) else utf8_json(value or head_json())
    return MAGIC + chunk(b"HEAD", payload)


def sigs(values):
    return chunk(b"SIGS", np.asarray(values, "<i2").tobytes())


def labl(index, rows):
    return chunk(b"LABL", struct.pack("<I", index) + np.asarray(rows, "<f4").tobytes())


def evnt(events):
    return chunk(b"EVNT", utf8_json(events))


def done(n_samples, n_events, label_samples):
    return chunk(b"DONE", utf8_json({"n_samples": n_samples, "n_events": n_events,
                                     "label_samples": label_samples}))


def write(tmp_path, data, name="r.nhr"):
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def open_quietly(path, **kwargs):
    """Open expecting no warning at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return open_recording(path, **kwargs)


def open_warned(path, match, **kwargs):
    """Open expecting exactly one RecordingTruncatedWarning naming the file and ``match``."""
    with pytest.warns(RecordingTruncatedWarning, match=match) as caught:
        recording = open_recording(path, **kwargs)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert path in message and "kept" in message, message
    return recording


def run_info(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "info"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, LANG="C.UTF-8", PYTHONIOENCODING="utf-8"))


# --- 1. UTF-8 everywhere ---------------------------------------------------------------

def test_writer_round_trips_umlauts_cjk_and_emoji_everywhere(tmp_path):
    path = str(tmp_path / "u.nhr")
    names = ["K\u00e4nal-1", "\u901a\u9053-2", "\U0001F9E0-3"]
    with RecordingWriter(path, 1000.0, names, "int16", [1.0] * 3,
                         {"subject": UMLAUT, "site": CJK, "note": EMOJI, "\u00fcber": ["\u00e9", {"\u6df1": 1}]},
                         {"H\u00e4nd": {"rate": 100.0, "names": ["D\u00e4umling", "\u98df\u6307", "\u270b"]}}) as w:
        w.append_signals(np.ones((10, 3), np.int16))
        w.append_labels("H\u00e4nd", np.zeros((2, 3)))
        w.add_event(3, "Bewegung \u00fc", 1)
        w.add_event(4, "\u52a8\u4f5c", 2)
        w.add_event(5, EMOJI, 3)
    raw = open(path, "rb").read()
    (length,) = struct.unpack_from("<Q", raw, 16)
    raw[32:32 + length].decode("ascii")   # canonical JSON: non-ASCII as \u escapes (ASCII is UTF-8)
    with open_quietly(path) as rec:
        assert rec.integrity["complete"]
        assert rec.channel_names == names
        assert rec.metadata == {"subject": UMLAUT, "site": CJK, "note": EMOJI, "\u00fcber": ["\u00e9", {"\u6df1": 1}]}
        assert list(rec.label_streams) == ["H\u00e4nd"]
        assert rec.label_streams["H\u00e4nd"].names == ["D\u00e4umling", "\u98df\u6307", "\u270b"]
        assert rec.events == [Event(3, "Bewegung \u00fc", 1), Event(4, "\u52a8\u4f5c", 2), Event(5, EMOJI, 3)]


@pytest.mark.parametrize("text", [UMLAUT, CJK, EMOJI, "caf\u00e9 \u2014 \u00bd \u00b5V"])
def test_raw_utf8_from_another_writer_reads_in_header_events_and_names(tmp_path, text):
    # Was: the reader decoded HEAD and EVNT as ASCII: the header "invalid", the file unreadable.
    header = head_json(channels=[text, "b"], streams=[(text + "!", [text, "x"])], metadata={"subject": text})
    data = (head(header) + sigs([[1, 2], [3, 4]]) + labl(0, [[0.5, 1.0]])
            + evnt([[0, text, 7], [1, "movement", 2]]) + sigs([[5, 6]]) + evnt([[2, "rest", 0]])
            + done(3, 3, {text + "!": 1}))
    assert any(b > 127 for b in data)
    with open_quietly(write(tmp_path, data)) as rec:
        assert rec.integrity["complete"] and rec.metadata == {"subject": text}
        assert rec.channel_names == [text, "b"] and rec.label_streams[text + "!"].names == [text, "x"]
        assert rec.events == [Event(0, text, 7), Event(1, "movement", 2), Event(2, "rest", 0)]
        assert rec.read_signals().tolist() == [[1, 2], [3, 4], [5, 6]]


def test_non_ascii_event_kind_no_longer_hides_the_chunks_after_it(tmp_path):
    # Was: the scan stopped at the EVNT chunk with a warning; 2 of 3 signal chunks were lost.
    data = (head() + sigs([[1, 1]]) + evnt([[0, "Schlie\u00dfen", 1]]) + sigs([[2, 2]]) + labl(0, [[1, 2]])
            + sigs([[3, 3]]) + done(3, 1, {"fingers": 1}))
    with open_quietly(write(tmp_path, data)) as rec:
        assert rec.n_samples == 3 and rec.events == [Event(0, "Schlie\u00dfen", 1)]
        assert rec.label_streams["fingers"].data.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("where", ["metadata", "label name", "stream name", "channel name", "metadata key"])
@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"])
def test_invalid_utf8_in_the_header_reads_as_replacement_characters(tmp_path, where, bad):
    """Bytes that are not UTF-8 (stray, cut, surrogate, overlong, 5-byte) in a
    header with a good CRC: the writer used another encoding.  Refusing the
    file would lose all of it; the bytes read as U+FFFD with a warning."""
    marker = "@@"
    header = head_json(
        channels=[marker if where == "channel name" else "a", "b"],
        streams=[(marker if where == "stream name" else "fingers",
                  (marker if where == "label name" else "thumb", "x"))],
        metadata={marker if where == "metadata key" else "subject": marker if where == "metadata" else "S1"})
    payload = utf8_json(header).replace(marker.encode(), b"J" + bad + b"rgen")
    data = head(payload) + sigs([[1, 2]]) + labl(0, [[3, 4]]) + evnt([[0, "m", 1]])
    with open_warned(write(tmp_path, data), "header holds bytes that are not UTF-8") as rec:
        texts = ([rec.metadata.get("subject")] + list(rec.metadata) + rec.channel_names + list(rec.label_streams)
                 + [n for s in rec.label_streams.values() for n in s.names])
        replaced = [t for t in texts if t and t.startswith("J\ufffd") and t.endswith("rgen")]
        assert len(replaced) == 1, texts
        (stream,) = rec.label_streams.values()
        assert rec.n_samples == 1 and len(rec.events) == 1 and len(stream.data) == 1


@pytest.mark.parametrize("bad", [b"\xff", b"\xe2\x82", b"\xed\xb0\x80", b"\x80\x80"])
def test_invalid_utf8_in_an_event_keeps_it_and_every_chunk_after_it(tmp_path, bad):
    payload = b'[[5,"bew' + bad + b'gung",1],[6,"rest",0]]'
    data = (head() + sigs([[1, 1]]) + chunk(b"EVNT", payload) + sigs([[2, 2]]) + labl(0, [[1, 2]])
            + evnt([[7, "\u00fcber", 2]]) + done(2, 3, {"fingers": 1}))
    with open_warned(write(tmp_path, data), "EVNT chunk at byte .* not UTF-8") as rec:
        assert [(e.sample, e.value) for e in rec.events] == [(5, 1), (6, 0), (7, 2)]
        assert rec.events[0].kind.startswith("bew\ufffd") and rec.events[0].kind.endswith("gung")
        assert rec.events[2].kind == "\u00fcber"
        assert rec.n_samples == 2 and len(rec.label_streams["fingers"].data) == 1


def test_lone_surrogate_escapes_read_as_replacement_characters(tmp_path):
    # json.dumps escapes a lone surrogate as \ud800: valid JSON, but no text;
    # downstream UTF-8 encoders (bundles, reports) would crash on it.
    header = json.dumps(head_json(metadata={"file": "x\udcff.csv"})).encode("ascii")
    data = head(header) + chunk(b"EVNT", json.dumps([[0, "a\ud800", 1]]).encode("ascii")) + sigs([[1, 2]])
    with pytest.warns(RecordingTruncatedWarning, match="lone surrogates") as caught:
        rec = open_recording(write(tmp_path, data))
    assert "header" in str(caught[0].message) and "EVNT" in str(caught[0].message)
    with rec:
        assert rec.metadata == {"file": "x\ufffd.csv"} and rec.events == [Event(0, "a\ufffd", 1)]
        assert rec.n_samples == 1


@pytest.mark.parametrize("change", [
    lambda a: a.update(metadata={"file": "x\udcff.csv"}),
    lambda a: a.update(metadata={"nested": [{"k\ud800": 1}]}),
    lambda a: a.update(channel_names=["a\udc80", "b"]),
    lambda a: a.update(label_streams={"s\ud800": {"rate": 1.0, "names": ["x"]}}),
    lambda a: a.update(label_streams={"s": {"rate": 1.0, "names": ["x\udfff"]}}),
])
def test_writer_refuses_text_that_utf8_cannot_hold(tmp_path, change):
    args = dict(path=str(tmp_path / "w.nhr"), signal_rate=1000.0, channel_names=["a", "b"], dtype="float32")
    change(args)
    with pytest.raises(UsageError, match="lone surrogate"):
        RecordingWriter(**args)
    assert not os.path.exists(args["path"])


def test_writer_refuses_event_kinds_utf8_cannot_hold_or_too_long(tmp_path):
    with RecordingWriter(str(tmp_path / "w.nhr"), 1000.0, ["a"], "float32") as writer:
        with pytest.raises(UsageError, match="lone surrogate"):
            writer.add_event(0, "move\udcff")
        with pytest.raises(UsageError, match="at most 1024 characters"):
            writer.add_event(0, "k" * 1025)
        writer.add_event(0, "\U0001F9BE" * 1024)
    with open_quietly(str(tmp_path / "w.nhr")) as rec:
        assert rec.events == [Event(0, "\U0001F9BE" * 1024, 0)]


# --- 1. A damaged chunk never hides the good chunks after it -----------------------------

def _flip(data, offset):
    damaged = bytearray(data)
    damaged[offset] ^= 0x04
    return bytes(damaged)


# Each: (name, the bad part between good chunks, warning text, whether its content is lost)
BAD_PARTS = [
    ("EVNT payload CRC", lambda: _flip(evnt([[9, "lost", 9]]), 25), "damaged EVNT chunk", True),
    ("EVNT not JSON", lambda: chunk(b"EVNT", b"[[9, \"lost\", 9]"), "not a JSON array", True),
    ("EVNT not an array", lambda: chunk(b"EVNT", b'{"a": 1}'), "not a JSON array", True),
    ("EVNT deep", lambda: chunk(b"EVNT", b"[" * 5000 + b"]" * 5000), "EVNT", True),
    ("LABL payload CRC", lambda: _flip(labl(0, [[9, 9]]), 27), "damaged LABL chunk", True),
    ("LABL stream index", lambda: labl(5, [[9, 9]]), "names stream 5 of 1", True),
    ("LABL rows", lambda: chunk(b"LABL", struct.pack("<I", 0) + b"\0" * 6), "not a whole number of rows", True),
    ("LABL short", lambda: chunk(b"LABL", b"\0\0"), "too short", True),
    ("SIGS samples", lambda: chunk(b"SIGS", b"\0" * 6), "not a whole number of 4-byte samples", True),
    ("second HEAD", lambda: chunk(b"HEAD", b"{}"), "second HEAD", True),
    ("unknown type CRC", lambda: _flip(chunk(b"XTRA", b"0123456789"), 22), "unknown type XTRA", True),
    ("header type", lambda: _flip(evnt([[9, "lost", 9]]), 1), "damaged chunk header", True),
    ("header length", lambda: _flip(evnt([[9, "lost", 9]]), 5), "damaged chunk header", True),
    ("header length huge", lambda: _flip(evnt([[9, "lost", 9]]), 11), "damaged chunk header", True),
    ("header payload CRC", lambda: _flip(evnt([[9, "lost", 9]]), 13), "damaged chunk header", True),
    ("header CRC only", lambda: _flip(evnt([[9, "kept", 9]]), 17), "check out: kept", False),
    ("zeros", lambda: b"\0" * 100, "damaged chunk header", True),
    ("garbage", lambda: random.Random(5).getrandbits(8 * (3 * 65536 + 7)).to_bytes(3 * 65536 + 7, "little"),
     "skipped", True),
]


@pytest.mark.parametrize("name, bad, message, lost", BAD_PARTS, ids=[b[0] for b in BAD_PARTS])
def test_good_signal_label_and_event_chunks_after_a_bad_one_still_load(tmp_path, name, bad, message, lost):
    before = sigs([[1, 1], [2, 2]]) + labl(0, [[0.1, 0.2]]) + evnt([[0, "before", 1]])
    after = (sigs([[3, 3]]) + labl(0, [[0.3, 0.4], [0.5, 0.6]]) + evnt([[2, "after", 2]])
             + sigs([[4, 4]]) + evnt([[3, "\u00e4fter", 3]]))
    n_events = 3 + (not lost)
    data = head() + before + bad() + after + done(4, n_events, {"fingers": 3})
    path = write(tmp_path, data)
    with open_warned(path, message) as rec:
        assert not rec.integrity["complete"]
        assert rec.read_signals().tolist() == [[1, 1], [2, 2], [3, 3], [4, 4]]
        np.testing.assert_allclose(rec.label_streams["fingers"].data, [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], rtol=1e-6)
        kinds = [e.kind for e in rec.events]
        assert kinds == (["before", "after", "\u00e4fter"] if lost else ["before", "after", "\u00e4fter", "kept"])
        problem = rec.integrity["problems"][0]
        assert problem["offset"] == len(head() + before) and problem["sample"] == 2
        # What was skipped is counted, and nothing of the good chunks.
        assert rec.integrity["bytes_ignored"] == (len(bad()) if lost else 0)
    # The CLI shows it as one warning line and exit 0.
    if name in ("EVNT payload CRC", "header type", "garbage"):
        result = run_info(path, "--json")
        assert result.returncode == 0 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("neurohand info: warning: recording "), lines
        assert json.loads(result.stdout)["n_samples"] == 4


def test_damaged_signal_chunk_keeps_its_place_on_the_time_axis(tmp_path):
    data = (head() + sigs([[1, 1], [2, 2]]) + _flip(sigs([[8, 8], [9, 9], [10, 10]]), 24)
            + sigs([[3, 3]]) + evnt([[5, "m", 1]]) + done(6, 1, {"fingers": 0}))
    path = write(tmp_path, data)
    with open_warned(path, r"damaged SIGS chunk at byte \d+ .*samples 2\.\.5 cannot be read", verify=True) as rec:
        assert rec.n_samples == 6 and rec.read_signals(5).tolist() == [[3, 3]]
        assert rec.read_signals(0, 2).tolist() == [[1, 1], [2, 2]] and len(rec.events) == 1
        with pytest.raises(RecordingError, match="damaged"):
            rec.read_signals(4, 5)
    with open_quietly(path) as rec:       # without verify: found when read
        assert rec.integrity["complete"] and rec.read_signals(5).tolist() == [[3, 3]]


def test_many_damaged_chunks_give_one_warning_and_a_bounded_list(tmp_path):
    bad = b"".join(_flip(evnt([[i, "x", 0]]), 25) for i in range(300))
    data = head() + bad + sigs([[1, 1]]) + evnt([[0, "ok", 1]])
    with open_warned(write(tmp_path, data), "and 298 more problems") as rec:
        assert rec.integrity["n_problems"] == 301       # 300 chunks and the missing DONE
        assert len(rec.integrity["problems"]) == 100
        assert rec.n_samples == 1 and rec.events == [Event(0, "ok", 1)]


def test_a_damaged_done_or_header_is_reported_not_hidden(tmp_path):
    good = head() + sigs([[1, 1]])
    path = write(tmp_path, good + _flip(done(1, 0, {"fingers": 0}), 25))
    with open_warned(path, "damaged DONE chunk") as rec:
        assert rec.n_samples == 1 and not rec.integrity["complete"]
    path = write(tmp_path, _flip(good, 40))
    with pytest.raises(RecordingError, match="header chunk is incomplete or damaged.*nothing to load"):
        open_recording(path)


# --- 2. Memory stays bounded by the file's size ---------------------------------------------

def _events(n, make):
    return json.dumps([make(i) for i in range(n)], separators=(",", ":")).encode()


MEMORY_SHAPES = {
    # Before: 14x (one huge chunk), 20x (minimal events), 11x (one-row label chunks), 5.6x (1-sample signal chunks).
    "one huge EVNT chunk": lambda n: head() + chunk(b"EVNT", _events(n, lambda i: [i, "movement", i % 13])),
    "minimal events": lambda n: head() + chunk(b"EVNT", _events(2 * n, lambda i: [0, "a", 0])),
    "unsorted events": lambda n: head() + chunk(b"EVNT", _events(n, lambda i: [(i * 7919) % n, "rest", 0])),
    "a new kind per event": lambda n: head() + chunk(b"EVNT", _events(n, lambda i: [i, "k{}".format(i), 0])),
    "one-row LABL chunks": lambda n: head(head_json(streams=[("f", ["x"])])) + b"".join(
        chunk(b"LABL", struct.pack("<If", 0, i)) for i in range(n // 2)),
    "one-event EVNT chunks": lambda n: head() + b"".join(evnt([[i, "m", 1]]) for i in range(n // 2)),
    "one-sample SIGS chunks": lambda n: head(head_json(channels=["a"])) + b"".join(
        chunk(b"SIGS", struct.pack("<h", i % 100)) for i in range(n // 2)),
}


@pytest.mark.parametrize("shape", sorted(MEMORY_SHAPES))
def test_opening_odd_shapes_needs_less_than_three_times_the_file_size(tmp_path, shape):
    n = 15000
    data = MEMORY_SHAPES[shape](n)
    path = write(tmp_path, data)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordingTruncatedWarning)   # no DONE: fine here
            rec = open_recording(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with rec:
        assert rec.n_samples + len(rec.events) + sum(len(s.data) for s in rec.label_streams.values()) >= n // 2
        if shape == "unsorted events":
            samples = [e.sample for e in rec.events]
            assert samples == sorted(samples)
    assert peak < 3 * len(data), "{}: peak {} bytes for a {}-byte file ({:.1f}x)".format(
        shape, peak, len(data), peak / len(data))


def test_huge_event_chunk_is_parsed_piece_by_piece(tmp_path):
    # One 1.3 MB EVNT chunk: the reader must not hold its text and all its events as Python objects.
    data = head() + chunk(b"EVNT", _events(60000, lambda i: [i, "repetition", i]))
    path = write(tmp_path, data)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecordingTruncatedWarning)
            rec = open_recording(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with rec:
        assert len(rec.events) == 60000 and rec.events[-1] == Event(59999, "repetition", 59999)
        assert rec.events.kind_counts() == {"repetition": 60000}
    assert peak < len(data), peak


# --- 4. I/O errors and files that are no recordings --------------------------------------------

class FailingFile(object):
    """A file object that raises OSError(EIO) on a read reaching ``fail_at`` -- a failing SD card."""

    def __init__(self, handle, fail_at):
        self.handle, self.fail_at, self.position = handle, fail_at, 0

    def seek(self, offset, whence=0):
        self.position = self.handle.seek(offset, whence)
        return self.position

    def read(self, size=-1):
        if size != 0 and self.position <= self.fail_at < self.position + (size if size > 0 else 1 << 62):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = self.handle.read(size)
        self.position += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)


def good_file(tmp_path):
    data = (head() + sigs([[1, 1], [2, 2]]) + labl(0, [[1, 2]]) + evnt([[0, "m", 1]]) + sigs([[3, 3]])
            + done(3, 1, {"fingers": 1}))
    return write(tmp_path, data), data


@pytest.mark.parametrize("verify", [False, True])
def test_an_io_error_anywhere_is_one_recording_error_naming_file_and_byte(tmp_path, monkeypatch, verify):
    path, data = good_file(tmp_path)
    real_open = file_format._open_file
    failed_reading = 0
    for fail_at in range(0, len(data)):
        monkeypatch.setattr(file_format, "_open_file", lambda p, at=fail_at: FailingFile(real_open(p), at))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                rec = open_recording(path, verify=verify)
        except RecordingError as exc:
            message = str(exc)
            assert path in message and "Input/output error" in message, message
            offset = int(message.split(" at byte ")[1].split(":")[0])
            assert offset <= fail_at, (fail_at, message)
            failed_reading += 1
            continue
        # Opening read headers only: the signal payload fails when read.
        with rec:
            with pytest.raises(RecordingError, match=r"cannot read recording .* at byte \d+: Input/output error"):
                rec.read_signals()
    assert failed_reading > len(data) * 0.4


def test_an_io_error_from_the_kernel_is_one_line(tmp_path):
    # /proc/self/mem at offset 0 (unmapped) fails with EIO, as a dying SD card does.
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("no /proc")
    result = run_info("/proc/self/mem")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurohand info: error: ") and "/proc/self/mem" in lines[0]


def _fifo(tmp_path):
    path = str(tmp_path / "fifo.nhr")
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d), "is not a file"),
    (_fifo, "is not a file"),
    (lambda d: "/dev/zero", "is not a file"),
    (lambda d: "/proc/self/status", "is not a neurohand recording"),
    (lambda d: write(d, b"", "empty.nhr"), "is not a neurohand recording: it is empty"),
    (lambda d: write(d, bytes(random.Random(3).getrandbits(8) for _ in range(5000)), "random.nhr"),
     "is not a neurohand recording"),
    (lambda d: write(d, MAGIC + b"\0" * 5000, "zeros.nhr"), "nothing to load"),
])
def test_files_that_are_no_recordings_give_one_line(tmp_path, make, message):
    path = make(tmp_path)
    if path.startswith("/proc") and not os.path.exists(path):
        pytest.skip("no /proc")
    with pytest.raises((RecordingError, UsageError), match=message):
        open_recording(path)
    result = run_info(path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurohand info: error: ") and message in lines[0], lines


# --- 3. and 5. What `neurohand info` prints ---------------------------------------------------

def test_info_json_of_a_header_holding_nan_prints_null_and_one_warning(tmp_path):
    # Python's JSON reader accepts NaN and Infinity, which JSON has not; was: a ValueError traceback.
    payload = (b'{"format":"neurohand-recording","label_streams":[],"signal":{"channel_names":["a"],'
               b'"dtype":"int16","rate":1000.0,"scale_uv":[1.0]},"metadata":{"gain":NaN,"cal":[1,Infinity,'
               b'-Infinity],"deep":{"x":{"y":NaN}},"big":' + b"9" * 60 + b',"ok":"\xc3\xbc"}}')
    path = write(tmp_path, head(payload) + sigs([[1]]) + done(1, 0, {}))
    result = run_info(path, "--json")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    summary = json.loads(result.stdout)
    assert summary["metadata"] == {"gain": None, "cal": [1, None, None], "deep": {"x": {"y": None}},
                                   "big": int("9" * 60), "ok": "\u00fc"}
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neurohand info: warning: recording "), lines
    for where in ("metadata.gain", "metadata.cal[1]", "metadata.cal[2]", "metadata.deep.x.y", "printed as null"):
        assert where in lines[0]
    text = run_info(path)       # the text summary shows them as they are
    assert text.returncode == 0 and '"gain": NaN' in text.stdout and "\u00fc" in text.stdout


def test_info_warning_for_a_cut_recording_says_what_was_kept(tmp_path):
    path, data = good_file(tmp_path)
    with open(path, "wb") as handle:
        handle.write(data[:-30])
    result = run_info(path)
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("neurohand info: warning: recording '{}': incomplete DONE chunk".format(path))
    assert "kept 5 chunks: 3 signal samples (0.003 s), 1 label rows, 1 events" in line
    assert "ignored" in line


def test_event_list_behaves_as_a_read_only_list():
    events = file_format.EventList.from_events([(5, "b", 1), (2, "a", -2 ** 63), (5, "a", 2 ** 63 - 1), (0, "b", 0)])
    assert list(events) == [Event(0, "b", 0), Event(2, "a", -2 ** 63), Event(5, "b", 1), Event(5, "a", 2 ** 63 - 1)]
    assert events[-1] == Event(5, "a", 2 ** 63 - 1) and events[1:3] == [Event(2, "a", -2 ** 63), Event(5, "b", 1)]
    assert events == list(events) and events != list(events)[:3] and len(events) == 4
    assert events.kind_counts() == {"b": 2, "a": 2}
    assert events.samples.tolist() == [0, 2, 5, 5] and events.samples.dtype == np.int64
    assert events.values.tolist() == [0, -2 ** 63, 1, 2 ** 63 - 1]
    events.samples[0] = 1        # a copy: the events do not change
    assert events[0] == Event(0, "b", 0)
    with pytest.raises(IndexError):
        events[4]


@pytest.mark.parametrize("text", [
    '[[0,"a",1],[12345,"movement \\u00fc \\"q\\"",-9223372036854775808]]',
    ' [ [ 1 , "x" , 2 ] ,\n\t[3,"\u00e4\U0001F9BE",4] ] ',
    '[]', ' [ ] ', '[1234567,-1.5e3,true,null,{"k":[1,2]},"s"]',
])
def test_event_array_parsed_in_pieces_split_anywhere(text):
    """The EVNT payload arrives piece by piece: a split inside a number, a
    string, an escape or a multi-byte character must not change the result."""
    from neurohand.firmware_bridge.recording.events import iter_json_array, utf8_text
    expected = json.loads(text)
    data = text.encode("utf-8")
    for cut in range(len(data) + 1):
        for cut2 in (cut, min(len(data), cut + 3)):
            pieces = [data[:cut], data[cut:cut2], data[cut2:]]
            assert list(iter_json_array(utf8_text(pieces), max_item_chars=64)) == expected, (cut, cut2)


@pytest.mark.parametrize("text", ['', '[', '[1,', '[1,]', '[1 2]', '{"a":1}', '[1]]', '[1] x', '["' + 'a' * 300 + '"]'])
def test_event_array_that_is_not_one_json_array_is_a_value_error(text):
    from neurohand.firmware_bridge.recording.events import iter_json_array, utf8_text
    data = text.encode("utf-8")
    for cut in range(len(data) + 1):
        with pytest.raises(ValueError):
            list(iter_json_array(utf8_text([data[:cut], data[cut:]]), max_item_chars=64))


def test_writer_refuses_a_header_larger_than_readers_accept(tmp_path):
    with pytest.raises(UsageError, match="more than the 16777216 a header may hold"):
        RecordingWriter(str(tmp_path / "w.nhr"), 1000.0, ["a"], "float32", metadata={"notes": "x" * (16 << 20)})


def test_crafted_headers_pointing_far_ahead_cost_linear_reading(tmp_path, monkeypatch):
    """Damaged headers are tried as "only their CRC field is hit" by checking
    their payload CRC; 2000 crafted ones all pointing 2 MB ahead at one intact
    header would make that 4 GB of reading.  The reader stays within a few
    times the file's size."""
    prefix = head() + sigs([[1, 1]])
    fakes_at = len(prefix)
    target = fakes_at + 2000 * 20 + (2 << 20)
    fakes = b"".join(struct.pack("<4sQII", b"EVNT", target - (fakes_at + 20 * i) - 20, 0, 0) for i in range(2000))
    data = prefix + fakes + b"\0" * (target - fakes_at - len(fakes)) + sigs([[2, 2]]) + evnt([[0, "m", 1]])
    path = write(tmp_path, data)
    real_open = file_format._open_file
    counters = []

    class Counting(FailingFile):
        def read(self, size=-1):
            data = FailingFile.read(self, size)
            counters.append(len(data))
            return data

    monkeypatch.setattr(file_format, "_open_file", lambda p: Counting(real_open(p), -1))
    with open_warned(path, "damaged chunk header") as rec:
        assert rec.read_signals().tolist() == [[1, 1], [2, 2]] and len(rec.events) == 1
    assert sum(counters) < 6 * len(data), sum(counters)
