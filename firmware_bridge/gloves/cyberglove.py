"""``cyberglove:PORT``: a CyberGlove II/III (CyberGlove Systems) on its serial interface.

Written from the published descriptions of the CyberGlove's binary serial
protocol listed in docs/glove-protocol.md ("CyberGlove"), with what was
assumed where they are silent.  In short, at 115200 baud 8N1:

* ``^C`` (0x03) stops a stream some earlier program may have left running;
* ``?N`` queries the number of enabled sensors (reply ``? N n 0x00``), ``?U``
  whether records carry a glove-status byte (reply ``? U flag 0x00``);
* ``G`` asks for one record: ``G``, one byte per enabled sensor (1..255, 0
  never: it ends the record), the status byte if enabled, then ``0x00``; an
  error (``e`` + code: ``s`` sampling, ``g`` glove unplugged from the
  interface unit) may come before the ``0x00``.

neurohand *polls* with ``G`` at ``rate_hz`` from a thread of its own rather
than letting the glove stream (``S``): the record format carries no sequence
number and no checksum, so a request that gets no reply within
``reply_timeout_s`` is the only exact way to count a lost sample (``lost``),
and the rate is the host's, whatever the glove's stored sample period.
"""
import collections
import threading
import time

from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.gloves.base import GloveSample, GloveSource
from neurohand.firmware_bridge.gloves.calibration import default_sensor_fingers
from neurohand.firmware_bridge.link import LinkProtocol, SerialLink
from neurohand.firmware_bridge.shared.checks import check_number
from neurohand.firmware_bridge.shared.counters import new_counters
from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError
from neurohand.firmware_bridge.shared.framer import Resyncing

# --- wire constants (docs/glove-protocol.md, "CyberGlove") --------------------
BAUDRATE = 115200
CMD_SAMPLE = b"G"                 # one record
CMD_STOP_STREAM = b"\x03"         # ^C: ends an 'S' stream
QUERY = b"?"
QUERY_SENSORS = b"?N"             # enabled sensors -> ? N n 0
QUERY_STATUS_BYTE = b"?U"         # status byte in records? -> ? U 0|1 0
RECORD_START = 0x47               # 'G', the record echoes its command
RECORD_END = 0x00
RECORD_ERROR = 0x65               # 'e' + one code byte, before RECORD_END
ERROR_CODES = {0x73: "sampling error", 0x67: "glove not plugged in"}   # 's', 'g'
MAX_SENSORS = 24                  # the interface unit's sensor mask has 24 bits
DEFAULT_RATE_HZ = 100.0
MAX_RATE_HZ = 150.0               # the CyberGlove II/III's data sheets: 90..150 records/s
SETTLE_S = 0.05                   # after ^C, what still arrives is the old stream's tail

SENSOR_NAMES_22 = (
    "thumb_rotation", "thumb_mcp", "thumb_ip", "thumb_abduction",
    "index_mcp", "index_pip", "index_dip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_index_abduction",
    "ring_mcp", "ring_pip", "ring_dip", "ring_middle_abduction",
    "little_mcp", "little_pip", "little_dip", "little_ring_abduction",
    "palm_arch", "wrist_pitch", "wrist_yaw")
SENSOR_NAMES_18 = (
    "thumb_rotation", "thumb_mcp", "thumb_ip", "thumb_abduction",
    "index_mcp", "index_pip",
    "middle_mcp", "middle_pip", "middle_index_abduction",
    "ring_mcp", "ring_pip", "ring_middle_abduction",
    "little_mcp", "little_pip", "little_ring_abduction",
    "palm_arch", "wrist_pitch", "wrist_yaw")


def sensor_names(n_sensors):
    """The CyberGlove's sensor names for 18 or 22 sensors; ``sensor0``.. otherwise."""
    if n_sensors == 22:
        return list(SENSOR_NAMES_22)
    if n_sensors == 18:
        return list(SENSOR_NAMES_18)
    return ["sensor{}".format(i) for i in range(n_sensors)]


def encode_record(values, status=None, errors=b""):
    """The bytes of a ``G`` record (what a glove, e.g. the virtual one, sends)."""
    values = bytes(bytearray(int(v) for v in values))
    if RECORD_END in bytearray(values):
        raise ValueError("CyberGlove sensor bytes are 1..255; 0 ends a record")
    status_byte = b"" if status is None else bytes(bytearray([status]))
    return bytes(bytearray([RECORD_START])) + values + status_byte + bytes(errors) + bytes(bytearray([RECORD_END]))


def encode_query_reply(query, value):
    """``? X value 0``: the reply to a one-byte query such as ``?N``."""
    return bytes(query) + bytes(bytearray([value, RECORD_END]))


CyberGloveRecord = collections.namedtuple("CyberGloveRecord", "values status error")
CyberGloveRecord.__doc__ = """One record: values (tuple of int 1..255), status (int or None),
error (str or None: the glove's error code, see ERROR_CODES)."""

RECORD_COUNTERS = ("frames", "crc_errors", "resyncs", "framing_errors", "bytes_discarded", "glove_errors")


