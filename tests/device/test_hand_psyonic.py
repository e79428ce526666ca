"""PSYONIC Ability Hand: the vectors in docs/psyonic.md, PPP stuffing, checksums,
and the driver talking to the virtual hand through a real pseudo-terminal."""
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neurohand.firmware_bridge.shared.errors import ProtocolError
from neurohand.firmware_bridge.hands import HandError, create_hand, ppp
from neurohand.firmware_bridge.hands import psyonic
from neurohand.firmware_bridge.virtual.hand import VirtualHand

from spec_blocks import hex_bytes, read_blocks
from timing import FakeClock, wait_until

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "psyonic.md")
VECTORS = read_blocks(DOC, "hand-vector")
# One API count, as a fraction of the 100-degree full scale.
COUNT_FRACTION = 150.0 / 32767 / 100




def test_doc_has_every_kind_of_vector():
    kinds = {v["kind"] for v in VECTORS}
    assert kinds == {"psyonic-command", "psyonic-driver", "psyonic-reply", "ppp"}
    stuffed = [hex_bytes(v["hex"]) for v in VECTORS if v["kind"] == "psyonic-command" and v["stuffing"]]
    # The vectors exercise both escapes.
    assert any(b"\x7d\x5e" in s for s in stuffed) and any(b"\x7d\x5d" in s for s in stuffed)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_doc_vector(vector):
    expected = hex_bytes(vector["hex"])
    kind = vector["kind"]
    if kind == "ppp":
        payload = hex_bytes(vector["payload"])
        assert ppp.stuff(payload) == expected
        assert ppp.Unstuffer().feed(expected) == [payload]
        return
    if kind == "psyonic-command":
        built = psyonic.encode_position_command(vector["degrees"], vector["address"],
                                                vector["reply_variant"], vector["stuffing"])
        assert built == expected
        frame = ppp.Unstuffer().feed(expected)[0] if vector["stuffing"] else expected
        address, variant, counts = psyonic.decode_position_command(frame)
        assert (address, variant) == (vector["address"], vector["reply_variant"])
        np.testing.assert_allclose(np.array(counts) * 150.0 / 32767, vector["degrees"], atol=150.0 / 32767)
    elif kind == "psyonic-driver":
        driver = psyonic.PsyonicHand("unused", n_outputs=vector["n_outputs"],
                                     thumb_rotator=vector["thumb_rotator"])
        assert driver.frame_for(np.array(vector["positions"])) == expected
        frame = ppp.Unstuffer().feed(expected)[0]
    else:
        frame = ppp.Unstuffer().feed(expected)[0]
        reply = psyonic.decode_reply(frame)
        assert reply.reply_variant == vector["reply_variant"]
        assert reply.hot_cold == vector["hot_cold"]
        np.testing.assert_allclose(reply.positions_deg, vector["positions_deg"], atol=150.0 / 32767)
        np.testing.assert_allclose(reply.currents_a, vector["currents_a"], atol=1.0 / 620)
        np.testing.assert_allclose(reply.velocities_deg_s, vector["velocities_deg_s"], atol=0.03)
    # Independently of the code: a valid frame's bytes sum to 0 mod 256.
    assert sum(bytearray(frame)) % 256 == 0


def test_worked_example_field_by_field():
    # 30 degrees -> 6553 counts; the rotator's -30 -> -6553, as int16 little-endian.
    frame = psyonic.encode_position_command([30] * 5 + [-30], stuffing=False)
    assert frame[:2] == b"\x50\x12"
    assert frame[2:4] == (6553).to_bytes(2, "little") and frame[12:14] == (-6553).to_bytes(2, "little", signed=True)
    assert frame[14] == (-sum(frame[:14])) & 0xFF


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(min_size=1, max_size=80))
def test_ppp_round_trip_and_no_flag_inside(payload):
    stuffed = ppp.stuff(payload)
    assert ppp.FLAG not in bytearray(stuffed[1:-1])
    assert ppp.Unstuffer().feed(stuffed) == [payload]


@settings(max_examples=80, deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=5),
       lead=st.binary(max_size=10), cut=st.integers(0, 200))
def test_unstuffer_recovers_frames_after_garbage_and_across_chunks(payloads, lead, cut):
    stream = lead.replace(b"\x7e", b"") + b"".join(ppp.stuff(p) for p in payloads)
    unstuffer = ppp.Unstuffer()
    found = unstuffer.feed(stream[:cut]) + unstuffer.feed(stream[cut:])
    assert found == payloads


def test_unstuffer_bounds_its_buffer():
    unstuffer = ppp.Unstuffer(max_payload=16)
    assert unstuffer.feed(b"\x7e" + b"\x01" * 100 + b"\x7e" + ppp.stuff(b"ok")[1:]) == [b"ok"]
    assert unstuffer.overruns == 1


@settings(max_examples=120, deadline=None)
@given(degrees=st.lists(st.floats(-150, 150), min_size=6, max_size=6),
       variant=st.sampled_from(psyonic.REPLY_VARIANTS), address=st.integers(0, 255))
def test_command_round_trip(degrees, variant, address):
    stuffed = psyonic.encode_position_command(degrees, address, variant, True)
    (frame,) = ppp.Unstuffer().feed(stuffed)
    got_address, got_variant, counts = psyonic.decode_position_command(frame)
    assert (got_address, got_variant) == (address, variant)
    np.testing.assert_allclose(np.array(counts) / psyonic.COUNTS_PER_DEGREE, degrees,
                               atol=0.5 / psyonic.COUNTS_PER_DEGREE + 1e-9)


