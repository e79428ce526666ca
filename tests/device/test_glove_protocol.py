"""docs/glove-protocol.md against the code: constants, CRC, byte-exact vectors of
the neurohand glove protocol and of the CyberGlove records, and both parsers'
robustness (garbage, truncation, CRC errors, sequence gaps, any chunking)."""
import json
import os
import random
import re
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from neurohand.firmware_bridge.gloves import cyberglove as cg
from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.gloves.parser import GloveFrame, GloveParser

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "glove-protocol.md")


def read_spec():
    with open(SPEC) as handle:
        return handle.read()


def spec_vectors():
    """(fields, bytes) for every ```json + ```hex pair in the spec."""
    pairs = re.findall(r"```json\n(.*?)\n```\s*```hex\n(.*?)\n```", read_spec(), re.S)
    vectors = []
    for fields, dump in pairs:
        data = bytearray()
        for line in dump.splitlines():
            offset, _, hex_bytes = line.partition("  ")
            assert int(offset, 16) == len(data), "hex dump offsets must be contiguous"
            data += bytes.fromhex(hex_bytes)
        vectors.append((json.loads(fields), bytes(data)))
    return vectors


VECTORS = spec_vectors()
GLOVE_VECTORS = [(v, b) for v, b in VECTORS if v["frame"] in ("data", "hello")]
CYBERGLOVE_VECTORS = [(v, b) for v, b in VECTORS if v["frame"].startswith("cyberglove")]


def encode(v):
    if v["frame"] == "data":
        return gp.encode_data(v["sequence"], v["values"])
    if v["frame"] == "hello":
        return gp.encode_hello(gp.GloveHello(v["n_channels"], v["rate_hz"], v["adc_bits"], v["glove"]))
    if v["frame"] == "cyberglove-query-reply":
        return cg.encode_query_reply(v["query"].encode("ascii"), v["value"])
    return cg.encode_record(v["values"], v.get("status"), b"eg" if v.get("error") else b"")


def sketch_crc32(data):
    """The reference sketch's CRC loop, transcribed: no table, no zlib."""
    crc = 0xFFFFFFFF
    for byte in bytearray(data):
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & (-(crc & 1) & 0xFFFFFFFF))
    return crc ^ 0xFFFFFFFF


def test_spec_has_vectors_of_every_kind():
    assert {v["frame"] for v, _ in GLOVE_VECTORS} == {"data", "hello"}
    assert len(GLOVE_VECTORS) >= 6
    assert {v["frame"] for v, _ in CYBERGLOVE_VECTORS} == {"cyberglove-query-reply", "cyberglove-record"}