class CyberGloveParser(Resyncing):
    """Records out of a byte stream, in any chunking.

    A record is ``G``, ``n_sensors`` non-zero bytes, the status byte if
    ``status_byte``, optional ``e`` + code pairs, then 0x00.  Anything else is a
    framing error: the ``G`` is discarded and the search goes on from the next
    byte.  With no checksum, a damaged sensor byte that is not 0 cannot be seen.
    Counters: frames (records with no error), glove_errors (records carrying an
    error; not returned as samples), framing_errors, resyncs, bytes_discarded;
    crc_errors is always 0 (the protocol has no CRC).
    """

    def __init__(self, n_sensors, status_byte=False):
        self.n_sensors = n_sensors
        self.status_byte = bool(status_byte)
        self.counters = new_counters(RECORD_COUNTERS)
        self._buffer = bytearray()
        self._lost_sync = False
        self._body = n_sensors + (1 if status_byte else 0)

    def feed(self, data):
        """Add bytes; return the list of CyberGloveRecord they complete."""
        buf = self._buffer
        buf += data
        records = []
        n = len(buf)
        pos = 0
        while pos < n:
            if buf[pos] != RECORD_START:
                found = buf.find(b"G", pos + 1)
                stop = n if found < 0 else found
                self._discard(stop - pos)
                pos = stop
                continue
            end = self._record_end(buf, pos, n)
            if end is None:
                break                               # incomplete
            if end < 0:
                self.counters["framing_errors"] += 1
                self._discard(1)
                pos += 1
                continue
            values = tuple(buf[pos + 1:pos + 1 + self.n_sensors])
            status = buf[pos + 1 + self.n_sensors] if self.status_byte else None
            error = None
            at = pos + 1 + self._body
            while buf[at] == RECORD_ERROR:
                error = ERROR_CODES.get(buf[at + 1], "error 0x{:02x}".format(buf[at + 1]))
                at += 2
            if error is None:
                self.counters["frames"] += 1
            else:
                self.counters["glove_errors"] += 1
            records.append(CyberGloveRecord(values, status, error))
            self._lost_sync = False
            pos = end
        self._buffer = buf[pos:] if pos else buf
        return records

    def _record_end(self, buf, pos, n):
        """End (exclusive) of the record at ``pos``; None if incomplete; -1 if it is no record."""
        body_end = pos + 1 + self._body
        if n < body_end:
            return None if RECORD_END not in buf[pos + 1:n] else -1
        if RECORD_END in buf[pos + 1:pos + 1 + self.n_sensors]:
            return -1
        at = body_end
        for _ in range(3):                          # at most two error pairs, then the end
            if at >= n:
                return None
            if buf[at] == RECORD_END:
                return at + 1
            if buf[at] != RECORD_ERROR:
                return -1
            if at + 1 >= n:
                return None
            at += 2
        return -1



class _Receiver(LinkProtocol):
    """Before polling: collects bytes for the queries.  Polling: parses records."""

    def __init__(self):
        self.cond = threading.Condition()
        self.buffer = bytearray()
        self.bytes_seen = 0
        self.parser = None
        self.on_records = None

    def data_received(self, data):
        arrival = time.monotonic()
        parser = self.parser
        if parser is None:
            with self.cond:
                self.bytes_seen += len(data)
                self.buffer += data
                del self.buffer[:-4096]     # a chatty wrong device must not grow it without bound
                self.cond.notify_all()
            return
        records = parser.feed(data)
        if records:
            self.on_records(arrival, records)

    def connection_lost(self, exc):
        if self.parser is not None:
            self.parser.flush()


