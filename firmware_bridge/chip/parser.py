"""Streaming parser for the chip's frames (docs/chip-protocol.md).

Bytes go in, in any chunking; events come out in stream order::

    parser = ChipParser()
    for event in parser.feed(data):        # bytes, bytearray or memoryview
        ...                                # SampleFrame | SampleGap | ChipReply | ChipCommand

The parser never owns a port (see serial_link.py).  It resynchronises after
garbage by searching for the sync word, drops frames whose CRC fails, and
reports sequence gaps (frames the chip sent that never arrived intact) as a
``SampleGap`` *before* the frame that revealed the gap, so the DSP knows
exactly where data is missing.

Counters are exact (tests check them against injected faults):

* ``frames_good``: data frames accepted.
* ``crc_errors``: frames whose header was plausible but whose CRC failed.
* ``bad_headers``: sync words followed by an impossible header (false syncs).
* ``malformed``: frames with a good CRC but an inconsistent body (a chip bug).
* ``resyncs``: times the parser lost sync, i.e. runs of discarded bytes between
  two accepted frames (a garbage burst next to a corrupt frame is one resync).
* ``bytes_discarded``: bytes that were not part of an accepted frame.
* ``frames_missing`` / ``gaps``: total missing frames and number of SampleGaps.
* ``sequence_restarts``: sequence went backwards without a stream-start flag.
* ``stream_starts``: frames flagged as the first of a stream.
* ``replies`` / ``commands``: ACK/NAK and command frames accepted.
"""
import collections

import numpy as np

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.shared.framer import Framer

SampleGap = collections.namedtuple("SampleGap", "first_missing_sequence missing_frames missing_samples")
SampleGap.__doc__ = """Frames the chip sent that never arrived intact.

first_missing_sequence: sequence number of the first missing frame (mod 2**32).
missing_frames: how many frames are missing; missing_samples: how many samples
per channel that is, assuming the frame size of the frame that revealed the gap.
"""

ChipReply = collections.namedtuple("ChipReply", "kind command token status data")
ChipReply.__doc__ = """An ACK or NAK from the chip: kind is 'ack' or 'nak'; data is bytes."""

ChipCommand = collections.namedtuple("ChipCommand", "command token args")
ChipCommand.__doc__ = """A host-to-chip command (what a chip, e.g. the virtual one, receives)."""


class SampleFrame:
    """One data frame.

    sequence: uint32 frame counter.  device_time_us: chip time of the first
    sample, microseconds.  samples: int16 ndarray, shape (samples_per_frame,
    n_channels), ADC counts (multiply by the chip's scale for microvolts).
    stream_start: True for the first frame after a START command.
    """
    __slots__ = ("sequence", "device_time_us", "samples", "stream_start")

    def __init__(self, sequence, device_time_us, samples, stream_start=False):
        self.sequence = sequence
        self.device_time_us = device_time_us
        self.samples = samples
        self.stream_start = stream_start

    @property
    def n_channels(self):
        return self.samples.shape[1]

    @property
    def samples_per_frame(self):
        return self.samples.shape[0]

    def __repr__(self):
        return "SampleFrame(sequence={}, device_time_us={}, samples=<{}x{} int16>)".format(
            self.sequence, self.device_time_us, self.samples.shape[0], self.samples.shape[1])


#: What the parser counts, exactly (see the module docstring).
PARSER_COUNTERS = ("frames_good", "crc_errors", "bad_headers", "malformed", "resyncs", "bytes_discarded",
                   "frames_missing", "gaps", "sequence_restarts", "stream_starts", "replies", "commands")


class ChipParser(Framer):
    """Turn a byte stream into frames; see the module docstring.

    Channel count and samples per frame are read from each frame's header, so
    one parser follows a reconfiguration.  Memory is bounded: at most one
    partial frame (< 32.7 kB) plus the last chunk fed is held.  Sync search,
    header limits, CRC check and the framing counters are the shared framer's
    (firmware_bridge/shared/framer.py).
    """

    def __init__(self):
        # Smallest and largest body each frame type may declare; anything else is a false sync.
        Framer.__init__(self, PARSER_COUNTERS, sync=cp.SYNC, version=cp.PROTOCOL_VERSION,
                        header=cp.HEADER, crc=cp.CRC, frame_types={
                            cp.FRAME_DATA: (cp.DATA_HEADER_SIZE + 2, cp.MAX_DATA_BODY, ChipParser._data_frame),
                            cp.FRAME_COMMAND: (cp.COMMAND_HEADER.size, cp.MAX_CONTROL_BODY,
                                               ChipParser._command_frame),
                            cp.FRAME_ACK: (cp.REPLY_HEADER.size, cp.MAX_CONTROL_BODY, ChipParser._ack_frame),
                            cp.FRAME_NAK: (cp.REPLY_HEADER.size, cp.MAX_CONTROL_BODY, ChipParser._nak_frame),
                        })
        self._expected_sequence = None      # None until the first data frame

    def _data_frame(self, buf, at, body_len, events):
        sequence, device_time_us, n_channels, spf, flags, _reserved = cp.DATA_HEADER.unpack_from(buf, at)
        count = n_channels * spf
        if count == 0 or body_len != cp.DATA_HEADER_SIZE + 2 * count:
            return False
        samples = np.frombuffer(buf, dtype=cp.SAMPLE_DTYPE, count=count,
                                offset=at + cp.DATA_HEADER_SIZE).reshape(spf, n_channels).copy()
        counters = self.counters
        expected = self._expected_sequence
        stream_start = bool(flags & cp.FLAG_STREAM_START)
        if stream_start:
            counters["stream_starts"] += 1
        elif expected is not None and sequence != expected:
            missing = cp.sequence_step(expected, sequence)
            if missing > 0:
                events.append(SampleGap(expected, missing, missing * spf))
                counters["gaps"] += 1
                counters["frames_missing"] += missing
            else:
                # Backwards (a chip reset or a replay): the gap cannot be measured.
                counters["sequence_restarts"] += 1
        self._expected_sequence = (sequence + 1) % cp.SEQUENCE_MODULUS
        counters["frames_good"] += 1
        events.append(SampleFrame(sequence, device_time_us, samples, stream_start))
        return True

    def _command_frame(self, buf, at, body_len, events):
        command, token = cp.COMMAND_HEADER.unpack_from(buf, at)
        events.append(ChipCommand(command, token, bytes(buf[at + cp.COMMAND_HEADER.size:at + body_len])))
        self.counters["commands"] += 1
        return True

    def _ack_frame(self, buf, at, body_len, events):
        return self._reply(True, buf, at, body_len, events)

    def _nak_frame(self, buf, at, body_len, events):
        return self._reply(False, buf, at, body_len, events)

    def _reply(self, is_ack, buf, at, body_len, events):
        command, token, status = cp.REPLY_HEADER.unpack_from(buf, at)
        if is_ack != (status == cp.STATUS_OK):
            return False
        events.append(ChipReply("ack" if is_ack else "nak", command, token, status,
                                bytes(buf[at + cp.REPLY_HEADER.size:at + body_len])))
        self.counters["replies"] += 1
        return True
