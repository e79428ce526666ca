"""neurohand's own hand protocol (version 1), for custom and 3D-printed hands.

The specification, with byte-exact test vectors, is docs/hand-protocol.md;
tests/device/test_hand_neurohand.py parses the vectors out of that file and
checks them against this module, so the two cannot drift apart.

Every frame, little-endian::

    offset 0  sync      2 bytes  A5 5A
           2  version   uint8    1
           3  type      uint8    0x01 command (host -> hand), 0x81 telemetry (hand -> host)
           4  seq       uint16   command: sequence number; telemetry: seq acknowledged
           6  count     uint8    number of fingers N, 1..16
           7  [telemetry only: flags uint8, temperature int16 (0.1 degC),
                                current uint16 (mA)]
              positions N x uint16   0..65535 for 0..1 (telemetry: measured)
              crc       uint16   CRC-16/CCITT-FALSE (binascii.crc_hqx(data, 0xFFFF)) over
                                 every byte from version up to the crc, stored little-endian
"""
import binascii
import collections
import math
import struct
import threading
import time

from neurohand.firmware_bridge.shared.errors import ProtocolError
from neurohand.firmware_bridge.hands.base import HandError, SerialHandDriver

SYNC = b"\xA5\x5A"
VERSION = 1
TYPE_COMMAND = 0x01
TYPE_TELEMETRY = 0x81
MAX_FINGERS = 16
POSITION_FULL_SCALE = 65535
CRC_INIT = 0xFFFF
TEMPERATURE_UNKNOWN = -32768        # int16 value meaning "no sensor"
CURRENT_UNKNOWN = 0xFFFF            # uint16 value meaning "no sensor"

# Telemetry status flags.
FLAG_WATCHDOG_EXPIRED = 0x01        # no valid command within the keep-alive timeout since last telemetry
FLAG_BAD_FRAMES = 0x02              # frames with a bad CRC or header arrived since last telemetry
FLAG_OVER_TEMPERATURE = 0x04
FLAG_MOTOR_FAULT = 0x08
FLAG_COUNT_MISMATCH = 0x10          # the command's finger count differs from the hand's

DEFAULT_BAUDRATE = 115200
KEEPALIVE_PERIOD_S = 0.05
WATCHDOG_TIMEOUT_S = 0.3

_HEADER = struct.Struct("<2sBBHB")           # sync, version, type, seq, count
_TELEMETRY_EXTRA = struct.Struct("<BhH")     # flags, temperature_decidegC, current_mA
_CRC = struct.Struct("<H")
_EXTRA_LENGTH = {TYPE_COMMAND: 0, TYPE_TELEMETRY: _TELEMETRY_EXTRA.size}

CommandFrame = collections.namedtuple("CommandFrame", "seq positions")
CommandFrame.__doc__ = "A decoded command: seq (int), positions (tuple of float 0..1)."
TelemetryFrame = collections.namedtuple(
    "TelemetryFrame", "seq flags temperature_c current_a positions t_monotonic")
TelemetryFrame.__doc__ = """A decoded telemetry/acknowledgement frame: seq acknowledged, status
flags, temperature (degC or None), current (A or None), measured positions (0..1),
t_monotonic (receive time, or None)."""