def test_corrupt_command_is_a_checksum_error():
    frame = bytearray(psyonic.encode_position_command([10] * 6, stuffing=False))
    frame[5] ^= 0x01
    with pytest.raises(psyonic.ChecksumError):
        psyonic.decode_position_command(bytes(frame))
    with pytest.raises(ProtocolError):
        psyonic.decode_reply(b"\x05" + bytes(10))


def test_mapping_is_explicit_and_invertible():
    decoder = [0.1, 0.2, 0.3, 0.4, 0.5]        # thumb, index, middle, ring, little
    motors = psyonic.decoder_to_motor_fractions(decoder, thumb_rotator=0.9)
    assert motors == [0.2, 0.3, 0.4, 0.5, 0.1, 0.9]  # index, middle, ring, pinky, thumb flexor, rotator
    assert psyonic.motor_fractions_to_decoder(motors) == decoder + [0.9]


@pytest.mark.parametrize("options", [{"n_outputs": 4}, {"thumb_rotator": 1.5},
                                     {"thumb_rotator": float("nan")}, {"reply_variant": 3},
                                     {"full_scale_deg": [100] * 5}, {"address": 256}])
def test_bad_driver_settings_refused(options):
    with pytest.raises(HandError):
        psyonic.PsyonicHand("loop://", **options)


# -- driver <-> virtual hand over a pseudo-terminal ---------------------------------------

@pytest.mark.parametrize("stuffing", [True, False])
@pytest.mark.parametrize("n_outputs", [5, 6])
def test_driver_positions_reach_virtual_hand(stuffing, n_outputs):
    rng = np.random.RandomState(n_outputs)
    sent = [rng.uniform(0, 1, n_outputs) for _ in range(15)] + [np.zeros(n_outputs), np.ones(n_outputs)]
    with VirtualHand("psyonic", stuffing=stuffing) as virtual:
        with create_hand("psyonic:" + virtual.slave_path, n_outputs=n_outputs,
                         thumb_rotator=0.25, stuffing=stuffing) as hand:
            assert hand.keepalive_period_s == pytest.approx(0.05)
            for positions in sent:
                hand.send(positions)
            assert virtual.wait_for(len(sent), 2.0)
            if stuffing:
                wait_until(lambda: hand.counters["replies"] >= len(sent))
                reply = hand.poll_telemetry()
                assert hand.counters["replies"] == len(sent)
                # The virtual hand reports the last command (all ones) as measured.
                rotator = -100.0 if n_outputs == 6 else -25.0
                np.testing.assert_allclose(reply.positions_deg, [100] * 5 + [rotator], atol=0.01)
        received = virtual.received()
        counters = dict(virtual.counters)
    assert counters["valid_frames"] == len(sent)
    assert counters["bad_checksums"] == counters["framing_errors"] == 0
    for positions, command in zip(sent, received):
        expected = list(positions) + ([0.25] if n_outputs == 5 else [])
        np.testing.assert_allclose(command.positions, expected, atol=COUNT_FRACTION)
        assert command.seq is None


def test_keepalive_no_timeout_at_period_then_one_timeout_when_silent():
    # The hand's watchdog runs on a clock the test moves; virtual.sync() makes sure the
    # hand has looked at the clock before each assertion.
    clock = FakeClock()
    with VirtualHand("psyonic", clock=clock) as virtual:
        limit = virtual.keepalive_timeout_s
        with create_hand("psyonic:" + virtual.slave_path) as hand:
            period = hand.keepalive_period_s
            sent = 0
            start = clock.now
            while clock.now - start < 2 * limit:     # commands every period: never a timeout
                hand.send(np.full(5, 0.4))
                sent += 1
                assert virtual.wait_for(sent, 5.0)
                clock.advance(period)
                assert virtual.sync()
                assert virtual.counters["timeouts"] == 0
            # Silence (already one period since the last command): not before the limit ...
            clock.advance(limit - period - 0.001)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 0
            # ... but just after it.
            clock.advance(0.002)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 1
            clock.advance(10 * limit)  # one silence is one timeout, however long
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 1
            # A command ends the silence; the next silence is the next timeout.
            hand.send(np.full(5, 0.4))
            assert virtual.wait_for(sent + 1, 5.0)
            clock.advance(limit + 0.001)
            assert virtual.sync()
            assert virtual.counters["timeouts"] == 2


def test_virtual_hand_counts_bad_checksum_and_wrong_address():
    with VirtualHand("psyonic") as virtual:
        bad = bytearray(psyonic.encode_position_command([10] * 6, stuffing=False))
        bad[3] ^= 0x10
        other = psyonic.encode_position_command([10] * 6, address=0x51)
        fd = os.open(virtual.slave_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, ppp.stuff(bytes(bad)) + other + psyonic.encode_position_command([20] * 6))
            assert virtual.wait_for(1, 2.0)
        finally:
            os.close(fd)
        assert virtual.counters["bad_checksums"] == 1
        assert virtual.counters["wrong_address"] == 1
        assert virtual.counters["valid_frames"] == 1


def test_non_finite_refused_before_the_wire():
    good = np.full(5, 0.5)
    with VirtualHand("psyonic") as virtual:
        with create_hand("psyonic:" + virtual.slave_path) as hand:
            for bad in ([np.nan] * 5, [0, 0, 0, 0, np.inf], [2, 0, 0, 0, 0]):
                with pytest.raises(HandError):
                    hand.send(np.array(bad, dtype=float))
            # A good frame after the refused ones: the terminal keeps order, so once it
            # arrived, anything written before it has arrived too.
            hand.send(good)
            assert virtual.wait_for(1, 5.0)
            expected_bytes = len(hand.frame_for(good))
        assert virtual.counters["bytes_received"] == expected_bytes
        assert virtual.counters["valid_frames"] == 1
        assert virtual.counters["bad_checksums"] == virtual.counters["framing_errors"] == 0
