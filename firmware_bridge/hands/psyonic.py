"""PSYONIC Ability Hand over UART: position commands and their replies.

What is implemented, and where each fact comes from, is in docs/psyonic.md;
its test vectors are checked by tests/device/test_hand_psyonic.py.

Command frame (before optional PPP stuffing, see :mod:`.ppp`), 15 bytes::

    address  command  6 x int16 little-endian position  checksum
    0x50     0x10+v   index middle ring pinky thumb_flexor thumb_rotator
                      (counts = degrees * 32767 / 150)
    checksum = two's complement of the 8-bit sum of all preceding bytes

``v`` (0, 1, 2) selects what the hand replies with.  Variant 2, our default,
is the shortest reply (39 bytes): a header byte whose low nibble is ``v``,
(position, current) int16 pairs for the six motors, six int16 velocities, a
signed hot/cold status byte and the checksum.

Finger mapping (decoder order thumb, index, middle, ring, little[, thumb
rotation]) onto the hand's six motors::

    hand index        <- decoder index
    hand middle       <- decoder middle
    hand ring         <- decoder ring
    hand pinky        <- decoder little
    hand thumb flexor <- decoder thumb
    hand thumb rotator<- decoder output 6 if the decoder has 6 outputs,
                         else the fixed ``thumb_rotator`` setting (0..1)

A fraction 0..1 becomes degrees by multiplying with ``full_scale_deg``
(default 100 degrees for the flexors and -100 degrees for the rotator,
whose positive direction is negative in the API).
"""
import collections
import math
import struct
import threading
import time

import numpy as np

from neurohand.firmware_bridge.shared.errors import ProtocolError
from neurohand.firmware_bridge.hands import ppp
from neurohand.firmware_bridge.hands.base import HandError, SerialHandDriver, check_fraction

DEFAULT_ADDRESS = 0x50
DEFAULT_BAUDRATE = 460800
POSITION_COMMAND = 0x10             # + reply variant 0..2
REPLY_VARIANTS = (0, 1, 2)
DEFAULT_REPLY_VARIANT = 2
COUNTS_PER_DEGREE = 32767.0 / 150.0
COUNT_LIMIT = 32767
CURRENT_COUNTS_PER_AMP = 620.606079
VELOCITY_DEG_PER_S_PER_COUNT = 3000.0 / 32767.0 / 4.0
#: Hand motor order in every frame.
MOTORS = ("index", "middle", "ring", "pinky", "thumb_flexor", "thumb_rotator")
#: Degrees at fraction 1.0, per motor (the rotator's travel is negative in the API).
DEFAULT_FULL_SCALE_DEG = (100.0, 100.0, 100.0, 100.0, 100.0, -100.0)
DEFAULT_THUMB_ROTATOR = 0.5
#: The hand leaves API mode when commands stop for 300 ms; resend well within that.
KEEPALIVE_PERIOD_S = 0.05
API_TIMEOUT_S = 0.3
COMMAND_LENGTH = 15                 # unstuffed, checksum included
#: Unstuffed reply lengths (checksum included) per reply variant.
REPLY_LENGTHS = {0: 72, 1: 72, 2: 39}
#: Decoder output index feeding each hand motor (None: the fixed rotator setting).
DECODER_INDEX_OF_MOTOR = (1, 2, 3, 4, 0, 5)

_COMMAND_BODY = struct.Struct("<BB6h")
_REPLY_CORE = struct.Struct("<B12h")
_REPLY_V2_TAIL = struct.Struct("<6hb")

class ChecksumError(ProtocolError):
    """A PSYONIC frame whose bytes do not sum to zero."""


PsyonicTelemetry = collections.namedtuple(
    "PsyonicTelemetry",
    "t_monotonic reply_variant positions_deg currents_a velocities_deg_s hot_cold")
PsyonicTelemetry.__doc__ = """One reply from the hand.  Tuples of 6 in hand motor order
(:data:`MOTORS`); currents_a / velocities_deg_s are None where the variant lacks them."""


def checksum(data):
    """Two's complement of the 8-bit byte sum: (sum(frame) + checksum) % 256 == 0."""
    return (-sum(bytearray(data))) & 0xFF


def degrees_to_counts(degrees):
    """Degrees -> int16 API counts: floor(degrees * 32767 / 150 + 0.5), clamped to +-32767."""
    counts = int(math.floor(float(degrees) * COUNTS_PER_DEGREE + 0.5))
    return max(-COUNT_LIMIT, min(COUNT_LIMIT, counts))


