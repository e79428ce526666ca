"""The framing loop shared by every sync-word protocol in neurohand (chip, serial glove).

Both wire formats are::

    sync | version | type | body length | body | CRC (over version .. body)

and differ only in their constants, which stay in each protocol's module.  A
parser subclasses ``Framer``, passes those constants, and handles whole,
CRC-checked frames; the framer does the rest, identically for every protocol:

* it searches for the sync word after garbage and keeps a tail that could be
  the start of one, so any chunking of the stream gives the same events;
* a sync word followed by a wrong version, an unknown type or a body length
  outside that type's limits is a false sync (``bad_headers``); the parser
  steps one byte and searches again;
* a frame whose CRC fails (``crc_errors``), or that its handler refuses
  (``malformed``), is skipped the same way, so a real frame hiding inside a
  damaged one is still found;
* ``bytes_discarded`` counts every byte that was not part of an accepted
  frame and ``resyncs`` the runs of such bytes between two accepted frames.

The parser's counter set must hold ``FRAMER_COUNTERS``; its other counters
are its own.  Memory is bounded: at most one partial frame plus the last chunk
fed is held.

Standard library only: this runs on the Jetson (Python 3.6).
"""
import zlib

from neurohand.firmware_bridge.shared.counters import new_counters

#: The counters the framer keeps, in the parser's counter set.
FRAMER_COUNTERS = ("crc_errors", "bad_headers", "malformed", "resyncs", "bytes_discarded")


class Resyncing(object):
    """What every byte-stream parser here shares, framed or not (gloves/cyberglove.py has no sync word or
    CRC): the bytes held for an incomplete frame in ``_buffer``, and discarded bytes counted in
    ``bytes_discarded``, with one ``resyncs`` per run of them until a frame is accepted (``_lost_sync``)."""

    def flush(self):
        """End of stream or link lost: count the buffered partial bytes as discarded.

        A parser's own state (e.g. its sequence expectation) is kept, so frames
        lost while a link was down are still counted when data resumes.
        """
        self._discard(len(self._buffer))
        self._buffer = bytearray()

    @property
    def buffered_bytes(self):
        """Bytes held for a frame not yet complete."""
        return len(self._buffer)

    def _discard(self, count):
        if count <= 0:
            return
        self.counters["bytes_discarded"] += count
        if not self._lost_sync:
            self._lost_sync = True
            self.counters["resyncs"] += 1


class Framer(Resyncing):
    """Base of a streaming frame parser; see the module docstring.

    counter_names: the parser's counters, ``FRAMER_COUNTERS`` among them.
    sync: the sync word (bytes).  version: the one protocol version accepted.
    header: a struct.Struct that unpacks to (sync, version, type, body length).
    crc: a struct.Struct of one unsigned int, the CRC after the body, computed by
    ``crc_function`` (zlib.crc32 by default) over everything after the sync word.
    frame_types: {type: (smallest body, largest body, handler)}.  A handler is a
    plain function ``handler(parser, buf, body_at, body_len, events)``: it reads
    the body at ``buf[body_at:body_at + body_len]``, which is only valid during
    the call, appends its events to ``events`` and returns False to refuse the
    frame as malformed.  Plain functions, not bound methods, so the parser holds
    no reference cycle.
    """

    def __init__(self, counter_names, sync, version, header, crc, frame_types, crc_function=zlib.crc32):
        missing = [name for name in FRAMER_COUNTERS if name not in counter_names]
        if missing:
            raise ValueError("a framed parser needs the counters {}".format(", ".join(missing)))
        if len(sync) < 1 or header.size <= len(sync):
            raise ValueError("the header must start with the sync word and hold more")
        self.counters = new_counters(counter_names)
        self._sync = bytes(sync)
        self._version = version
        self._header = header
        self._crc = crc
        self._crc_function = crc_function
        self._frame_types = dict(frame_types)
        self._buffer = bytearray()
        self._lost_sync = False             # discarding since the last accepted frame

    def feed(self, data):
        """Add bytes (bytes, bytearray or memoryview); return the list of events they complete, in stream order."""
        buf = self._buffer
        buf += data
        events = []
        counters = self.counters
        n = len(buf)
        pos = 0
        # Locals: this loop is the chip's hot path (deploy/bench/chip.py).
        sync = self._sync
        sync_len = len(sync)
        version = self._version
        header_size = self._header.size
        header_unpack = self._header.unpack_from
        crc_size = self._crc.size
        crc_unpack = self._crc.unpack_from
        crc_function = self._crc_function
        frame_types = self._frame_types
        while n - pos >= header_size:
            frame_sync, frame_version, frame_type, body_len = header_unpack(buf, pos)
            if frame_sync != sync:
                found = buf.find(sync, pos + 1)
                if found < 0:
                    keep = sync_prefix_length(buf, sync)
                    self._discard(n - keep - pos)
                    pos = n - keep
                    break
                self._discard(found - pos)
                pos = found
                continue
            kind = frame_types.get(frame_type)
            if frame_version != version or kind is None or not kind[0] <= body_len <= kind[1]:
                counters["bad_headers"] += 1
                self._discard(1)
                pos += 1
                continue
            body_at = pos + header_size
            crc_at = body_at + body_len
            end = crc_at + crc_size
            if end > n:
                break
            if crc_function(buf[pos + sync_len:crc_at]) != crc_unpack(buf, crc_at)[0]:
                counters["crc_errors"] += 1
                self._discard(1)
                pos += 1
                continue
            if not kind[2](self, buf, body_at, body_len, events):
                counters["malformed"] += 1
                self._discard(1)
                pos += 1
                continue
            self._lost_sync = False
            pos = end
        self._buffer = buf[pos:] if pos else buf
        return events



def sync_prefix_length(buf, sync):
    """Length of the longest tail of ``buf`` that could be the start of ``sync``."""
    for length in range(min(len(sync) - 1, len(buf)), 0, -1):
        if buf.endswith(sync[:length]):
            return length
    return 0
