"""The neural-interface chip's wire protocol: constants, frame encoders, reply
decoders and the host's command channel.

docs/chip-protocol.md is the specification; every number here appears there
once, and tests/device/test_chip_protocol.py checks that the two agree (the
constants table and the byte-exact test vectors are parsed out of the document).

Every frame, in both directions, is::

    sync (4) | version (1) | type (1) | body length (2, LE) | body | CRC-32 (4, LE)

The CRC is zlib.crc32 (CRC-32/ISO-HDLC: polynomial 0x04C11DB7 reflected,
initial value 0xFFFFFFFF, final XOR 0xFFFFFFFF) over version, type, length and
body, i.e. everything after the sync word and before the CRC.

Standard library and numpy only: this runs on the Jetson (Python 3.6).
"""
import collections
import struct
import threading
import time
import zlib

import numpy as np

from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError

# --- framing ---------------------------------------------------------------
SYNC = b"\xa5\x5a\x3c\xc3"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBH")          # sync, version, frame type, body length
CRC = struct.Struct("<I")
HEADER_SIZE = HEADER.size                 # 8
CRC_SIZE = CRC.size                       # 4

FRAME_DATA = 0x01
FRAME_COMMAND = 0x02
FRAME_ACK = 0x03
FRAME_NAK = 0x04
FRAME_TYPE_NAMES = {FRAME_DATA: "data", FRAME_COMMAND: "command", FRAME_ACK: "ack", FRAME_NAK: "nak"}

#: UART speed the runtime opens the chip link with (pseudo-terminals and USB
#: CDC-ACM, the intended link, ignore it).
BAUDRATE = 3000000

# --- data frames -----------------------------------------------------------
DATA_HEADER = struct.Struct("<IQBBBB")    # sequence, device time (us), channels, samples/frame, flags, reserved
DATA_HEADER_SIZE = DATA_HEADER.size       # 16
SAMPLE_DTYPE = np.dtype("<i2")
FLAG_STREAM_START = 0x01                  # first frame after START: sequence restarts at 0
SEQUENCE_MODULUS = 1 << 32                # the sequence counter is uint32 and wraps to 0
MAX_CHANNELS = 64
MAX_SAMPLES_PER_FRAME = 255
MAX_DATA_BODY = DATA_HEADER_SIZE + 2 * MAX_CHANNELS * MAX_SAMPLES_PER_FRAME   # 32656

# --- command channel -------------------------------------------------------
COMMAND_HEADER = struct.Struct("<BB")     # command code, token
REPLY_HEADER = struct.Struct("<BBB")      # command code, token, status
MAX_CONTROL_BODY = 64

CMD_START = 0x01
CMD_STOP = 0x02
CMD_CONFIGURE = 0x03
CMD_GET_IDENTITY = 0x04
CMD_GET_VERSION = 0x05
CMD_GET_CONFIG = 0x06
COMMAND_NAMES = {
    CMD_START: "start", CMD_STOP: "stop", CMD_CONFIGURE: "configure",
    CMD_GET_IDENTITY: "get-identity", CMD_GET_VERSION: "get-version", CMD_GET_CONFIG: "get-config",
}

STATUS_OK = 0x00
STATUS_UNKNOWN_COMMAND = 0x01
STATUS_BAD_ARGUMENT = 0x02
STATUS_BUSY = 0x03
STATUS_NAMES = {
    STATUS_OK: "ok", STATUS_UNKNOWN_COMMAND: "unknown command",
    STATUS_BAD_ARGUMENT: "bad argument", STATUS_BUSY: "busy (stop streaming first)",
}

CONFIGURE_ARGS = struct.Struct("<BBI")    # channels, samples per frame, sample rate (Hz)
IDENTITY_DATA = struct.Struct("<IBI")     # chip id, max channels, max sample rate (Hz); then model, ASCII
VERSION_DATA = struct.Struct("<BBBB")     # firmware major, minor, patch; protocol version
CONFIG_DATA = struct.Struct("<BBIBf")     # channels, samples/frame, rate (Hz), streaming (0/1), scale (uV/count)

