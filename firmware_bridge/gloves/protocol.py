"""neurohand's glove protocol, for microcontroller flex-sensor gloves: constants and encoders.

docs/glove-protocol.md is the specification; every number here appears there
once, and tests/device/test_glove_protocol.py checks that the two agree (the
constants table and the byte-exact test vectors are parsed out of the document).

The glove only talks; it never reads.  Every frame is::

    sync (2) | version (1) | type (1) | body length (1) | body | CRC-32 (4, LE)

The CRC is the chip protocol's (zlib.crc32, CRC-32/ISO-HDLC) over version,
type, length and body.  A data frame's body is a uint32 sequence number and one
uint16 per channel; a hello frame (at power-up and every second) announces the
channel count, the nominal rate, the ADC resolution and a name.

Standard library only: this runs on the Jetson (Python 3.6).
"""
import collections
import struct
import zlib

from neurohand.firmware_bridge.chip import protocol as _chip

# --- framing ---------------------------------------------------------------
SYNC = b"\xc7\x5e"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBB")          # sync, version, frame type, body length
CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size                 # 5
CRC_SIZE = CRC.size                       # 4

FRAME_DATA = 0x01
FRAME_HELLO = 0x02
FRAME_TYPE_NAMES = {FRAME_DATA: "data", FRAME_HELLO: "hello"}

#: The sequence counter wraps as the chip's, and gaps are read by the chip's rule.
SEQUENCE_MODULUS = _chip.SEQUENCE_MODULUS
sequence_step = _chip.sequence_step

#: UART speed of the glove link (a USB CDC-ACM glove ignores it).
BAUDRATE = 115200

# --- data frames -----------------------------------------------------------
SEQUENCE = struct.Struct("<I")            # uint32 frame counter, from 0 at power-up, wraps
SAMPLE_SIZE = 2                           # uint16 LE per channel, ADC counts
MAX_CHANNELS = 32
MIN_DATA_BODY = SEQUENCE.size + SAMPLE_SIZE                  # 6
MAX_DATA_BODY = SEQUENCE.size + SAMPLE_SIZE * MAX_CHANNELS   # 68

# --- hello frames ----------------------------------------------------------
HELLO = struct.Struct("<BHB")             # channels, nominal rate (Hz), ADC bits; then the name, ASCII
MAX_NAME_BYTES = 32
MIN_HELLO_BODY = HELLO.size                                  # 4
MAX_HELLO_BODY = HELLO.size + MAX_NAME_BYTES                 # 36
MAX_RATE_HZ = 1000
HELLO_PERIOD_S = 1.0                      # a glove repeats its hello this often
HELLO_TIMEOUT_S = 2.5                     # the host waits this long for one when it opens the port

# --- defaults --------------------------------------------------------------
DEFAULT_N_CHANNELS = 5                    # one flex sensor per finger
DEFAULT_RATE_HZ = 100
DEFAULT_ADC_BITS = 10                     # an Arduino Uno's analogRead

GloveHello = collections.namedtuple("GloveHello", "n_channels rate_hz adc_bits name")
GloveHello.__doc__ = """A glove's hello: channels, nominal rate (Hz), ADC resolution (bits), name (str)."""


def frame_size(body_size):
    """Total bytes on the wire of a frame whose body has ``body_size`` bytes."""
    return HEADER_SIZE + body_size + CRC_SIZE


def encode_frame(frame_type, body):
    """Wrap ``body`` (bytes) in sync, header and CRC; returns the frame as bytes."""
    body = bytes(body)
    if len(body) > 255:
        raise ValueError("a glove frame body holds at most 255 bytes, got {}".format(len(body)))
    head = HEADER.pack(SYNC, PROTOCOL_VERSION, frame_type, len(body))
    crc = zlib.crc32(body, zlib.crc32(head[len(SYNC):]))
    return head + body + CRC.pack(crc)


def encode_data(sequence, values):
    """A data frame: ``sequence`` (taken modulo 2**32) and one uint16 per channel (ADC counts)."""
    values = [int(v) for v in values]
    if not 1 <= len(values) <= MAX_CHANNELS:
        raise ValueError("a glove frame carries 1..{} channels, got {}".format(MAX_CHANNELS, len(values)))
    if any(not 0 <= v <= 0xFFFF for v in values):
        raise ValueError("glove samples are uint16, got {}".format(values))
    body = SEQUENCE.pack(sequence % SEQUENCE_MODULUS) + struct.pack("<{}H".format(len(values)), *values)
    return encode_frame(FRAME_DATA, body)


def encode_hello(hello):
    """A hello frame from a GloveHello."""
    name = hello.name.encode("ascii")
    if not (1 <= hello.n_channels <= MAX_CHANNELS and 1 <= hello.rate_hz <= MAX_RATE_HZ
            and 1 <= hello.adc_bits <= 16 and len(name) <= MAX_NAME_BYTES):
        raise ValueError("hello {!r} is outside the protocol's limits".format(hello))
    return encode_frame(FRAME_HELLO, HELLO.pack(hello.n_channels, hello.rate_hz, hello.adc_bits) + name)


def decode_hello(body):
    """GloveHello from a hello frame's body, or None if it breaks the limits."""
    if not MIN_HELLO_BODY <= len(body) <= MAX_HELLO_BODY:
        return None
    n_channels, rate_hz, adc_bits = HELLO.unpack_from(body, 0)
    name = bytes(body[HELLO.size:])
    if not (1 <= n_channels <= MAX_CHANNELS and 1 <= rate_hz <= MAX_RATE_HZ and 1 <= adc_bits <= 16) \
            or any(not 0x20 <= c < 0x7f for c in bytearray(name)):
        return None
    return GloveHello(n_channels, rate_hz, adc_bits, name.decode("ascii"))


def decode_data(body):
    """(sequence, tuple of int) from a data frame's body, or None if its length is impossible."""
    n_values, odd = divmod(len(body) - SEQUENCE.size, SAMPLE_SIZE)
    if odd or not 1 <= n_values <= MAX_CHANNELS:
        return None
    return SEQUENCE.unpack_from(body, 0)[0], struct.unpack_from("<{}H".format(n_values), body, SEQUENCE.size)
