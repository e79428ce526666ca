"""ChipParser: any chunking, resynchronisation, CRC errors, gaps, exact counters."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipParser, ChipReply, SampleFrame, SampleGap
from neurohand.firmware_bridge.virtual.chip import FaultInjector

# Samples stay within +-16383 so that an intact frame's samples can never
# contain the sync word a5 5a 3c c3 (it needs 0x5aa5 or a high byte 0xa5);
# the exact-counter model below relies on that.
SAMPLE_LIMIT = 16383


def random_samples(rng, spf, n_channels):
    return rng.randint(-SAMPLE_LIMIT, SAMPLE_LIMIT + 1, (spf, n_channels)).astype(np.int16)


def feed_in_chunks(parser, stream, cuts):
    events = []
    previous = 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        events += parser.feed(memoryview(stream)[previous:cut])
        previous = cut
    return events


def event_key(event):
    """Comparable form of an event (SampleFrame holds an ndarray)."""
    if isinstance(event, SampleFrame):
        return ("frame", event.sequence, event.device_time_us, event.samples.tobytes(), event.samples.shape)
    return event


# One action per frame the chip produced: (kind, garbage before it, corrupt position, xor value).
ACTION = st.tuples(st.sampled_from(["intact"] * 6 + ["drop", "corrupt"]),
                   st.one_of(st.just(b""), st.binary(min_size=1, max_size=40)),
                   st.integers(min_value=0, max_value=10 ** 6),
                   st.integers(min_value=1, max_value=255))


@settings(max_examples=150, deadline=None)
@given(actions=st.lists(ACTION, min_size=1, max_size=30),
       n_channels=st.integers(1, 16), spf=st.integers(1, 25),
       first_sequence=st.one_of(st.just(0), st.just(cp.SEQUENCE_MODULUS - 4), st.integers(0, 2 ** 32 - 1)),
       trailing_garbage=st.binary(max_size=20),
       cuts=st.lists(st.integers(0, 10 ** 6), max_size=12),
       seed=st.integers(0, 2 ** 31 - 1))
def test_stream_with_faults_in_any_chunking(actions, n_channels, spf, first_sequence, trailing_garbage, cuts, seed):
    rng = np.random.RandomState(seed)
    stream = bytearray()
    expected = []
    expect = dict(frames_good=0, crc_errors=0, resyncs=0, bytes_discarded=0, frames_missing=0, gaps=0)
    in_bad_run = False
    last_good = None
    pending = []                           # sequences lost since the last intact frame

    def bad_bytes(count):
        nonlocal in_bad_run
        if count and not in_bad_run:
            in_bad_run = True
            expect["resyncs"] += 1
        expect["bytes_discarded"] += count

    for k, (kind, garbage, where, xor) in enumerate(actions):
        garbage = garbage.replace(cp.SYNC, b"")
        stream += garbage
        bad_bytes(len(garbage))
        sequence = (first_sequence + k) % cp.SEQUENCE_MODULUS
        samples = random_samples(rng, spf, n_channels)
        frame = bytearray(cp.encode_data_frame(sequence, 1000 * k, samples))
        if kind == "drop":
            pending.append(sequence)
            continue
        if kind == "corrupt":
            frame[cp.HEADER_SIZE + where % (len(frame) - cp.HEADER_SIZE)] ^= xor
            stream += frame
            expect["crc_errors"] += 1
            bad_bytes(len(frame))
            pending.append(sequence)
            continue
        if last_good is not None and pending:
            expected.append(SampleGap(pending[0], len(pending), len(pending) * spf))
            expect["frames_missing"] += len(pending)
            expect["gaps"] += 1
        pending = []
        stream += frame
        in_bad_run = False
        last_good = sequence
        expect["frames_good"] += 1
        expected.append(("frame", sequence, 1000 * k, samples.tobytes(), samples.shape))
    trailing_garbage = trailing_garbage.replace(cp.SYNC, b"")
    stream += trailing_garbage
    bad_bytes(len(trailing_garbage))

    parser = ChipParser()
    events = feed_in_chunks(parser, bytes(stream), cuts)
    parser.flush()
    assert [event_key(e) for e in events] == expected
    got = dict(parser.counters)
    assert {name: got[name] for name in expect} == expect
    assert got["malformed"] == 0 and got["sequence_restarts"] == 0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), drop=st.floats(0, 0.3), corrupt=st.floats(0, 0.3),
       garbage=st.floats(0, 0.5), chunk=st.integers(1, 2000))
def test_parser_counts_what_the_fault_injector_injected(seed, drop, corrupt, garbage, chunk):
    injector = FaultInjector(drop, corrupt, garbage, garbage_max_bytes=50, seed=seed)
    rng = np.random.RandomState(seed)
    stream = bytearray()
    for k in range(60):
        frame = cp.encode_data_frame(k, 2000 * k, random_samples(rng, 20, 16),
                                     cp.FLAG_STREAM_START if k == 0 else 0)
        stream += injector.apply(frame, protected=k == 0)
    parser = ChipParser()
    for offset in range(0, len(stream), chunk):
        parser.feed(stream[offset:offset + chunk])
    parser.flush()
    injected = injector.counters
    counters = parser.counters
    assert counters["frames_good"] == 60 - injected["frames_dropped"] - injected["frames_corrupted"]
    assert counters["crc_errors"] == injected["frames_corrupted"]
    assert counters["bytes_discarded"] == injected["expected_bytes_discarded"]
    assert counters["resyncs"] == injected["expected_resyncs"]
    assert counters["frames_missing"] == injected["expected_frames_missing"]
    assert injected["expected_bytes_discarded"] >= injected["garbage_bytes"]


def default_frames(count, first=0):
    rng = np.random.RandomState(first)
    return [cp.encode_data_frame(first + k, 2000 * k, random_samples(rng, 20, 16)) for k in range(count)]


def test_one_byte_at_a_time():
    frames = default_frames(3)
    stream = b"\x00\xa5\x5a" + frames[0] + frames[1] + b"\xa5\x5a\x3c" + frames[2]
    parser = ChipParser()
    events = []
    for byte in stream:
        events += parser.feed(bytes([byte]))
    assert [e.sequence for e in events] == [0, 1, 2]
    assert parser.counters["bytes_discarded"] == 6 and parser.counters["resyncs"] == 2


def test_corrupted_length_field_does_not_swallow_following_frames():
    frames = default_frames(6)
    bad = bytearray(frames[1])
    bad[6:8] = (30000).to_bytes(2, "little")       # plausible length: parser waits for 30 kB
    parser = ChipParser()
    events = parser.feed(frames[0] + bytes(bad) + b"".join(frames[2:]))
    assert [e.sequence for e in events if isinstance(e, SampleFrame)] == [0]   # still waiting
    events = parser.feed(b"".join(default_frames(50, first=6)))
    sequences = [e.sequence for e in events if isinstance(e, SampleFrame)]
    assert sequences == list(range(2, 56))
    assert events[0] == SampleGap(1, 1, 20)
    assert parser.counters["crc_errors"] == 1
    assert parser.counters["bytes_discarded"] == len(bad)


def test_false_sync_with_impossible_header_is_skipped():
    frame = default_frames(1)[0]
    false_sync = cp.SYNC + b"\x07\x01\x10\x00"      # protocol version 7 does not exist
    parser = ChipParser()
    events = parser.feed(false_sync + frame)
    assert len(events) == 1
    assert parser.counters["bad_headers"] == 1
    assert parser.counters["bytes_discarded"] == len(false_sync)
    assert parser.counters["resyncs"] == 1


def test_good_crc_but_inconsistent_body_is_malformed():
    body = cp.DATA_HEADER.pack(0, 0, 4, 4, 0, 0) + b"\x00" * 8     # says 4x4 samples, carries 4
    parser = ChipParser()
    events = parser.feed(cp.encode_frame(cp.FRAME_DATA, body) + default_frames(1)[0])
    assert len(events) == 1 and parser.counters["malformed"] == 1


def test_backwards_sequence_is_a_restart_and_stream_start_resets():
    rng = np.random.RandomState(0)
    parser = ChipParser()
    frame = lambda seq, flags=0: cp.encode_data_frame(seq, 0, random_samples(rng, 2, 2), flags)  # noqa: E731
    events = parser.feed(frame(100) + frame(50) + frame(0, cp.FLAG_STREAM_START) + frame(1) + frame(5))
    assert [type(e).__name__ for e in events] == ["SampleFrame"] * 4 + ["SampleGap", "SampleFrame"]
    assert events[4] == SampleGap(2, 3, 6)
    assert events[2].stream_start and not events[3].stream_start
    c = parser.counters
    assert (c["sequence_restarts"], c["stream_starts"], c["frames_missing"], c["gaps"]) == (1, 1, 3, 1)


def test_replies_share_the_link_with_data():
    frames = default_frames(2)
    ack = cp.encode_ack(cp.CMD_GET_VERSION, 7, cp.encode_version(cp.FirmwareVersion(1, 0, 0, 1)))
    nak = cp.encode_nak(cp.CMD_CONFIGURE, 8, cp.STATUS_BUSY)
    parser = ChipParser()
    events = parser.feed(frames[0] + ack + nak + frames[1])
    assert events[1] == ChipReply("ack", cp.CMD_GET_VERSION, 7, 0, cp.encode_version(cp.FirmwareVersion(1, 0, 0, 1)))
    assert events[2] == ChipReply("nak", cp.CMD_CONFIGURE, 8, cp.STATUS_BUSY, b"")
    assert parser.counters["replies"] == 2 and parser.counters["frames_good"] == 2


def test_ack_with_nonzero_status_is_malformed():
    body = cp.REPLY_HEADER.pack(cp.CMD_START, 1, cp.STATUS_BUSY)
    parser = ChipParser()
    assert parser.feed(cp.encode_frame(cp.FRAME_ACK, body)) == []
    assert parser.counters["malformed"] == 1


def test_memory_is_bounded_under_endless_garbage():
    parser = ChipParser()
    garbage = bytes(range(256)) * 4096 + b"\xa5\x5a"   # ends with a partial sync word
    assert parser.feed(garbage) == []
    assert parser.buffered_bytes == 2
    assert parser.counters["bytes_discarded"] == len(garbage) - 2
    parser.flush()
    assert parser.counters["bytes_discarded"] == len(garbage) and parser.counters["resyncs"] == 1


def test_flush_keeps_the_sequence_so_a_link_outage_is_a_gap():
    frames = default_frames(10)
    parser = ChipParser()
    parser.feed(frames[0] + frames[1][:100])       # link drops in the middle of frame 1
    parser.flush()
    events = parser.feed(frames[7] + frames[8])
    assert events[0] == SampleGap(1, 6, 120)
    assert parser.counters["bytes_discarded"] == 100


@pytest.mark.parametrize("data_type", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(data_type):
    frame = default_frames(1)[0]
    events = ChipParser().feed(data_type(frame))
    assert events[0].samples.shape == (20, 16) and events[0].samples.flags.writeable


def test_bench_parser_prints_one_json_object_with_the_realtime_multiple():
    import json
    import subprocess
    import sys
    out = subprocess.check_output([sys.executable, "-m", "neurohand.deploy", "bench", "parser", "--json", "--quick"],
                                  universal_newlines=True, timeout=120)
    result = json.loads(out)
    # Shape only: speed is judged from the full benchmark, never in a unit test.
    for key in ("realtime_multiple", "bytes_per_s", "frames_per_s", "repeats"):
        assert result[key] > 0
    assert result["realtime_multiple_min"] <= result["realtime_multiple"] <= result["realtime_multiple_max"]
    assert result["stream_bytes_per_s"] == 668 * 500
    assert result["bytes_per_s"] == pytest.approx(result["realtime_multiple"] * 334000, rel=0.01)
