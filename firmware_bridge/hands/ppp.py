"""PPP-style byte stuffing (RFC 1662 section 4.2, as used by the PSYONIC
Ability Hand's serial API): a frame is ``FLAG payload FLAG`` where every
``FLAG`` or ``ESCAPE`` byte inside the payload is sent as ``ESCAPE, byte ^ MASK``.
No CRC is added here; the protocol on top carries its own check.
"""

FLAG = 0x7E
ESCAPE = 0x7D
MASK = 0x20


def stuff(payload):
    """Return ``FLAG + escaped payload + FLAG`` as bytes."""
    out = bytearray([FLAG])
    for byte in bytearray(payload):
        if byte == FLAG or byte == ESCAPE:
            out.append(ESCAPE)
            out.append(byte ^ MASK)
        else:
            out.append(byte)
    out.append(FLAG)
    return bytes(out)


class Unstuffer(object):
    """Incremental deframer: feed bytes, get complete unescaped payloads.

    Bytes before the first FLAG are discarded (we may start listening mid-frame).
    A FLAG both ends a frame and may start the next; empty frames (two FLAGs in
    a row) are skipped.  A payload longer than ``max_payload`` is dropped and
    counted in ``overruns`` so a stream without flags cannot grow memory.
    An ESCAPE followed by FLAG aborts the frame (counted in ``aborts``).
    """

    def __init__(self, max_payload=512):
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._in_frame = False
        self._escaped = False
        self._overflowed = False
        self.overruns = 0
        self.aborts = 0
        self.discarded_bytes = 0

    def feed(self, data):
        """Consume ``data`` (bytes); return the list of complete payloads (bytes)."""
        frames = []
        for byte in bytearray(data):
            if byte == FLAG:
                if self._escaped:
                    self.aborts += 1
                elif self._in_frame and self._buffer and not self._overflowed:
                    frames.append(bytes(self._buffer))
                self._buffer = bytearray()
                self._in_frame = True
                self._escaped = False
                self._overflowed = False
                continue
            if not self._in_frame:
                self.discarded_bytes += 1
                continue
            if byte == ESCAPE:
                self._escaped = True
                continue
            if self._escaped:
                byte ^= MASK
                self._escaped = False
            if self._overflowed:
                continue
            if len(self._buffer) >= self.max_payload:
                self._overflowed = True
                self.overruns += 1
                continue
            self._buffer.append(byte)
        return frames