# --- defaults --------------------------------------------------------------
DEFAULT_N_CHANNELS = 16
DEFAULT_SAMPLE_RATE_HZ = 10000
DEFAULT_SAMPLES_PER_FRAME = 20            # 2 ms per frame at 10 kHz


def data_body_size(n_channels, samples_per_frame):
    """Body length in bytes of a data frame."""
    return DATA_HEADER_SIZE + 2 * n_channels * samples_per_frame


def frame_size(body_size):
    """Total bytes on the wire of a frame whose body has ``body_size`` bytes."""
    return HEADER_SIZE + body_size + CRC_SIZE


def encode_frame(frame_type, body):
    """Wrap ``body`` (bytes) in sync, header and CRC; returns the frame as bytes."""
    head = HEADER.pack(SYNC, PROTOCOL_VERSION, frame_type, len(body))
    crc = zlib.crc32(body, zlib.crc32(head[len(SYNC):]))
    return head + body + CRC.pack(crc)


def sequence_step(previous, sequence):
    """Frames from ``previous`` to ``sequence`` on the wrapping uint32 counter.

    Positive: ``sequence`` is that many frames ahead (1 = the next frame);
    zero or negative: it repeats or went back (a chip reset, a replay), which
    is taken to be so when it is half a turn (2**31 frames) or more ahead.
    """
    ahead = (sequence - previous) % SEQUENCE_MODULUS
    return ahead if ahead < SEQUENCE_MODULUS // 2 else ahead - SEQUENCE_MODULUS


def encode_data_frame(sequence, device_time_us, samples, flags=0):
    """Encode one data frame.

    samples: int16 array-like, shape (samples_per_frame, n_channels), ADC counts.
    sequence: frame counter, taken modulo 2**32.  device_time_us: time of the
    first sample on the chip's clock, microseconds (uint64).
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.dtype != np.int16:
        raise ValueError("samples must be an int16 array (samples_per_frame, n_channels), got {} {}".format(
            samples.dtype, samples.shape))
    spf, n_channels = samples.shape
    if not (1 <= n_channels <= MAX_CHANNELS and 1 <= spf <= MAX_SAMPLES_PER_FRAME):
        raise ValueError("frame of {} samples x {} channels is outside the protocol's limits".format(spf, n_channels))
    body = DATA_HEADER.pack(sequence % SEQUENCE_MODULUS, device_time_us, n_channels, spf, flags, 0)
    return encode_frame(FRAME_DATA, body + samples.astype(SAMPLE_DTYPE, copy=False).tobytes())


def encode_command(command, token, args=b""):
    """Encode a host-to-chip command frame; ``token`` (0..255) is echoed in the reply."""
    return encode_frame(FRAME_COMMAND, COMMAND_HEADER.pack(command, token) + bytes(args))


def encode_ack(command, token, data=b""):
    """Encode the chip's positive reply to ``command`` carrying ``data``."""
    return encode_frame(FRAME_ACK, REPLY_HEADER.pack(command, token, STATUS_OK) + bytes(data))


def encode_nak(command, token, status):
    """Encode the chip's refusal of ``command`` with a non-zero ``status`` code."""
    if status == STATUS_OK:
        raise ValueError("a NAK needs a non-zero status")
    return encode_frame(FRAME_NAK, REPLY_HEADER.pack(command, token, status))


# --- reply payloads --------------------------------------------------------
ChipIdentity = collections.namedtuple("ChipIdentity", "chip_id max_channels max_sample_rate_hz model")
FirmwareVersion = collections.namedtuple("FirmwareVersion", "major minor patch protocol_version")
ChipConfig = collections.namedtuple("ChipConfig",
                                    "n_channels samples_per_frame sample_rate_hz streaming scale_uv")


def encode_identity(identity):
    model = identity.model.encode("ascii")
    return IDENTITY_DATA.pack(identity.chip_id, identity.max_channels, identity.max_sample_rate_hz) + model


def decode_identity(data):
    chip_id, max_channels, max_rate = IDENTITY_DATA.unpack_from(data, 0)
    return ChipIdentity(chip_id, max_channels, max_rate, bytes(data[IDENTITY_DATA.size:]).decode("ascii", "replace"))


def encode_version(version):
    return VERSION_DATA.pack(version.major, version.minor, version.patch, version.protocol_version)


