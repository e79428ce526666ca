"""neurohand hand protocol: the spec's constants and vectors, round trips, and the
driver talking to the virtual hand through a real pseudo-terminal."""
import json
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError
from neurohand.firmware_bridge.hands import HandError, create_hand
from neurohand.firmware_bridge.hands import neurohand_protocol as nhp
from neurohand.firmware_bridge.virtual.hand import VirtualHand

from spec_blocks import hex_bytes, read_blocks
from timing import FakeClock, wait_until

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "hand-protocol.md")
VECTORS = read_blocks(SPEC, "hand-vector")
QUANTUM = 1.0 / 65535




def reference_crc_ccitt_false(data):
    """Bit-by-bit CRC-16/CCITT-FALSE, written from the textbook definition."""
    crc = 0xFFFF
    for byte in bytearray(data):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def test_spec_constants_equal_code():
    constants = read_blocks(SPEC, "hand-constants")
    assert len(constants) == 1
    for name, value in constants[0].items():
        code_value = getattr(nhp, name)
        if name == "SYNC":
            assert code_value == hex_bytes(value)
        else:
            assert code_value == value, name


def test_crc_is_ccitt_false():
    assert nhp.crc16(b"123456789") == 0x29B1  # the catalogued check value
    for data in (b"", b"\x00", b"\x01\x01\x01\x00\x05", bytes(range(256))):
        assert nhp.crc16(data) == reference_crc_ccitt_false(data)


def test_spec_has_vectors_of_both_kinds():
    kinds = [v["kind"] for v in VECTORS]
    assert kinds.count("neurohand-command") >= 2 and kinds.count("neurohand-telemetry") >= 2


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_spec_vector_encodes_and_decodes(vector):
    expected = hex_bytes(vector["hex"])
    if vector["kind"] == "neurohand-command":
        assert nhp.encode_command(vector["seq"], vector["positions"]) == expected
        frame = nhp.decode_frame(expected)
        assert isinstance(frame, nhp.CommandFrame)
    else:
        built = nhp.encode_telemetry(vector["seq"], vector["positions"], vector["flags"],
                                     vector["temperature_c"], vector["current_a"])
        assert built == expected
        frame = nhp.decode_frame(expected)
        assert isinstance(frame, nhp.TelemetryFrame)
        assert frame.flags == vector["flags"]
        for field in ("temperature_c", "current_a"):
            if vector[field] is None:
                assert getattr(frame, field) is None
            else:
                assert getattr(frame, field) == pytest.approx(vector[field], abs=1e-3)
    assert frame.seq == vector["seq"]
    np.testing.assert_allclose(frame.positions, vector["positions"], atol=QUANTUM / 2 + 1e-12)
    assert len(expected) == nhp.frame_length(expected[3], len(vector["positions"]))
    # The CRC field is the reference CRC of version..payload, little-endian.
    assert expected[-2:] == reference_crc_ccitt_false(expected[2:-2]).to_bytes(2, "little")


def test_decode_names_what_is_wrong():
    good = nhp.encode_command(7, [0.5] * 5)
    with pytest.raises(ProtocolError, match="CRC"):
        nhp.decode_frame(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ProtocolError, match="version"):
        nhp.decode_frame(good[:2] + b"\x02" + good[3:])
    with pytest.raises(ProtocolError, match="must be"):
        nhp.decode_frame(good[:-1])
    with pytest.raises(HandError):
        nhp.encode_command(0, [0.5] * 17)


positions_lists = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=nhp.MAX_FINGERS)