def test_spec_constants_equal_code():
    section = read_spec().split("### Constants", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|$", section, re.M)
    assert len(rows) >= 20
    for name, text in rows:
        value = getattr(gp, name)
        if isinstance(value, bytes):
            assert value == bytes.fromhex(text.strip("`")), name
        else:
            assert value == (float(text) if "." in text else int(text, 0)), name


@pytest.mark.parametrize("fields,frame", VECTORS, ids=[v["name"] for v, _ in VECTORS])
def test_vector_is_encoded_byte_for_byte(fields, frame):
    assert encode(fields) == frame


@pytest.mark.parametrize("fields,frame", GLOVE_VECTORS, ids=[v["name"] for v, _ in GLOVE_VECTORS])
def test_vector_parses_to_its_fields_and_the_sketch_crc_agrees(fields, frame):
    body = frame[gp.HEADER_SIZE:-gp.CRC_SIZE]
    assert sketch_crc32(frame[len(gp.SYNC):-gp.CRC_SIZE]) == gp.CRC.unpack(frame[-gp.CRC_SIZE:])[0] \
        == zlib.crc32(frame[len(gp.SYNC):-gp.CRC_SIZE])
    assert frame[4] == len(body)
    parser = GloveParser()
    events = parser.feed(frame)
    assert len(events) == 1 and parser.counters["bytes_discarded"] == 0
    if fields["frame"] == "data":
        assert events[0] == GloveFrame(fields["sequence"], tuple(fields["values"]))
    else:
        assert events[0] == gp.GloveHello(fields["n_channels"], fields["rate_hz"], fields["adc_bits"], fields["glove"])


def test_crc_check_value_of_both_implementations():
    assert zlib.crc32(b"123456789") == sketch_crc32(b"123456789") == 0xcbf43926


def test_wrap_vectors_are_consecutive():
    by_name = {v["name"]: b for v, b in GLOVE_VECTORS}
    parser = GloveParser()
    parser.feed(by_name["data-before-wrap"] + by_name["data-after-wrap"])
    assert parser.counters["frames"] == 2 and parser.counters["lost"] == 0
    assert parser.counters["sequence_restarts"] == 0


@pytest.mark.parametrize("fields,record", CYBERGLOVE_VECTORS, ids=[v["name"] for v, _ in CYBERGLOVE_VECTORS])
def test_cyberglove_vectors_parse(fields, record):
    if fields["frame"] == "cyberglove-query-reply":
        assert record[:2] == fields["query"].encode("ascii") and record[2] == fields["value"] and record[3] == 0
        return
    parser = cg.CyberGloveParser(len(fields["values"]), "status" in fields)
    (parsed,) = parser.feed(record)
    assert parsed.values == tuple(fields["values"])
    assert parsed.status == fields.get("status")
    assert parsed.error == fields.get("error")
    assert parser.counters["frames" if "error" not in fields else "glove_errors"] == 1


# --- the neurohand glove parser -----------------------------------------------
HELLO = gp.encode_hello(gp.GloveHello(5, 100, 10, "t"))


def frames(sequences, n_channels=5):
    return [gp.encode_data(s, [s % 1024 + c for c in range(n_channels)]) for s in sequences]


def test_any_chunking_gives_the_same_events():
    stream = HELLO + b"".join(frames(range(20))) + b"\x00\xc7junk\xc7" + b"".join(frames(range(20, 40)))
    whole = GloveParser()
    expected = whole.feed(stream)
    rng = random.Random(3)
    for _ in range(20):
        parser = GloveParser()
        events, at = [], 0
        while at < len(stream):
            step = rng.randint(1, 40)
            events += parser.feed(stream[at:at + step])
            at += step
        assert events == expected and parser.counters == whole.counters
    assert whole.counters["frames"] == 40 and whole.counters["resyncs"] == 1
    assert whole.counters["bytes_discarded"] == 7


def test_crc_error_gap_and_resync_are_counted_exactly():
    data = frames(range(10))
    damaged = bytearray(data[4])
    damaged[9] ^= 0x40                               # a sample byte: the CRC fails
    stream = HELLO + b"".join(data[:4]) + bytes(damaged) + b"".join(data[5:7]) + b"".join(data[8:])
    parser = GloveParser()
    events = parser.feed(stream)
    c = parser.counters
    assert [e.sequence for e in events if type(e) is GloveFrame] == [0, 1, 2, 3, 5, 6, 8, 9]
    assert c["crc_errors"] == 1 and c["lost"] == 2 and c["gaps"] == 2
    assert c["resyncs"] == 1 and c["bytes_discarded"] == len(damaged)


def test_truncated_frame_waits_then_is_discarded_on_flush():
    frame = frames([0])[0]
    parser = GloveParser()
    assert parser.feed(HELLO + frame[:-3]) == [gp.GloveHello(5, 100, 10, "t")]
    parser.flush()
    assert parser.counters["bytes_discarded"] == len(frame) - 3 and parser.counters["frames"] == 0
    # The sequence expectation survives the flush: frames lost meanwhile are counted.
    parser.feed(frames([0])[0] + frames([4])[0])
    assert parser.counters["lost"] == 3


def test_sequence_going_back_is_a_restart_not_a_loss():
    parser = GloveParser()
    parser.feed(b"".join(frames([100, 101, 0, 1])))
    assert parser.counters["sequence_restarts"] == 1 and parser.counters["lost"] == 0


def test_false_syncs_and_channel_mismatch_are_refused():
    parser = GloveParser()
    wrong_version = bytearray(frames([0])[0])
    wrong_version[2] = 2
    events = parser.feed(HELLO + bytes(wrong_version) + frames([1], n_channels=3)[0] + frames([2])[0])
    assert [e.sequence for e in events if type(e) is GloveFrame] == [2]
    assert parser.counters["bad_headers"] == 1 and parser.counters["malformed"] == 1
    # Another glove on the same port: its hello and its frames are refused.
    other = gp.encode_hello(gp.GloveHello(3, 100, 10, "other"))
    assert parser.feed(other + frames([0], n_channels=3)[0]) == []
    assert parser.counters["malformed"] == 3 and parser.hello.n_channels == 5


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_break_the_parser(data):
    parser = GloveParser()
    events = parser.feed(data)
    events += parser.feed(HELLO + frames([7])[0])
    assert events[-1] == GloveFrame(7, tuple(7 + c for c in range(5)))
    assert parser.counters["bytes_discarded"] <= len(data)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=30)), min_size=1, max_size=30))
def test_every_intact_frame_survives_garbage_between_frames(plan):
    stream, sent = HELLO, []
    for sequence, (keep, garbage) in enumerate(plan):
        garbage = garbage.replace(gp.SYNC, b"")
        stream += garbage
        if keep:
            stream += frames([sequence])[0]
            sent.append(sequence)
    parser = GloveParser()
    got = [e.sequence for e in parser.feed(stream) if type(e) is GloveFrame]
    assert got == sent
    if sent:
        assert parser.counters["lost"] == sent[-1] - sent[0] + 1 - len(sent)


# --- the CyberGlove record parser -----------------------------------------------
def test_cyberglove_records_in_any_chunking_with_framing_errors():
    good = [cg.encode_record([i % 200 + 1] * 22) for i in range(12)]
    broken = bytearray(good[3])
    broken[10] = 0                                   # a 0 inside: the record is short
    stream = b"xx" + b"".join(good[:3]) + bytes(broken) + b"".join(good[4:])
    whole = cg.CyberGloveParser(22)
    expected = whole.feed(stream)
    assert [r.values[0] for r in expected] == [i % 200 + 1 for i in range(12) if i != 3]
    assert whole.counters["framing_errors"] == 1 and whole.counters["resyncs"] == 2
    for step in (1, 5, 23):
        parser = cg.CyberGloveParser(22)
        records = []
        for at in range(0, len(stream), step):
            records += parser.feed(stream[at:at + step])
        assert records == expected and parser.counters == whole.counters


def test_cyberglove_record_with_a_bad_terminator_is_dropped():
    record = bytearray(cg.encode_record([9] * 18))
    record[-1] = 0x55
    parser = cg.CyberGloveParser(18)
    assert parser.feed(bytes(record) + cg.encode_record([8] * 18)) == [cg.CyberGloveRecord((8,) * 18, None, None)]
    assert parser.counters["framing_errors"] == 1 and parser.counters["crc_errors"] == 0


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_cyberglove_parser_survives_random_bytes(data):
    parser = cg.CyberGloveParser(22)
    parser.feed(data + b"\x00")                      # a 0 ends whatever record the garbage began
    assert parser.feed(cg.encode_record([5] * 22))[-1].values == (5,) * 22