def crc16(data):
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR)."""
    return binascii.crc_hqx(bytes(data), CRC_INIT)


def frame_length(frame_type, count):
    """Total bytes of a frame of ``frame_type`` carrying ``count`` fingers."""
    return _HEADER.size + _EXTRA_LENGTH[frame_type] + 2 * count + _CRC.size


def quantise(positions):
    """0..1 floats -> uint16 list: floor(p * 65535 + 0.5), halves rounded up."""
    if hasattr(positions, "tolist"):
        positions = positions.tolist()      # Python floats at once, not one numpy scalar each
    floor = math.floor
    return [int(floor(float(p) * POSITION_FULL_SCALE + 0.5)) for p in positions]


def _check_count(count):
    if not 1 <= count <= MAX_FINGERS:
        raise HandError("a neurohand frame carries 1..{} fingers, got {}".format(MAX_FINGERS, count))


def _finish(body):
    return body + _CRC.pack(crc16(body[len(SYNC):]))


# The positions' struct for each finger count, made once (a command is encoded every stride).
_POSITIONS = [struct.Struct("<{}H".format(count)) for count in range(MAX_FINGERS + 1)]


def encode_command(seq, positions):
    """Command frame for ``positions`` (sequence of 1..16 floats 0..1) and ``seq`` (wrapped to 16 bits)."""
    _check_count(len(positions))
    raw = quantise(positions)
    body = _HEADER.pack(SYNC, VERSION, TYPE_COMMAND, seq & 0xFFFF, len(raw)) + _POSITIONS[len(raw)].pack(*raw)
    return _finish(body)


def encode_telemetry(seq, positions, flags=0, temperature_c=None, current_a=None):
    """Telemetry frame acknowledging ``seq`` (what a hand, or the virtual hand, sends)."""
    _check_count(len(positions))
    raw = quantise(positions)
    temperature = TEMPERATURE_UNKNOWN if temperature_c is None else int(round(temperature_c * 10))
    current = CURRENT_UNKNOWN if current_a is None else int(round(current_a * 1000))
    body = (_HEADER.pack(SYNC, VERSION, TYPE_TELEMETRY, seq & 0xFFFF, len(raw))
            + _TELEMETRY_EXTRA.pack(flags, temperature, current)
            + struct.pack("<{}H".format(len(raw)), *raw))
    return _finish(body)


def decode_frame(frame, t_monotonic=None):
    """Decode one complete frame (bytes) into CommandFrame or TelemetryFrame.

    Raises ProtocolError naming what is wrong (sync, version, type, count,
    length, CRC).
    """
    frame = bytes(frame)
    if len(frame) < _HEADER.size + _CRC.size:
        raise ProtocolError("neurohand frame too short: {} bytes".format(len(frame)))
    sync, version, frame_type, seq, count = _HEADER.unpack(frame[:_HEADER.size])
    if sync != SYNC:
        raise ProtocolError("neurohand frame does not start with sync A5 5A")
    if version != VERSION:
        raise ProtocolError("neurohand protocol version {} is not supported (expected {})".format(
            version, VERSION))
    if frame_type not in _EXTRA_LENGTH:
        raise ProtocolError("unknown neurohand frame type 0x{:02X}".format(frame_type))
    if not 1 <= count <= MAX_FINGERS:
        raise ProtocolError("neurohand finger count {} outside 1..{}".format(count, MAX_FINGERS))
    expected = frame_length(frame_type, count)
    if len(frame) != expected:
        raise ProtocolError("neurohand frame of type 0x{:02X} with {} fingers must be {} bytes, got {}".format(
            frame_type, count, expected, len(frame)))
    (crc,) = _CRC.unpack(frame[-2:])
    if crc != crc16(frame[len(SYNC):-2]):
        raise ProtocolError("neurohand CRC mismatch: frame says 0x{:04X}, computed 0x{:04X}".format(
            crc, crc16(frame[len(SYNC):-2])))
    offset = _HEADER.size + _EXTRA_LENGTH[frame_type]
    raw = struct.unpack("<{}H".format(count), frame[offset:offset + 2 * count])
    positions = tuple(r / float(POSITION_FULL_SCALE) for r in raw)
    if frame_type == TYPE_COMMAND:
        return CommandFrame(seq, positions)
    flags, temperature, current = _TELEMETRY_EXTRA.unpack(frame[_HEADER.size:offset])
    return TelemetryFrame(seq, flags,
                          None if temperature == TEMPERATURE_UNKNOWN else temperature / 10.0,
                          None if current == CURRENT_UNKNOWN else current / 1000.0,
                          positions, t_monotonic)


class StreamParser(object):
    """Finds frames in a byte stream: feed bytes, get decoded frames.

    Resynchronises on the sync bytes after noise or a corrupt frame (a bad
    frame costs only its first byte, so a good frame hidden behind garbage is
    still found).  The buffer never holds more than one maximal frame plus the
    bytes just fed.

    Counters: ``bad_crc``, ``bad_header`` (version/type/count impossible),
    ``discarded_bytes`` (bytes skipped while hunting for sync).
    """

    MAX_FRAME = frame_length(TYPE_TELEMETRY, MAX_FINGERS)

    def __init__(self):
        self._buffer = bytearray()
        self.bad_crc = 0
        self.bad_header = 0
        self.discarded_bytes = 0

    def feed(self, data, t_monotonic=None):
        """Consume ``data``; return the list of CommandFrame/TelemetryFrame found."""
        self._buffer.extend(data)
        frames = []
        buffer = self._buffer
        while True:
            start = buffer.find(SYNC)
            if start < 0:
                # Keep a trailing first sync byte: its partner may come in the next chunk.
                keep = 1 if buffer[-1:] == SYNC[:1] else 0
                self.discarded_bytes += len(buffer) - keep
                del buffer[:len(buffer) - keep]
                break
            if start:
                self.discarded_bytes += start
                del buffer[:start]
            if len(buffer) < _HEADER.size:
                break
            _, version, frame_type, _, count = _HEADER.unpack(bytes(buffer[:_HEADER.size]))
            if version != VERSION or frame_type not in _EXTRA_LENGTH or not 1 <= count <= MAX_FINGERS:
                self.bad_header += 1
                del buffer[:1]
                continue
            length = frame_length(frame_type, count)
            if len(buffer) < length:
                break
            try:
                frames.append(decode_frame(buffer[:length], t_monotonic))
            except ProtocolError:
                self.bad_crc += 1
                del buffer[:1]
                continue
            del buffer[:length]
        return frames


class _TelemetryCollector(object):
    """Reader-thread side of the driver: keeps the newest telemetry frame."""

    def __init__(self, counters):
        self._parser = StreamParser()
        self._counters = counters
        self._lock = threading.Lock()
        self._latest = None

    def feed(self, data):
        for frame in self._parser.feed(data, time.monotonic()):
            if isinstance(frame, TelemetryFrame):
                self._counters["acks"] += 1
                with self._lock:
                    self._latest = frame
        self._counters["bad_frames"] = self._parser.bad_crc + self._parser.bad_header

    def take_latest(self):
        with self._lock:
            latest, self._latest = self._latest, None
        return latest


class NeurohandHand(SerialHandDriver):
    """Driver for hands speaking the neurohand protocol (``neurohand:PORT``).

    The frame carries exactly ``n_outputs`` positions in decoder order.
    ``poll_telemetry`` returns the newest TelemetryFrame since the last call.
    Counters add ``acks``, ``bad_frames`` and ``last_seq`` (seq of the last frame sent).
    """

    keepalive_period_s = KEEPALIVE_PERIOD_S
    label = "neurohand-protocol hand"

    def __init__(self, port, n_outputs=5, baudrate=DEFAULT_BAUDRATE, write_timeout_s=0.1):
        _check_count(n_outputs)
        super(NeurohandHand, self).__init__(port, n_outputs, baudrate, write_timeout_s)
        self.counters.update({"acks": 0, "bad_frames": 0, "last_seq": None})
        self._seq = 0

    def _make_parser(self):
        return _TelemetryCollector(self.counters)

    def frame_for(self, positions):
        """The bytes ``send`` writes next for already-validated ``positions``."""
        return encode_command(self._seq, positions)

    def _frame_sent(self):
        self.counters["last_seq"] = self._seq
        self._seq = (self._seq + 1) & 0xFFFF