@settings(max_examples=100, deadline=None)
@given(seq=st.integers(0, 0xFFFF), positions=positions_lists)
def test_command_round_trip(seq, positions):
    frame = nhp.decode_frame(nhp.encode_command(seq, positions))
    assert frame.seq == seq
    np.testing.assert_allclose(frame.positions, positions, atol=QUANTUM / 2 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(seq=st.integers(0, 0xFFFF), positions=positions_lists, flags=st.integers(0, 255),
       temperature=st.one_of(st.none(), st.floats(-40, 150)), current=st.one_of(st.none(), st.floats(0, 60)))
def test_telemetry_round_trip(seq, positions, flags, temperature, current):
    frame = nhp.decode_frame(nhp.encode_telemetry(seq, positions, flags, temperature, current))
    assert (frame.seq, frame.flags) == (seq, flags)
    assert (frame.temperature_c is None) == (temperature is None)
    assert (frame.current_a is None) == (current is None)
    if temperature is not None:
        assert abs(frame.temperature_c - temperature) <= 0.05 + 1e-9
    np.testing.assert_allclose(frame.positions, positions, atol=QUANTUM / 2 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(0, 0xFFFF), positions_lists), min_size=1, max_size=6),
       noise=st.lists(st.binary(max_size=12), min_size=7, max_size=7),
       cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_stream_parser_finds_every_frame_between_noise_and_across_chunks(frames, noise, cuts):
    # Noise never contains the sync pattern, so every frame must come out intact.
    noise = [n.replace(b"\xA5", b"\x00") for n in noise]
    stream = noise[0]
    for (seq, positions), junk in zip(frames, noise[1:]):
        stream += nhp.encode_command(seq, positions) + junk
    parser = nhp.StreamParser()
    found, offset = [], 0
    for cut in cuts + [len(stream)]:
        found.extend(parser.feed(stream[offset:offset + cut]))
        offset += cut
    assert [f.seq for f in found] == [seq for seq, _ in frames]


def test_stream_parser_skips_corrupt_frame_and_keeps_the_next():
    bad = bytearray(nhp.encode_command(1, [0.1] * 5))
    bad[8] ^= 0xFF
    parser = nhp.StreamParser()
    found = parser.feed(bytes(bad) + nhp.encode_command(2, [0.2] * 5))
    assert [f.seq for f in found] == [2]
    assert parser.bad_crc == 1


# -- driver <-> virtual hand over a pseudo-terminal ---------------------------------------

@pytest.fixture
def virtual_hand(tmp_path):
    hand = VirtualHand("neurohand", log_path=str(tmp_path / "hand.jsonl")).start()
    yield hand
    hand.stop()


def send_for(hand, virtual, clock, positions, duration_s):
    """Send ``positions`` every keep-alive period of ``clock`` (the virtual hand's) for
    ``duration_s``, checking after each period that the hand saw no timeout."""
    start = clock.now
    while clock.now - start < duration_s:
        hand.send(positions)
        assert virtual.wait_for(hand.counters["frames_sent"], 5.0)
        clock.advance(hand.keepalive_period_s)
        assert virtual.sync()
        assert virtual.counters["timeouts"] == 0


def test_driver_positions_reach_virtual_hand_with_seq_and_acks(virtual_hand):
    rng = np.random.RandomState(0)
    sent = [rng.uniform(0, 1, 5) for _ in range(20)] + [np.zeros(5), np.ones(5)]
    with create_hand("neurohand:" + virtual_hand.slave_path, n_outputs=5) as hand:
        assert hand.keepalive_period_s is not None and hand.keepalive_period_s < 0.3
        for positions in sent:
            hand.send(positions)
        assert virtual_hand.wait_for(len(sent), 5.0)
        wait_until(lambda: hand.counters["acks"] >= len(sent))
        telemetry = hand.poll_telemetry()
        assert hand.counters["frames_sent"] == len(sent)
        assert hand.counters["acks"] == len(sent)
    received = virtual_hand.received()
    assert [r.seq for r in received] == list(range(len(sent)))
    for positions, command in zip(sent, received):
        np.testing.assert_allclose(command.positions, positions, atol=QUANTUM / 2 + 1e-12)
    assert telemetry.seq == len(sent) - 1
    np.testing.assert_allclose(telemetry.positions, np.ones(5), atol=QUANTUM)
    assert hand.poll_telemetry() is None  # nothing new since the last poll
    assert virtual_hand.counters["bad_checksums"] == 0