def decode_version(data):
    return FirmwareVersion(*VERSION_DATA.unpack_from(data, 0))


def encode_config(config):
    return CONFIG_DATA.pack(config.n_channels, config.samples_per_frame, config.sample_rate_hz,
                            1 if config.streaming else 0, config.scale_uv)


def decode_config(data):
    n_channels, spf, rate, streaming, scale = CONFIG_DATA.unpack_from(data, 0)
    return ChipConfig(n_channels, spf, rate, bool(streaming), scale)


def encode_configure_args(n_channels, samples_per_frame, sample_rate_hz):
    return CONFIGURE_ARGS.pack(n_channels, samples_per_frame, sample_rate_hz)


def decode_configure_args(args):
    """(n_channels, samples_per_frame, sample_rate_hz), or None if ``args`` has the wrong length."""
    if len(args) != CONFIGURE_ARGS.size:
        return None
    return CONFIGURE_ARGS.unpack(bytes(args))


class ChipCommandChannel:
    """The host's side of the command channel: send a command, wait for its ACK/NAK.

    ``write(bytes)`` sends on the link (e.g. ``SerialLink.write``).  Replies come
    back through the same parser as the data; whoever runs the parser passes each
    ``ChipReply`` to :meth:`handle_reply` (from any thread).  A command that gets
    no reply within ``timeout_s`` is sent again (same token, so a late reply to an
    earlier attempt still counts) up to ``retries`` more times; all commands are
    idempotent on the chip, so a repeat is harmless.
    """

    def __init__(self, write, timeout_s=0.5, retries=2):
        self._write = write
        self.timeout_s = timeout_s
        self.retries = retries
        self._lock = threading.Lock()            # one command in flight at a time
        self._cond = threading.Condition()
        self._token = 0
        self._waiting_for = None                 # (command, token) in flight
        self._reply = None
        self.unmatched_replies = 0

    def handle_reply(self, reply):
        """Deliver a parsed ChipReply; returns True if it answered the command in flight."""
        with self._cond:
            if self._waiting_for == (reply.command, reply.token) and self._reply is None:
                self._reply = reply
                self._cond.notify_all()
                return True
            self.unmatched_replies += 1
            return False

    def request(self, command, args=b""):
        """Send ``command`` and return its ACK (a ChipReply).

        Raises ProtocolError on a NAK and LinkError when no reply arrives.
        """
        name = COMMAND_NAMES.get(command, "0x{:02x}".format(command))
        with self._lock:
            with self._cond:
                self._token = self._token % 255 + 1
                token = self._token
                self._waiting_for = (command, token)
                self._reply = None
            frame = encode_command(command, token, args)
            try:
                for _attempt in range(1 + self.retries):
                    self._write(frame)
                    deadline = time.monotonic() + self.timeout_s
                    with self._cond:
                        while self._reply is None:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                break
                            self._cond.wait(left)
                        reply = self._reply
                    if reply is not None:
                        break
                else:
                    raise LinkError("chip did not answer the {} command within {:g} s ({} attempts)".format(
                        name, self.timeout_s, 1 + self.retries))
            finally:
                with self._cond:
                    self._waiting_for = None
        if reply.kind != "ack":
            raise ProtocolError("chip refused the {} command: {}".format(
                name, STATUS_NAMES.get(reply.status, "status 0x{:02x}".format(reply.status))))
        return reply

    def start_streaming(self):
        self.request(CMD_START)

    def stop_streaming(self):
        self.request(CMD_STOP)

    def configure(self, n_channels, samples_per_frame, sample_rate_hz):
        self.request(CMD_CONFIGURE, encode_configure_args(n_channels, samples_per_frame, sample_rate_hz))

    def identify(self):
        """The chip's ChipIdentity."""
        return decode_identity(self.request(CMD_GET_IDENTITY).data)

    def firmware_version(self):
        """The chip's FirmwareVersion."""
        return decode_version(self.request(CMD_GET_VERSION).data)

    def get_config(self):
        """The chip's current ChipConfig (channels, frame size, rate, streaming, scale)."""
        return decode_config(self.request(CMD_GET_CONFIG).data)