def encode_position_command(degrees, address=DEFAULT_ADDRESS,
                            reply_variant=DEFAULT_REPLY_VARIANT, stuffing=True):
    """Build a position command.

    Parameters
    ----------
    degrees : sequence of 6 float
        Target per motor in hand order (:data:`MOTORS`), degrees.
    address : int
        Hand address byte (0x50 unless reconfigured).
    reply_variant : int
        0, 1 or 2: which reply the hand sends back.
    stuffing : bool
        PPP-frame the bytes (the hand must have byte stuffing enabled).

    Returns
    -------
    bytes
        15 bytes unstuffed; 17 or more stuffed.
    """
    if reply_variant not in REPLY_VARIANTS:
        raise HandError("PSYONIC reply variant must be one of {}, got {!r}".format(
            REPLY_VARIANTS, reply_variant))
    if len(degrees) != len(MOTORS):
        raise HandError("a PSYONIC position command takes {} motors, got {}".format(
            len(MOTORS), len(degrees)))
    body = _COMMAND_BODY.pack(address, POSITION_COMMAND + reply_variant,
                              *[degrees_to_counts(d) for d in degrees])
    frame = body + bytes([checksum(body)])
    return ppp.stuff(frame) if stuffing else frame


def decode_position_command(frame):
    """Parse an unstuffed 15-byte position command.

    Returns ``(address, reply_variant, counts)`` with counts a tuple of 6 int.
    Raises ProtocolError on a wrong length, a wrong command byte or a bad checksum.
    """
    frame = bytes(frame)
    if len(frame) != COMMAND_LENGTH:
        raise ProtocolError("PSYONIC position command must be {} bytes, got {}".format(
            COMMAND_LENGTH, len(frame)))
    if checksum(frame[:-1]) != frame[-1]:
        raise ChecksumError("PSYONIC checksum mismatch: frame says 0x{:02X}, bytes sum to 0x{:02X}".format(
            frame[-1], checksum(frame[:-1])))
    unpacked = _COMMAND_BODY.unpack(frame[:-1])
    variant = unpacked[1] - POSITION_COMMAND
    if variant not in REPLY_VARIANTS:
        raise ProtocolError("not a PSYONIC position command: command byte 0x{:02X}".format(unpacked[1]))
    return unpacked[0], variant, tuple(unpacked[2:])


def encode_reply(positions_deg, currents_a, velocities_deg_s, hot_cold=0, reply_variant=2,
                 stuffing=True):
    """Build a reply frame as the hand sends it (used by the virtual hand).

    Only variant 2 (position, current, velocity; no touch sensors) is built.
    """
    if reply_variant != 2:
        raise HandError("only PSYONIC reply variant 2 can be built, got {!r}".format(reply_variant))
    core = []
    for position, current in zip(positions_deg, currents_a):
        core.append(degrees_to_counts(position))
        core.append(int(round(current * CURRENT_COUNTS_PER_AMP)))
    velocities = [int(round(v / VELOCITY_DEG_PER_S_PER_COUNT)) for v in velocities_deg_s]
    body = _REPLY_CORE.pack(reply_variant, *core) + _REPLY_V2_TAIL.pack(*(velocities + [hot_cold]))
    frame = body + bytes([checksum(body)])
    return ppp.stuff(frame) if stuffing else frame


def decode_reply(frame, t_monotonic=None):
    """Parse an unstuffed reply of variant 0, 1 or 2 into PsyonicTelemetry.

    Touch-sensor bytes of variants 0 and 1 are checked for length but not decoded.
    Raises ProtocolError on an unknown variant, a wrong length or a bad checksum.
    """
    frame = bytes(frame)
    if not frame:
        raise ProtocolError("empty PSYONIC reply")
    variant = frame[0] & 0x0F
    if variant not in REPLY_LENGTHS:
        raise ProtocolError("unknown PSYONIC reply variant {} (header 0x{:02X})".format(variant, frame[0]))
    if len(frame) != REPLY_LENGTHS[variant]:
        raise ProtocolError("PSYONIC reply variant {} must be {} bytes, got {}".format(
            variant, REPLY_LENGTHS[variant], len(frame)))
    if checksum(frame[:-1]) != frame[-1]:
        raise ChecksumError("PSYONIC reply checksum mismatch")
    core = _REPLY_CORE.unpack(frame[:_REPLY_CORE.size])[1:]
    positions = tuple(c / COUNTS_PER_DEGREE for c in core[0::2])
    second = core[1::2]
    currents = velocities = None
    hot_cold = struct.unpack("<b", frame[-2:-1])[0]
    if variant == 1:
        velocities = tuple(c * VELOCITY_DEG_PER_S_PER_COUNT for c in second)
    else:
        currents = tuple(c / CURRENT_COUNTS_PER_AMP for c in second)
    if variant == 2:
        tail = _REPLY_V2_TAIL.unpack(frame[_REPLY_CORE.size:-1])
        velocities = tuple(c * VELOCITY_DEG_PER_S_PER_COUNT for c in tail[:6])
    return PsyonicTelemetry(t_monotonic, variant, positions, currents, velocities, hot_cold)