def test_keepalive_no_timeout_at_period_then_timeout_when_silent(tmp_path):
    # The hand's watchdog runs on a clock the test moves; virtual.sync() makes sure the
    # hand has looked at the clock before each assertion.
    clock = FakeClock()
    log = str(tmp_path / "hand.jsonl")
    virtual = VirtualHand("neurohand", log_path=log, clock=clock).start()
    try:
        limit = virtual.keepalive_timeout_s
        with create_hand("neurohand:" + virtual.slave_path) as hand:
            period = hand.keepalive_period_s
            send_for(hand, virtual, clock, np.full(5, 0.3), 2 * limit)
            sent = hand.counters["frames_sent"]
            # The newest ack carries no watchdog flag; taking it leaves the keep-alive's ack to come.
            assert wait_until(lambda: hand.counters["acks"] >= sent)
            assert not hand.poll_telemetry().flags & nhp.FLAG_WATCHDOG_EXPIRED
            # Silence (already one period since the last command): not before the 300 ms watchdog ...
            clock.advance(limit - period - 0.001)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 0
            # ... but just after it, and once however long the silence.
            clock.advance(0.002)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 1
            clock.advance(10 * limit)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 1
            hand.keepalive()  # resends the last positions: the hand resumes
            assert wait_until(lambda: hand.counters["acks"] >= sent + 1)
            telemetry = hand.poll_telemetry()
            assert telemetry.seq == sent and telemetry.flags & nhp.FLAG_WATCHDOG_EXPIRED
            np.testing.assert_allclose(virtual.received()[-1].positions, np.full(5, 0.3), atol=QUANTUM)
    finally:
        virtual.stop()
    events = [json.loads(line) for line in open(log)]
    timeouts = [e for e in events if e["event"] == "keepalive_timeout"]
    assert len(timeouts) == 1
    assert timeouts[0]["since_last_command_s"] == pytest.approx(limit + 0.001, abs=1e-6)


def test_keepalive_watchdog_on_the_real_clock(tmp_path):
    """The default clock: a silence is noticed (generous deadline) and was longer than the limit."""
    log = str(tmp_path / "hand.jsonl")
    virtual = VirtualHand("neurohand", log_path=log).start()
    try:
        with create_hand("neurohand:" + virtual.slave_path) as hand:
            hand.send(np.full(5, 0.3))
            assert virtual.wait_for(1, 5.0)
            assert wait_until(lambda: virtual.counters["timeouts"] == 1, timeout_s=5.0)
            command_s = virtual.received()[0].t_monotonic
    finally:
        virtual.stop()
    events = [json.loads(line) for line in open(log)]
    (timeout,) = [e for e in events if e["event"] == "keepalive_timeout"]
    assert timeout["since_last_command_s"] > virtual.keepalive_timeout_s
    assert timeout["t_monotonic"] - command_s == pytest.approx(timeout["since_last_command_s"])


@pytest.mark.parametrize("bad", [
    [np.nan, 0, 0, 0, 0], [0, np.inf, 0, 0, 0], [0, 0, -np.inf, 0, 0],
    [1.0001, 0, 0, 0, 0], [0, 0, 0, 0, -1e-9], [0.5] * 4, [0.5] * 6, ["a", 0, 0, 0, 0]])
def test_unsafe_positions_never_reach_the_hand(virtual_hand, bad):
    with create_hand("neurohand:" + virtual_hand.slave_path) as hand:
        with pytest.raises(HandError):
            hand.send(np.array(bad, dtype=object) if "a" in bad else np.array(bad))
        hand.send(np.full(5, 0.5))  # a good frame after the refused one
        assert virtual_hand.wait_for(1, 2.0)
        assert hand.counters["refused"] == 1
    assert len(virtual_hand.received()) == 1
    np.testing.assert_allclose(virtual_hand.received()[0].positions, np.full(5, 0.5), atol=QUANTUM)


def test_virtual_hand_counts_bad_crc_and_ignores_the_frame(virtual_hand):
    bad = bytearray(nhp.encode_command(5, [0.5] * 5))
    bad[-1] ^= 0x55
    fd = os.open(virtual_hand.slave_path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, bytes(bad) + nhp.encode_command(6, [0.25] * 5))
        assert virtual_hand.wait_for(1, 2.0)
    finally:
        os.close(fd)
    assert [c.seq for c in virtual_hand.received()] == [6]
    assert virtual_hand.counters["bad_checksums"] == 1


def test_vanished_port_raises_link_error_with_port_name():
    virtual = VirtualHand("neurohand").start()
    hand = create_hand("neurohand:" + virtual.slave_path)
    try:
        hand.send(np.zeros(5))
        virtual.stop()
        with pytest.raises(LinkError, match=virtual.slave_path):
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:  # the reader thread or the next write notices
                hand.send(np.zeros(5))
                time.sleep(0.02)
    finally:
        hand.close()


def test_second_driver_on_the_same_port_is_refused(virtual_hand):
    with create_hand("neurohand:" + virtual_hand.slave_path):
        with pytest.raises(LinkError, match=virtual_hand.slave_path):
            create_hand("neurohand:" + virtual_hand.slave_path)


def test_missing_port_raises_link_error(tmp_path):
    path = str(tmp_path / "no-such-port")
    with pytest.raises(LinkError, match="no-such-port"):
        create_hand("neurohand:" + path)
