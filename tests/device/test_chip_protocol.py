"""docs/chip-protocol.md against the code: constants, CRC, byte-exact vectors,
and the host's command channel."""
import os
import re
import threading
import zlib

import numpy as np
import pytest

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipCommand, ChipParser, ChipReply, SampleFrame, SampleGap
from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "chip-protocol.md")
COMMANDS = {name: code for code, name in cp.COMMAND_NAMES.items()}
STATUSES = {"unknown-command": cp.STATUS_UNKNOWN_COMMAND, "bad-argument": cp.STATUS_BAD_ARGUMENT,
            "busy": cp.STATUS_BUSY}


def read_spec():
    with open(SPEC) as handle:
        return handle.read()


def spec_vectors():
    """(fields, frame bytes) for every ```json + ```hex pair in the spec."""
    import json
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


def spec_constants():
    section = read_spec().split("## Constants", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|$", section, re.M)


def encode_from_fields(v):
    if v["frame"] == "data":
        return cp.encode_data_frame(v["sequence"], v["device_time_us"], np.array(v["samples"], dtype=np.int16),
                                    v["flags"])
    command = COMMANDS[v["command"]]
    if v["frame"] == "command":
        args = b""
        if command == cp.CMD_CONFIGURE:
            args = cp.encode_configure_args(v["n_channels"], v["samples_per_frame"], v["sample_rate_hz"])
        return cp.encode_command(command, v["token"], args)
    if v["frame"] == "nak":
        return cp.encode_nak(command, v["token"], STATUSES[v["status"]])
    data = b""
    if "identity" in v:
        data = cp.encode_identity(cp.ChipIdentity(**v["identity"]))
    if "version" in v:
        data = cp.encode_version(cp.FirmwareVersion(**v["version"]))
    if "config" in v:
        data = cp.encode_config(cp.ChipConfig(**v["config"]))
    return cp.encode_ack(command, v["token"], data)


def test_spec_has_vectors_of_every_frame_type():
    kinds = {v["frame"] for v, _ in VECTORS}
    assert kinds == {"data", "command", "ack", "nak"}
    assert {v["command"] for v, _ in VECTORS if v["frame"] == "command"} == set(COMMANDS)
    assert len(VECTORS) >= 15


def test_spec_constants_equal_code():
    rows = spec_constants()
    assert len(rows) >= 25
    for name, text in rows:
        value = getattr(cp, name)
        if isinstance(value, bytes):
            assert value == bytes.fromhex(text.strip("`")), name
        else:
            assert value == int(text, 0), name


def test_crc_is_the_documented_variant():
    check = re.search(r"`123456789` is `(0x[0-9a-f]+)`", read_spec()).group(1)
    assert zlib.crc32(b"123456789") == int(check, 16)


def reference_crc32(data):
    """Bitwise CRC-32/ISO-HDLC straight from its definition, to check zlib's is the one the spec names."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("fields,frame", VECTORS, ids=[v["name"] for v, _ in VECTORS])
def test_vector_crc_covers_version_to_end_of_body(fields, frame):
    assert frame[:4] == cp.SYNC
    assert int.from_bytes(frame[-4:], "little") == reference_crc32(frame[4:-4])
    assert int.from_bytes(frame[6:8], "little") == len(frame) - 12


@pytest.mark.parametrize("fields,frame", VECTORS, ids=[v["name"] for v, _ in VECTORS])
def test_encoder_produces_vector(fields, frame):
    assert encode_from_fields(fields) == frame


@pytest.mark.parametrize("fields,frame", VECTORS, ids=[v["name"] for v, _ in VECTORS])
def test_parser_accepts_vector(fields, frame):
    parser = ChipParser()
    events = parser.feed(frame)
    assert len(events) == 1
    event = events[0]
    if fields["frame"] == "data":
        assert isinstance(event, SampleFrame)
        assert event.sequence == fields["sequence"]
        assert event.device_time_us == fields["device_time_us"]
        assert event.stream_start == bool(fields["flags"] & cp.FLAG_STREAM_START)
        assert event.samples.dtype == np.int16
        np.testing.assert_array_equal(event.samples, np.array(fields["samples"]))
        assert parser.counters["frames_good"] == 1
    elif fields["frame"] == "command":
        assert isinstance(event, ChipCommand)
        assert (event.command, event.token) == (COMMANDS[fields["command"]], fields["token"])
        if "n_channels" in fields:
            assert cp.decode_configure_args(event.args) == (
                fields["n_channels"], fields["samples_per_frame"], fields["sample_rate_hz"])
    else:
        assert isinstance(event, ChipReply)
        assert event.kind == fields["frame"]
        assert (event.command, event.token) == (COMMANDS[fields["command"]], fields["token"])
        if fields["frame"] == "nak":
            assert event.status == STATUSES[fields["status"]]
        if "identity" in fields:
            assert cp.decode_identity(event.data) == cp.ChipIdentity(**fields["identity"])
        if "version" in fields:
            assert cp.decode_version(event.data) == cp.FirmwareVersion(**fields["version"])
        if "config" in fields:
            assert cp.decode_config(event.data) == cp.ChipConfig(**fields["config"])
    assert parser.counters["bytes_discarded"] == 0 and parser.counters["crc_errors"] == 0


def test_wrap_vectors_make_no_gap_and_a_real_gap_is_reported():
    by_name = {v["name"]: frame for v, frame in VECTORS}
    parser = ChipParser()
    events = parser.feed(by_name["data-before-wrap"] + by_name["data-after-wrap"])
    assert [e.sequence for e in events] == [0xFFFFFFFF, 0]
    assert parser.counters["frames_missing"] == 0
    after_gap = cp.encode_data_frame(3, 0, np.zeros((2, 1), np.int16))
    events = parser.feed(after_gap)
    assert events[0] == SampleGap(first_missing_sequence=1, missing_frames=2, missing_samples=4)
    assert parser.counters["frames_missing"] == 2 and parser.counters["gaps"] == 1


def test_encoder_rejects_bad_samples():
    with pytest.raises(ValueError):
        cp.encode_data_frame(0, 0, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        cp.encode_data_frame(0, 0, np.zeros((2, cp.MAX_CHANNELS + 1), np.int16))
    with pytest.raises(ValueError):
        cp.encode_nak(cp.CMD_START, 1, cp.STATUS_OK)


class LoopbackChip:
    """Answers command frames written to it through a parser, as the chip would."""

    def __init__(self, channel, answer=True, nak=None):
        self.channel = channel
        self.parser = ChipParser()
        self.answer = answer
        self.nak = nak
        self.received = []

    def write(self, data):
        for command in self.parser.feed(data):
            self.received.append(command)
            if not self.answer:
                continue
            if self.nak is not None:
                reply = cp.encode_nak(command.command, command.token, self.nak)
            elif command.command == cp.CMD_GET_VERSION:
                reply = cp.encode_ack(command.command, command.token, cp.encode_version(cp.FirmwareVersion(1, 2, 3, 1)))
            else:
                reply = cp.encode_ack(command.command, command.token)
            # Reply from another thread, as the serial reader thread would.
            threading.Thread(target=self._deliver, args=(reply,)).start()

    def _deliver(self, reply):
        for event in ChipParser().feed(reply):
            self.channel.handle_reply(event)


def make_channel(**kwargs):
    holder = {}
    channel = cp.ChipCommandChannel(lambda data: holder["chip"].write(data), timeout_s=0.2, retries=1)
    holder["chip"] = LoopbackChip(channel, **kwargs)
    return channel, holder["chip"]


def test_command_channel_round_trip():
    channel, chip = make_channel()
    assert channel.firmware_version() == cp.FirmwareVersion(1, 2, 3, 1)
    channel.configure(16, 20, 10000)
    channel.start_streaming()
    assert [c.command for c in chip.received] == [cp.CMD_GET_VERSION, cp.CMD_CONFIGURE, cp.CMD_START]
    assert len({c.token for c in chip.received}) == 3
    assert cp.decode_configure_args(chip.received[1].args) == (16, 20, 10000)


def test_command_channel_raises_on_nak_and_timeout():
    channel, _ = make_channel(nak=cp.STATUS_BUSY)
    with pytest.raises(ProtocolError, match="configure.*busy"):
        channel.configure(16, 20, 10000)
    channel, chip = make_channel(answer=False)
    with pytest.raises(LinkError, match="did not answer the start command"):
        channel.start_streaming()
    assert len(chip.received) == 2           # one retry
    assert chip.received[0] == chip.received[1]


def test_command_channel_ignores_unrelated_replies():
    channel, _ = make_channel()
    assert not channel.handle_reply(ChipReply("ack", cp.CMD_START, 99, 0, b""))
    assert channel.unmatched_replies == 1