class CyberGloveSource(GloveSource):
    """A CyberGlove on ``port``, open and polled at ``rate_hz``.

    Parameters
    ----------
    port : str, device path
    baudrate : int (115200: the interface unit's default)
    rate_hz : float, polls per second (1..150)
    query_timeout_s : float, wait for each reply while opening
    reply_timeout_s : float or None, a poll unanswered this long counts as lost
        (default: 5 periods, at least 0.2 s)
    stall_timeout_s : float or None (default: 10 periods, at least 0.25 s)

    Raises LinkError (port missing, or silent) or ProtocolError (it answers,
    but not as a CyberGlove).  Extra counters: ``polls`` (G sent),
    ``polls_skipped`` (due while this process was too late to send them),
    ``unsolicited`` (records with no poll waiting), ``write_errors``,
    ``framing_errors``, ``glove_errors``, ``bytes_discarded``.  ``close()`` waits
    up to ``reply_timeout_s`` for the last replies, so its counters are final.
    """

    kind = "cyberglove"

    def __init__(self, port, baudrate=BAUDRATE, rate_hz=DEFAULT_RATE_HZ, query_timeout_s=0.5,
                 reply_timeout_s=None, stall_timeout_s=None):
        super(CyberGloveSource, self).__init__(port)
        self.rate_hz = check_number("CyberGlove rate", rate_hz, minimum=1.0, maximum=MAX_RATE_HZ)
        period = 1.0 / self.rate_hz
        self.reply_timeout_s = max(0.2, 5 * period) if reply_timeout_s is None else reply_timeout_s
        self.stall_timeout_s = max(0.25, 10 * period) if stall_timeout_s is None else stall_timeout_s
        self._query_timeout_s = query_timeout_s
        self._poll_counters = new_counters(("lost", "polls", "polls_skipped", "unsolicited", "write_errors"))
        self._pending = collections.deque()     # send times of polls not answered yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.parser = None
        self._receiver = _Receiver()
        self.link = SerialLink(port, self._receiver, baudrate=baudrate)
        try:
            self.link.open()
        except LinkError as exc:
            raise LinkError("glove at {}: {}".format(port, exc)) from exc
        try:
            self._identify()
        except BaseException:
            self.close()
            raise
        self._started()
        self._thread = threading.Thread(target=self._poll, name="cyberglove-poll {}".format(port), daemon=True)
        self._thread.start()

    # -- opening ---------------------------------------------------------------
    def _identify(self):
        self.link.write(CMD_STOP_STREAM)
        time.sleep(SETTLE_S)
        with self._receiver.cond:
            del self._receiver.buffer[:]
        n_sensors = self._query(QUERY_SENSORS)
        if not 1 <= n_sensors <= MAX_SENSORS:
            raise ProtocolError("device at {} reports {} CyberGlove sensors (1..{} possible); is it a "
                                "CyberGlove?".format(self.port, n_sensors, MAX_SENSORS))
        status_byte = self._query(QUERY_STATUS_BYTE)
        if status_byte not in (0, 1):
            raise ProtocolError("device at {} answers ?U with {}, not 0 or 1; is it a CyberGlove?".format(
                self.port, status_byte))
        self.sensor_names = sensor_names(n_sensors)
        self.sensor_fingers = (default_sensor_fingers(self.kind, n_sensors) if n_sensors in (18, 22) else None)
        self.status_byte = bool(status_byte)
        self.parser = CyberGloveParser(n_sensors, self.status_byte)
        self._receiver.on_records = self._on_records
        self._receiver.parser = self.parser

    def _query(self, query):
        """Send a one-byte query (``?N``); return its value byte."""
        receiver = self._receiver
        with receiver.cond:
            del receiver.buffer[:]
        self.link.write(query)
        deadline = time.monotonic() + self._query_timeout_s
        with receiver.cond:
            while True:
                at = receiver.buffer.find(query)
                if at >= 0 and len(receiver.buffer) >= at + len(query) + 2:
                    value, end = receiver.buffer[at + len(query)], receiver.buffer[at + len(query) + 1]
                    if end != RECORD_END:
                        raise ProtocolError("device at {} answered {!r} with {!r}, not as a CyberGlove".format(
                            self.port, query.decode("ascii"), bytes(receiver.buffer[at:at + 8])))
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                receiver.cond.wait(left)
            seen, data = receiver.bytes_seen, bytes(receiver.buffer)
        if not seen:
            raise LinkError("device at {} did not answer the CyberGlove query {!r} within {:g} s: is the glove "
                            "on, at {} baud?".format(self.port, query.decode("ascii"), self._query_timeout_s,
                                                     BAUDRATE))
        hint = " (it sends neurohand glove frames: use serial:PORT)" if gp.SYNC in data else ""
        raise ProtocolError("device at {} is not a CyberGlove: {} bytes, none of them the answer to {!r}{}".format(
            self.port, seen, query.decode("ascii"), hint))

    # -- polling ---------------------------------------------------------------
    def _poll(self):
        period = 1.0 / self.rate_hz
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set():
            now = time.monotonic()
            self._expire(now)
            due = int((now - t0) / period)
            if due >= k:
                self._poll_counters["polls_skipped"] += due - k
                k = due + 1
                try:
                    with self._lock:
                        self._pending.append(now)
                    self.link.write(CMD_SAMPLE)
                    self._poll_counters["polls"] += 1
                except LinkError:
                    with self._lock:
                        self._pending.pop()
                    self._poll_counters["write_errors"] += 1
            self._stop.wait(max(0.0, t0 + k * period - time.monotonic()))

    def _expire(self, now):
        with self._lock:
            while self._pending and now - self._pending[0] > self.reply_timeout_s:
                self._pending.popleft()
                self._poll_counters["lost"] += 1

    def _on_records(self, arrival, records):
        samples = []
        with self._lock:
            for record in records:
                if self._pending:
                    self._pending.popleft()
                else:
                    self._poll_counters["unsolicited"] += 1
                if record.error is None:
                    samples.append(GloveSample(arrival, None, tuple(float(v) for v in record.values)))
        self._push(samples)

    def _extra_counters(self):
        counters = dict(self.parser.counters) if self.parser is not None else {}
        counters.update(self._poll_counters)
        return counters

    def _before_close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        # Settle the count: the last polls get their reply time, then whatever is
        # still unanswered is lost, so counters read after close() are exact.
        deadline = time.monotonic() + self.reply_timeout_s
        while self._pending and time.monotonic() < deadline and self.link is not None and self.link.connected:
            time.sleep(0.01)
        self._expire(float("inf"))