def decoder_to_motor_fractions(positions, thumb_rotator):
    """Decoder outputs (5 or 6, 0..1) -> 6 fractions in hand motor order."""
    extended = list(positions) + ([thumb_rotator] if len(positions) == 5 else [])
    return [extended[i] for i in DECODER_INDEX_OF_MOTOR]


def motor_fractions_to_decoder(fractions):
    """6 fractions in hand motor order -> decoder order (thumb .. little, thumb rotation)."""
    decoder = [0.0] * len(MOTORS)
    for motor, index in enumerate(DECODER_INDEX_OF_MOTOR):
        decoder[index] = fractions[motor]
    return decoder


class _ReplyParser(object):
    """Reader-thread side: deframes replies and keeps the newest one."""

    def __init__(self, stuffing, counters):
        self._unstuffer = ppp.Unstuffer() if stuffing else None
        self._counters = counters
        self._lock = threading.Lock()
        self._latest = None

    def feed(self, data):
        if self._unstuffer is None:
            return  # without stuffing replies cannot be delimited safely; see docs/psyonic.md
        for frame in self._unstuffer.feed(data):
            try:
                reply = decode_reply(frame, time.monotonic())
            except ProtocolError:
                self._counters["bad_replies"] += 1
                continue
            self._counters["replies"] += 1
            with self._lock:
                self._latest = reply

    def take_latest(self):
        with self._lock:
            latest, self._latest = self._latest, None
        return latest


class PsyonicHand(SerialHandDriver):
    """PSYONIC Ability Hand driver (``psyonic:PORT``).

    Parameters
    ----------
    port : str
        Serial device or pyserial URL.
    n_outputs : int
        5 (thumb rotator from ``thumb_rotator``) or 6 (decoder drives it).
    thumb_rotator : float
        Fixed rotator position 0..1 used with 5 outputs.
    address, baudrate, reply_variant, stuffing :
        API settings; defaults match a hand configured for UART with byte stuffing.
    full_scale_deg : sequence of 6 float or None
        Degrees at fraction 1.0 per motor (hand order).
    write_timeout_s : float
        A write blocked longer raises LinkError.
    """

    keepalive_period_s = KEEPALIVE_PERIOD_S
    label = "PSYONIC hand"

    def __init__(self, port, n_outputs=5, thumb_rotator=DEFAULT_THUMB_ROTATOR,
                 address=DEFAULT_ADDRESS, baudrate=DEFAULT_BAUDRATE,
                 reply_variant=DEFAULT_REPLY_VARIANT, stuffing=True, full_scale_deg=None,
                 write_timeout_s=0.1):
        if n_outputs not in (5, 6):
            raise HandError("the PSYONIC driver takes 5 or 6 decoder outputs, got {!r}".format(n_outputs))
        if reply_variant not in REPLY_VARIANTS:
            raise HandError("PSYONIC reply variant must be one of {}, got {!r}".format(
                REPLY_VARIANTS, reply_variant))
        if not (isinstance(address, int) and 0 <= address <= 0xFF):
            raise HandError("PSYONIC address must be a byte 0..255, got {!r}".format(address))
        super(PsyonicHand, self).__init__(port, n_outputs, baudrate, write_timeout_s)
        self.thumb_rotator = check_fraction("thumb_rotator", thumb_rotator)
        self.address = address
        self.reply_variant = reply_variant
        self.stuffing = bool(stuffing)
        scale = DEFAULT_FULL_SCALE_DEG if full_scale_deg is None else tuple(full_scale_deg)
        if len(scale) != len(MOTORS) or not all(np.isfinite(scale)):
            raise HandError("full_scale_deg needs 6 finite values (hand order {}), got {!r}".format(
                MOTORS, full_scale_deg))
        self.full_scale_deg = np.asarray(scale, dtype=np.float64)
        self.counters.update({"replies": 0, "bad_replies": 0})

    def _make_parser(self):
        return _ReplyParser(self.stuffing, self.counters)

    def frame_for(self, positions):
        """The bytes ``send`` writes for already-validated ``positions``."""
        fractions = decoder_to_motor_fractions(positions, self.thumb_rotator)
        degrees = np.asarray(fractions, dtype=np.float64) * self.full_scale_deg
        return encode_position_command(degrees, self.address, self.reply_variant, self.stuffing)

