"""Streaming parser for neurohand serial-glove frames (docs/glove-protocol.md).

Bytes go in, in any chunking; events come out in stream order::

    parser = GloveParser()
    for event in parser.feed(data):        # bytes, bytearray or memoryview
        ...                                # GloveFrame | GloveHello

The framing (sync search after garbage, header limits, CRC check) is the
shared framer's, the chip parser's too (shared/framer.py); this module decodes
the bodies and counts sequence gaps.  Counters are exact:

* ``frames``: data frames accepted; ``hellos``: hello frames accepted.
* ``lost``: frames the glove numbered that never arrived intact, from the
  sequence counter (``gaps``: how many separate runs).
* ``crc_errors``: plausible headers whose CRC failed.
* ``bad_headers``: sync words followed by an impossible header (false syncs).
* ``malformed``: good CRC, impossible content (a hello out of limits, a data
  frame whose channel count differs from the first hello's, or a later hello
  announcing another channel count: a different glove on the same port).
* ``resyncs``: runs of discarded bytes between two accepted frames.
* ``bytes_discarded``: bytes that were not part of an accepted frame.
* ``sequence_restarts``: the sequence went backwards (the glove reset).
"""
import collections

from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.shared.framer import Framer

GloveFrame = collections.namedtuple("GloveFrame", "sequence values")
GloveFrame.__doc__ = """One data frame: sequence (uint32) and values (tuple of int, ADC counts per channel)."""

PARSER_COUNTERS = ("frames", "lost", "crc_errors", "resyncs", "bad_headers", "malformed", "bytes_discarded",
                   "hellos", "gaps", "sequence_restarts")


class GloveParser(Framer):
    """Turn a byte stream into GloveFrame and GloveHello events; see the module docstring.

    ``hello``: the last GloveHello accepted (None before the first).  Memory is
    bounded: at most one partial frame (< 80 bytes) plus the last chunk fed.
    Sync search, header limits, CRC check and the framing counters are the
    shared framer's (firmware_bridge/shared/framer.py).
    """

    def __init__(self):
        Framer.__init__(self, PARSER_COUNTERS, sync=gp.SYNC, version=gp.PROTOCOL_VERSION,
                        header=gp.HEADER, crc=gp.CRC, frame_types={
                            gp.FRAME_DATA: (gp.MIN_DATA_BODY, gp.MAX_DATA_BODY, GloveParser._data_frame),
                            gp.FRAME_HELLO: (gp.MIN_HELLO_BODY, gp.MAX_HELLO_BODY, GloveParser._hello_frame),
                        })
        self.hello = None
        self._expected_sequence = None

    def _data_frame(self, buf, at, body_len, events):
        return _append(events, self._data(bytes(buf[at:at + body_len])))

    def _hello_frame(self, buf, at, body_len, events):
        return _append(events, self._hello(bytes(buf[at:at + body_len])))

    def _hello(self, body):
        hello = gp.decode_hello(body)
        if hello is None:
            return None
        if self.hello is not None and hello.n_channels != self.hello.n_channels:
            return None         # another glove on the port: its frames are refused, not mixed in
        self.hello = hello
        self.counters["hellos"] += 1
        return hello

    def _data(self, body):
        decoded = gp.decode_data(body)
        if decoded is None:
            return None
        sequence, values = decoded
        if self.hello is not None and len(values) != self.hello.n_channels:
            return None
        counters = self.counters
        expected = self._expected_sequence
        if expected is not None and sequence != expected:
            step = gp.sequence_step(expected, sequence)
            if step > 0:
                counters["lost"] += step
                counters["gaps"] += 1
            else:
                counters["sequence_restarts"] += 1
        self._expected_sequence = (sequence + 1) % gp.SEQUENCE_MODULUS
        counters["frames"] += 1
        return GloveFrame(sequence, values)


def _append(events, event):
    """A handler's answer to the framer: False (malformed) for None, else the event is appended."""
    if event is None:
        return False
    events.append(event)
    return True
