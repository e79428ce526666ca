"""The recording format (docs/recording-format.md) and its reader/writer.

Expected values come from the inputs given to the writer and from an
independent walk over the bytes written per the specification
(``walk_chunks`` below), never from the reader under test.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest

from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.firmware_bridge.recording.file_format import (
    Event, RecordingTruncatedWarning, RecordingWriter, open_recording)

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "recording-format.md")
FINGERS = ["thumb", "index", "middle", "ring", "little"]


# --- An independent reading of the specification -------------------------------

def walk_chunks(data):
    """Return [(type, start, end, payload)] of the chunks that pass every
    check of the spec's reading rule 2 (structure checks of SIGS excluded)."""
    chunks, offset = [], 12
    while offset + 20 <= len(data):
        kind, length, payload_crc, header_crc = struct.unpack_from("<4sQII", data, offset)
        end = offset + 20 + length
        if zlib.crc32(data[offset:offset + 16]) & 0xFFFFFFFF != header_crc or end > len(data):
            break
        payload = data[offset + 20:end]
        if zlib.crc32(payload) & 0xFFFFFFFF != payload_crc:
            break
        chunks.append((kind, offset, end, payload))
        offset = end
        if kind == b"DONE":
            break
    return chunks


def make_chunk(kind, payload):
    head = struct.pack("<4sQI", kind, len(payload), zlib.crc32(payload) & 0xFFFFFFFF)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF) + payload


def expected_counts(chunks, n_channels, itemsize, n_streams_width):
    """Signal samples, label rows per stream index and events in ``chunks``."""
    samples, rows, events = 0, {}, 0
    for kind, _, _, payload in chunks:
        if kind == b"SIGS":
            samples += len(payload) // (n_channels * itemsize)
        elif kind == b"LABL":
            (index,) = struct.unpack_from("<I", payload)
            rows[index] = rows.get(index, 0) + (len(payload) - 4) // (4 * n_streams_width[index])
        elif kind == b"EVNT":
            events += len(json.loads(payload.decode("utf-8")))
    return samples, rows, events


# --- Helpers ---------------------------------------------------------------------

def signal_block(start, n, n_channels, dtype):
    """Deterministic, position-dependent samples so misplaced data shows."""
    index = np.arange(start, start + n, dtype=np.int64)[:, None] * 7 + np.arange(n_channels)[None, :] * 1000
    if dtype == "int16":
        return ((index % 60001) - 30000).astype(np.int16)
    return (index.astype(np.float32) * np.float32(0.25) - np.float32(5000.0))


