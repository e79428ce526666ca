"""Streaming parser for neurohand serial-glove frames (docs/glove-protocol.md).

Bytes go in, in any chunking; events come out in stream order::

    parser = GloveParser()
    for event in parser.feed(data):        # bytes, bytearray or memoryview
        ...                                # GloveFrame | GloveHello

As the chip's parser (chip/parser.py): it resynchronises after garbage by
searching for the sync word, drops frames whose CRC fails, and counts sequence
gaps.  Counters are exact:

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
import zlib

from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.shared.counters import new_counters

GloveFrame = collections.namedtuple("GloveFrame", "sequence values")
GloveFrame.__doc__ = """One data frame: sequence (uint32) and values (tuple of int, ADC counts per channel)."""

PARSER_COUNTERS = ("frames", "lost", "crc_errors", "resyncs", "bad_headers", "malformed", "bytes_discarded",
                   "hellos", "gaps", "sequence_restarts")

_BODY_LIMITS = {
    gp.FRAME_DATA: (gp.MIN_DATA_BODY, gp.MAX_DATA_BODY),
    gp.FRAME_HELLO: (gp.MIN_HELLO_BODY, gp.MAX_HELLO_BODY),
}
_SYNC = gp.SYNC
_SYNC_LEN = len(gp.SYNC)
_HEADER_SIZE = gp.HEADER_SIZE
_CRC_SIZE = gp.CRC_SIZE


class GloveParser(object):
    """Turn a byte stream into GloveFrame and GloveHello events; see the module docstring.

    ``hello``: the last GloveHello accepted (None before the first).  Memory is
    bounded: at most one partial frame (< 80 bytes) plus the last chunk fed.
    """

    def __init__(self):
        self.counters = new_counters(PARSER_COUNTERS)
        self.hello = None
        self._buffer = bytearray()
        self._expected_sequence = None
        self._lost_sync = False

    def feed(self, data):
        """Add bytes; return the list of events they complete, in stream order."""
        buf = self._buffer
        buf += data
        events = []
        counters = self.counters
        n = len(buf)
        pos = 0
        while n - pos >= _HEADER_SIZE:
            sync, version, frame_type, body_len = gp.HEADER.unpack_from(buf, pos)
            if sync != _SYNC:
                found = buf.find(_SYNC, pos + 1)
                if found < 0:
                    keep = 1 if buf[-1:] == _SYNC[:1] else 0
                    self._discard(n - keep - pos)
                    pos = n - keep
                    break
                self._discard(found - pos)
                pos = found
                continue
            limits = _BODY_LIMITS.get(frame_type)
            if version != gp.PROTOCOL_VERSION or limits is None or not limits[0] <= body_len <= limits[1]:
                counters["bad_headers"] += 1
                self._discard(1)
                pos += 1
                continue
            crc_at = pos + _HEADER_SIZE + body_len
            end = crc_at + _CRC_SIZE
            if end > n:
                break
            if zlib.crc32(buf[pos + _SYNC_LEN:crc_at]) != gp.CRC.unpack_from(buf, crc_at)[0]:
                counters["crc_errors"] += 1
                self._discard(1)
                pos += 1
                continue
            body = bytes(buf[pos + _HEADER_SIZE:crc_at])
            event = self._data(body) if frame_type == gp.FRAME_DATA else self._hello(body)
            if event is None:
                counters["malformed"] += 1
                self._discard(1)
                pos += 1
                continue
            events.append(event)
            self._lost_sync = False
            pos = end
        self._buffer = buf[pos:] if pos else buf
        return events

    def flush(self):
        """Link lost: count the partial frame as discarded; keep the sequence
        expectation, so frames lost while unplugged are counted when data resumes."""
        self._discard(len(self._buffer))
        self._buffer = bytearray()

    def _discard(self, count):
        if count <= 0:
            return
        self.counters["bytes_discarded"] += count
        if not self._lost_sync:
            self._lost_sync = True
            self.counters["resyncs"] += 1

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