def write_small(path, dtype="int16", flush_interval_s=0.05):
    """A few kB file with every chunk type: 2 channels at 1 kHz, 2 label streams.

    Returns (signals, labels dict, events list) as appended.
    """
    n_channels = 2
    scale = [0.195, 0.5] if dtype == "int16" else None
    streams = {"fingers": {"rate": 100.0, "names": FINGERS[:2]}, "glove": {"rate": 50.0, "names": ["j1"]}}
    signals, fingers, glove, events = [], [], [], []
    position = 0
    with RecordingWriter(path, 1000.0, ["a", "b"], dtype, scale, {"subject": "S1"}, streams,
                         flush_interval_s=flush_interval_s) as writer:
        for step, n in enumerate([30, 70, 5, 120, 1, 64, 110]):
            block = signal_block(position, n, n_channels, dtype)
            writer.append_signals(block)
            signals.append(block)
            rows = np.full((n // 10, 2), step / 10.0, dtype=np.float32)
            writer.append_labels("fingers", rows)
            fingers.append(rows)
            if step % 2:
                g = np.full((n // 20, 1), -step, dtype=np.float32)
                writer.append_labels("glove", g)
                glove.append(g)
            writer.add_event(position, "movement" if step % 2 else "repetition", step)
            events.append(Event(position, "movement" if step % 2 else "repetition", step))
            position += n
    return (np.concatenate(signals), {"fingers": np.concatenate(fingers), "glove": np.concatenate(glove)},
            events)


def offsets_to_try(data, chunks):
    """Byte offsets for the truncation and bit-flip sweeps: every byte of the
    file header, the HEAD chunk, the last data chunk and DONE; around each
    chunk's start and the end of its header; every 7th byte elsewhere.  (A
    sweep of every byte works too, but costs seconds on a loaded machine.)"""
    offsets = set(range(0, chunks[0][2] + 1))
    offsets.update(range(chunks[-2][1], len(data) + 1))
    for _, start, _, _ in chunks:
        offsets.update(range(start - 2, start + 3))
        offsets.update(range(start + 18, start + 23))
    offsets.update(range(0, len(data) + 1, 7))
    return sorted(o for o in offsets if 0 <= o <= len(data))


def write_file(path, data):
    with open(path, "wb") as handle:
        handle.write(data)


# --- The specification itself ------------------------------------------------------

def doc_text():
    with open(DOC, encoding="utf-8") as handle:
        return handle.read()


def test_writer_reproduces_the_documented_test_vector(tmp_path):
    block = re.search(r"<!-- test-vector-begin -->\s*```text\n(.*?)```", doc_text(), re.S).group(1)
    expected = bytes(int(tok, 16) for line in block.strip().splitlines() for tok in line.split()[1:])
    assert len(expected) == 442
    path = str(tmp_path / "x.nhr")
    with RecordingWriter(path, 1000.0, ["ch0", "ch1"], "int16", [0.195, 0.5], {"subject": "S1"},
                         {"fingers": {"rate": 100.0, "names": ["thumb", "index"]}}) as writer:
        writer.append_signals(np.array([[1, -1], [2, -2], [300, -300]], dtype=np.int16))
        writer.append_labels("fingers", [[0.0, 1.0]])
        writer.add_event(1, "movement", 3)
    with open(path, "rb") as handle:
        assert handle.read() == expected
    # The table of chunk offsets in the doc agrees with the bytes.
    assert [(k, s) for k, s, _, _ in walk_chunks(expected)] == [
        (b"HEAD", 12), (b"SIGS", 262), (b"LABL", 294), (b"EVNT", 326), (b"DONE", 364)]


def test_minimal_reader_in_the_doc_reads_our_files(tmp_path):
    code = re.search(r"## A minimal reader.*?```python\n(.*?)```", doc_text(), re.S).group(1)
    namespace = {}
    exec(code, namespace)
    path = str(tmp_path / "small.nhr")
    signals, _, _ = write_small(path)
    header, chunks, complete = namespace["read_recording"](path)
    assert complete and header["signal"]["channel_names"] == ["a", "b"]
    payload = b"".join(p for k, p in chunks if k == b"SIGS")
    assert np.array_equal(np.frombuffer(payload, "<i2").reshape(-1, 2), signals)


# --- Round trips --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_round_trip_of_every_field(tmp_path, dtype):
    path = str(tmp_path / "r.nhr")
    names = ["ch{:02d}".format(i) for i in range(16)]
    scale = [0.195 + 0.001 * i for i in range(16)] if dtype == "int16" else None
    metadata = {"subject": "S1", "session": 3, "chip": {"gain": 192, "bandpass_hz": [300.0, 7500.0]},
                "notes": "pr\u00e9-op \u2014 \u00b5V", "ok": True, "none": None}
    streams = {"fingers": {"rate": 100.0, "names": FINGERS},
               "glove": {"rate": 60.0, "names": ["joint{}".format(i) for i in range(22)]},
               "unused": {"rate": 1.0, "names": ["x"]}}
    signals = signal_block(0, 12345, 16, dtype)
    fingers = np.linspace(0, 1, 123 * 5, dtype=np.float32).reshape(123, 5)
    glove = np.arange(74 * 22, dtype=np.float64).reshape(74, 22) * 0.5   # stored as float32
    with RecordingWriter(path, 10000.0, names, dtype, scale, metadata, streams) as writer:
        writer.append_signals(signals[:5000])
        writer.add_event(9000, "missing", 25)
        writer.add_event(10, "movement", 4)
        writer.append_labels("fingers", fingers)
        writer.append_labels("glove", glove)
        writer.add_event(10, "repetition", -(2 ** 63))
        writer.append_signals(signals[5000:])
        writer.add_event(12000, "movement", 2 ** 63 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = open_recording(path)
    with rec:
        assert rec.signal_rate == 10000.0 and isinstance(rec.signal_rate, float)
        assert rec.channel_names == names and rec.n_channels == 16
        assert rec.n_samples == 12345 and rec.duration_s == pytest.approx(1.2345)
        assert rec.dtype == dtype
        assert rec.scale_uv.dtype == np.float64
        assert np.array_equal(rec.scale_uv, scale if dtype == "int16" else np.ones(16))
        assert rec.metadata == metadata
        assert list(rec.label_streams) == ["fingers", "glove", "unused"]
        f = rec.label_streams["fingers"]
        assert (f.name, f.rate, f.names) == ("fingers", 100.0, FINGERS)
        assert f.data.dtype == np.float32 and np.array_equal(f.data, fingers)
        assert np.array_equal(rec.label_streams["glove"].data, glove.astype(np.float32))
        assert rec.label_streams["unused"].data.shape == (0, 1)
        # Sorted by sample; equal samples keep the order they were added in.
        assert rec.events == [Event(10, "movement", 4), Event(10, "repetition", -(2 ** 63)),
                              Event(9000, "missing", 25), Event(12000, "movement", 2 ** 63 - 1)]
        assert rec.integrity["complete"] and rec.integrity["bytes_ignored"] == 0
        raw = rec.read_signals()
        assert raw.dtype == np.dtype(dtype) and np.array_equal(raw, signals)
        uv = rec.read_signals(100, 2100, microvolts=True)
        assert uv.dtype == np.float64
        assert np.allclose(uv, signals[100:2100].astype(np.float64) * (np.array(scale) if scale else 1.0),
                           rtol=0, atol=1e-9)
        blocks = list(rec.iter_signal_blocks(997, start=3, stop=5003))
        assert [len(b) for b in blocks] == [997] * 5 + [15]
        assert np.array_equal(np.concatenate(blocks), signals[3:5003])
        assert len(rec.read_signals(12345, 12345)) == 0


def test_interleaved_appends_and_flushes(tmp_path):
    rng = np.random.RandomState(7)
    path = str(tmp_path / "i.nhr")
    signals, labels, events, position = [], [], [], 0
    with RecordingWriter(path, 2000.0, ["x", "y", "z"], "int16", [1.0, 2.0, 3.0],
                         label_streams={"fingers": {"rate": 100.0, "names": FINGERS}}) as writer:
        for step in range(300):
            action = rng.randint(4)
            if action == 0:
                n = int(rng.choice([0, 1, 3, 199, 200, 201, 1500]))
                block = rng.randint(-32768, 32767, size=(n, 3)).astype(np.int16)
                writer.append_signals(block)
                signals.append(block)
                position += n
            elif action == 1:
                rows = rng.rand(rng.randint(0, 30), 5).astype(np.float32)
                writer.append_labels("fingers", rows)
                labels.append(rows)
            elif action == 2:
                event = Event(int(rng.randint(0, position + 10)), "movement", int(rng.randint(-5, 5)))
                writer.add_event(*event)
                events.append(event)
            else:
                writer.flush()
    data = open(path, "rb").read()
    # Every signal chunk holds at most flush_interval_s (0.1 s = 200 samples).
    sizes = [len(p) // 6 for k, _, _, p in walk_chunks(data) if k == b"SIGS"]
    assert max(sizes) == 200 and min(sizes) >= 1
    with open_recording(path) as rec:
        assert np.array_equal(rec.read_signals(), np.concatenate(signals))
        assert np.array_equal(rec.label_streams["fingers"].data, np.concatenate(labels))
        assert rec.events == sorted(events, key=lambda e: e.sample)


def test_same_appends_give_byte_identical_files(tmp_path):
    first, second = str(tmp_path / "one.nhr"), str(tmp_path / "two.nhr")
    write_small(first)
    write_small(second)
    a, b = open(first, "rb").read(), open(second, "rb").read()
    assert a == b
    # fsync changes durability, not bytes.
    with RecordingWriter(str(tmp_path / "three.nhr"), 1000.0, ["a"], "float32", fsync=True) as w:
        w.append_signals(np.ones((250, 1), np.float32))
    with RecordingWriter(str(tmp_path / "four.nhr"), 1000.0, ["a"], "float32") as w:
        w.append_signals(np.ones((250, 1), np.float32))
    assert open(str(tmp_path / "three.nhr"), "rb").read() == open(str(tmp_path / "four.nhr"), "rb").read()


# --- Crash safety ---------------------------------------------------------------------

def test_truncation_anywhere_loads_all_complete_chunks(tmp_path):
    source = str(tmp_path / "full.nhr")
    signals, labels, events = write_small(source)
    data = open(source, "rb").read()
    chunks = walk_chunks(data)
    kinds = [k for k, _, _, _ in chunks]
    assert kinds[0] == b"HEAD" and kinds[-1] == b"DONE" and {b"SIGS", b"LABL", b"EVNT"} <= set(kinds)
    head_end = chunks[0][2]
    last_data_chunk = chunks[-2]
    assert last_data_chunk[0] == b"EVNT"
    cut_path = str(tmp_path / "cut.nhr")
    checked_inside_last_chunks = 0
    for cut in offsets_to_try(data, chunks):
        write_file(cut_path, data[:cut])
        if cut < head_end:
            with pytest.raises(RecordingError, match="nothing to load|not a neurohand recording"):
                open_recording(cut_path)
            continue
        complete = [c for c in chunks if c[2] <= cut]
        samples, rows, n_events = expected_counts(complete, 2, 2, {0: 2, 1: 1})
        if cut == len(data):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                rec = open_recording(cut_path)
        else:
            with pytest.warns(RecordingTruncatedWarning):
                rec = open_recording(cut_path)
        with rec:
            assert rec.n_samples == samples, cut
            assert np.array_equal(rec.read_signals(), signals[:samples])
            assert len(rec.label_streams["fingers"].data) == rows.get(0, 0)
            assert np.array_equal(rec.label_streams["glove"].data, labels["glove"][:rows.get(1, 0)])
            assert len(rec.events) == n_events
            assert rec.integrity["complete"] == (cut == len(data))
            assert rec.integrity["bytes_ignored"] == cut - complete[-1][2]
            assert rec.integrity["chunks"] == len(complete)
        if cut > last_data_chunk[1]:
            checked_inside_last_chunks += 1
    assert checked_inside_last_chunks == len(data) - last_data_chunk[1]
    # Sanity of the expectations: the complete file holds everything appended.
    assert expected_counts(chunks, 2, 2, {0: 2, 1: 1})[0] == len(signals)


def content_of(chunks, widths=(2, 1)):
    """Signals (int16, 2 channels), label rows per stream index and events held
    by ``chunks`` (as walk_chunks gives them), read per the specification."""
    signals = [np.frombuffer(p, "<i2").reshape(-1, 2) for k, _, _, p in chunks if k == b"SIGS"]
    labels = {i: [np.zeros((0, w), np.float32)] for i, w in enumerate(widths)}
    events = []
    for kind, _, _, payload in chunks:
        if kind == b"LABL":
            (index,) = struct.unpack_from("<I", payload)
            labels[index].append(np.frombuffer(payload[4:], "<f4").reshape(-1, widths[index]))
        elif kind == b"EVNT":
            events.extend(Event(*e) for e in json.loads(payload.decode("utf-8")))
    return (np.concatenate(signals) if signals else np.zeros((0, 2), np.int16),
            {i: np.concatenate(parts) for i, parts in labels.items()},
            sorted(events, key=lambda e: e.sample))


def test_single_bit_flips_lose_at_most_the_damaged_chunk(tmp_path):
    """A flipped bit costs the chunk it hits and nothing else: the chunks after
    it load.  A damaged signal chunk (framing intact) keeps its place on the
    time axis and raises when read; a hit on a chunk header's own CRC field
    costs nothing; a hit on the HEAD chunk (or the file header) refuses the file."""
    source = str(tmp_path / "full.nhr")
    write_small(source)
    data = open(source, "rb").read()
    chunks = walk_chunks(data)
    flip_path = str(tmp_path / "flip.nhr")
    for offset in offsets_to_try(data, chunks)[:-1]:
        damaged = bytearray(data)
        damaged[offset] ^= 1 << (offset % 8)
        write_file(flip_path, bytes(damaged))
        if 10 <= offset < 12:
            # The minor version: any minor is readable by design.
            with open_recording(flip_path, verify=True) as rec:
                assert rec.integrity["complete"]
            continue
        if offset < 12:
            with pytest.raises(RecordingError):
                open_recording(flip_path, verify=True)
            continue
        index = [i for i, c in enumerate(chunks) if c[1] <= offset < c[2]][0]
        kind, start, end, _ = chunks[index]
        in_header_crc = start + 16 <= offset < start + 20
        if index == 0 and not in_header_crc:
            with pytest.raises(RecordingError, match="header chunk is incomplete or damaged"):
                open_recording(flip_path, verify=True)
            continue
        unreadable = kind == b"SIGS" and offset >= start + 20
        lost = set() if in_header_crc or unreadable else {index}
        signals, labels, events = content_of([c for i, c in enumerate(chunks) if i not in lost])
        with pytest.warns(RecordingTruncatedWarning, match="damaged") as caught:
            rec = open_recording(flip_path, verify=True)
        assert len(caught) == 1 and flip_path in str(caught[0].message)
        with rec:
            assert not rec.integrity["complete"], offset
            # A lost chunk with content also makes the DONE totals disagree.
            totals_differ = bool(lost) and kind in (b"SIGS", b"LABL", b"EVNT")
            assert rec.integrity["n_problems"] == 1 + totals_differ, (offset, rec.integrity["message"])
            assert rec.n_samples == len(signals), offset
            if unreadable:
                first = sum(len(p) // 4 for k, s, _, p in chunks if k == b"SIGS" and s < start)
                last = first + (end - start - 20) // 4
                assert np.array_equal(rec.read_signals(0, first), signals[:first])
                assert np.array_equal(rec.read_signals(last), signals[last:])
                with pytest.raises(RecordingError, match="damaged"):
                    rec.read_signals(first, last)
            else:
                assert np.array_equal(rec.read_signals(), signals), offset
            assert np.array_equal(rec.label_streams["fingers"].data, labels[0]), offset
            assert np.array_equal(rec.label_streams["glove"].data, labels[1]), offset
            assert rec.events == events, offset


def test_damaged_signal_payload_is_found_when_read_without_verify(tmp_path):
    source = str(tmp_path / "full.nhr")
    signals, _, _ = write_small(source)
    data = bytearray(open(source, "rb").read())
    sigs = [c for c in walk_chunks(bytes(data)) if c[0] == b"SIGS"]
    kind, start, end, _ = sigs[2]
    first_sample = sum(len(p) // 4 for _, _, _, p in sigs[:2])
    data[start + 25] ^= 0x10
    write_file(source, bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # opening reads only the chunk header: no warning
        rec = open_recording(source)
    with rec:
        assert rec.n_samples == len(signals)
        assert np.array_equal(rec.read_signals(0, first_sample), signals[:first_sample])
        with pytest.raises(RecordingError, match="damaged"):
            rec.read_signals(first_sample, first_sample + 1)


def test_writer_killed_loses_at_most_the_flush_interval(tmp_path):
    path = str(tmp_path / "killed.nhr")
    code = (
        "import sys, time, numpy as np\n"
        "from neurohand.firmware_bridge.recording.file_format import RecordingWriter\n"
        "w = RecordingWriter(sys.argv[1], 10000.0, ['c%d' % i for i in range(16)], 'int16', [0.195] * 16,\n"
        "                    label_streams={'fingers': {'rate': 100.0, 'names': list('abcde')}})\n"
        "for i in range(57):\n"
        "    w.append_signals(np.full((64, 16), i, np.int16))\n"
        "    if i % 6 == 0:\n"
        "        w.append_labels('fingers', np.full((1, 5), i / 57.0))\n"
        "    w.add_event(64 * i, 'movement', i)\n"
        "print('appended', flush=True)\n"
        "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                             universal_newlines=True)
    try:
        assert child.stdout.readline().strip() == "appended"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with pytest.warns(RecordingTruncatedWarning, match="without an end chunk"):
        rec = open_recording(path)
    with rec:
        appended = 57 * 64
        # flush_interval_s = 0.1 s at 10 kHz: at most 1000 samples may be lost.
        assert appended - 1000 < rec.n_samples <= appended
        assert rec.n_samples == 3000
        samples = rec.read_signals()
        assert np.array_equal(samples[:, 0], np.repeat(np.arange(57), 64)[:3000])
        # Events and labels added before the last written signal chunk are on disk.
        # Chunks go out during appends 15, 31 and 46 (64 * 16 >= 1000 ...),
        # each with the events and label rows added before that append.
        assert [e.value for e in rec.events] == list(range(46))
        assert len(rec.label_streams["fingers"].data) == 8


def test_file_with_only_a_header_loads_empty_with_a_warning(tmp_path):
    path = str(tmp_path / "h.nhr")
    writer = RecordingWriter(path, 1000.0, ["a"], "float32")
    try:
        with pytest.warns(RecordingTruncatedWarning, match="without an end chunk"):
            rec = open_recording(path)
        with rec:
            assert rec.n_samples == 0 and rec.read_signals().shape == (0, 1)
            assert rec.integrity["bytes_ignored"] == 0
    finally:
        writer.close()


def test_trailing_bytes_after_end_chunk_are_reported(tmp_path):
    path = str(tmp_path / "t.nhr")
    signals, _, _ = write_small(path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 37)
    with pytest.warns(RecordingTruncatedWarning, match="37 unexpected bytes"):
        rec = open_recording(path)
    with rec:
        assert np.array_equal(rec.read_signals(), signals)
        assert not rec.integrity["complete"] and rec.integrity["bytes_ignored"] == 37


def test_unknown_chunk_types_are_skipped(tmp_path):
    path = str(tmp_path / "u.nhr")
    signals, _, _ = write_small(path)
    data = open(path, "rb").read()
    head_end = walk_chunks(data)[0][2]
    write_file(path, data[:head_end] + make_chunk(b"XTRA", b"from a newer minor version") + data[head_end:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = open_recording(path)
    with rec:
        assert rec.integrity["complete"] and np.array_equal(rec.read_signals(), signals)


@pytest.mark.parametrize("content, message", [
    (b"", "not a neurohand recording"),
    (b"\x89NHR\r", "cut off inside its 12-byte file header"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not a neurohand recording"),
    (b"\x89NHR\r\n\x1a\n\x02\x00\x00\x00", "format version 2.0"),
    (b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00" + make_chunk(b"SIGS", b""), "first chunk is SIGS"),
    (b"\x89NHR\r\n\x1a\n\x01\x00\x00\x00" + make_chunk(b"HEAD", b"{}"), "invalid header"),
])
def test_unreadable_files_raise_recording_error(tmp_path, content, message):
    path = str(tmp_path / "bad.nhr")
    write_file(path, content)
    with pytest.raises(RecordingError, match=re.escape(message)):
        open_recording(path)


def test_missing_file_and_directory_raise_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_recording(str(tmp_path / "missing.nhr"))
    with pytest.raises(UsageError, match="not a file"):
        open_recording(str(tmp_path))


# --- Lazy reading ----------------------------------------------------------------------

def read_bytes_of_this_process():
    try:
        with open("/proc/self/io") as handle:
            return int(re.search(r"rchar: (\d+)", handle.read()).group(1))
    except (OSError, AttributeError):
        return None


def test_opening_reads_headers_only_and_ranges_on_demand(tmp_path):
    path = str(tmp_path / "big.nhr")
    n_channels, rate = 16, 10000.0
    with RecordingWriter(path, rate, ["c{}".format(i) for i in range(n_channels)], "int16",
                         [0.195] * n_channels) as writer:
        for second in range(60):
            writer.append_signals(signal_block(second * 10000, 10000, n_channels, "int16"))
    size = os.path.getsize(path)
    assert size > 19000000
    read_before = read_bytes_of_this_process()
    tracemalloc.start()
    try:
        rec = open_recording(path)
        read_after_open = read_bytes_of_this_process()
        block = rec.read_signals(312345, 313345)
        _, peak_small = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tracemalloc.start()   # (no tracemalloc.reset_peak on Python 3.6)
    try:
        with rec:
            everything = rec.read_signals()
            _, peak_all = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rec.n_samples == 600000 and rec.n_signal_chunks == 600
    assert np.array_equal(block, signal_block(312345, 1000, n_channels, "int16"))
    assert np.array_equal(everything[::997], signal_block(0, 600000, n_channels, "int16")[::997])
    # Opening and reading 1000 samples stays far below the 19 MB file; reading
    # it all does not (so the measurement can see a full read).
    assert peak_small < 1000000, peak_small
    assert peak_all > size * 0.9
    if read_before is not None:
        # 600 chunk headers of 20 bytes plus the header chunk, not the payloads.
        assert read_after_open - read_before < 64 * 1024, read_after_open - read_before


# --- Validation ---------------------------------------------------------------------------

GOOD = dict(signal_rate=1000.0, channel_names=["a", "b"], dtype="int16", scale_uv=[1.0, 1.0])


@pytest.mark.parametrize("changes, message", [
    ({"signal_rate": 0}, "signal_rate must be greater than 0"),
    ({"signal_rate": float("nan")}, "signal_rate must be finite"),
    ({"channel_names": []}, "channel_names must not be empty"),
    ({"channel_names": "ab"}, "channel_names must be a list"),
    ({"channel_names": ["a", "a"]}, "must be unique"),
    ({"dtype": "int32"}, "did you mean 'int16'"),
    ({"scale_uv": [1.0]}, "one value per channel"),
    ({"scale_uv": None}, "scale_uv (microvolts per count, one per channel) is required"),
    ({"scale_uv": [1.0, -1.0]}, "greater than 0"),
    ({"dtype": "float32"}, "scale_uv must be None for float32"),
    ({"metadata": {"n": np.int64(3)}}, "metadata must be JSON-able"),
    ({"metadata": {"x": float("nan")}}, "metadata must be JSON-able"),
    ({"metadata": [1]}, "metadata must be a dict"),
    ({"label_streams": {"f": {"rate": 100.0}}}, "exactly the keys 'rate' and 'names'"),
    ({"label_streams": {"f": {"rate": -1, "names": ["x"]}}}, "rate must be greater than 0"),
    ({"label_streams": {"f": {"rate": 1, "names": []}}}, "names must not be empty"),
    ({"flush_interval_s": 0}, "flush_interval_s must be greater than 0"),
    ({"fsync": "yes"}, "fsync must be True or False"),
])
def test_writer_rejects_bad_arguments(tmp_path, changes, message):
    arguments = dict(GOOD, **changes)
    with pytest.raises(UsageError, match=re.escape(message)):
        RecordingWriter(str(tmp_path / "w.nhr"), **arguments)
    assert not os.path.exists(str(tmp_path / "w.nhr"))


def test_writer_rejects_bad_appends(tmp_path):
    path = str(tmp_path / "w.nhr")
    with RecordingWriter(path, label_streams={"fingers": {"rate": 100.0, "names": FINGERS}}, **GOOD) as w:
        with pytest.raises(UsageError, match="must be int16 .* but is float64"):
            w.append_signals(np.zeros((3, 2)))
        with pytest.raises(UsageError, match=re.escape("shape (n_samples, 2)")):
            w.append_signals(np.zeros((3, 3), np.int16))
        with pytest.raises(UsageError, match="numpy array"):
            w.append_signals([[1, 2]])
        with pytest.raises(UsageError, match="did you mean 'fingers'"):
            w.append_labels("finger", np.zeros((1, 5)))
        with pytest.raises(UsageError, match=re.escape("shape (n_rows, 5)")):
            w.append_labels("fingers", np.zeros((1, 4)))
        with pytest.raises(UsageError, match="event sample must be at least 0"):
            w.add_event(-1, "movement")
        with pytest.raises(UsageError, match="event kind"):
            w.add_event(1, "")
        with pytest.raises(UsageError, match="event value must be an integer"):
            w.add_event(1, "movement", 1.5)
    with pytest.raises(RecordingError, match="closed"):
        w.append_signals(np.zeros((1, 2), np.int16))
    with pytest.raises(UsageError, match="exists already"):
        RecordingWriter(path, overwrite=False, **GOOD)


def test_reader_rejects_bad_ranges(tmp_path):
    path = str(tmp_path / "r.nhr")
    write_small(path)
    with open_recording(path) as rec:
        with pytest.raises(UsageError, match="stop must be at most"):
            rec.read_signals(0, rec.n_samples + 1)
        with pytest.raises(UsageError, match="stop must be at least"):
            rec.read_signals(10, 5)
        with pytest.raises(UsageError, match="block_samples must be at least 1"):
            list(rec.iter_signal_blocks(0))
    with pytest.raises(RecordingError, match="closed"):
        rec.read_signals(0, 1)


def test_context_manager_closes_writer_on_exception(tmp_path):
    path = str(tmp_path / "e.nhr")
    with pytest.raises(KeyError):
        with RecordingWriter(path, **GOOD) as writer:
            writer.append_signals(np.ones((5, 2), np.int16))
            raise KeyError("boom")
    assert writer.closed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_recording(path) as rec:
            assert rec.n_samples == 5 and rec.integrity["complete"]
