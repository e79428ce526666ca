"""A virtual data glove on a pseudo-terminal: a recording's finger labels played
as a neurohand serial glove or as a CyberGlove (docs/glove-protocol.md).

Labels (0 = open .. 1 = flexed per finger) become raw sensor counts through a
fixed linear map per sensor (:data:`SENSOR_MAPS`, documented in the spec under
"Virtual glove"), so the calibration a host fits on the open hand and the fist
recovers them; :func:`virtual_calibration` is that calibration, exactly.

Timing, as the virtual chip's: label row j (time j / rate in the recording) is
due at ``start + j / (rate * speed)`` on the monotonic clock.  ``start`` is the
moment the pseudo-terminal opens, or ``start_at`` (a ``time.monotonic()``
value: on Linux every process reads the same clock) so that a bench can start
the virtual chip and the virtual glove at the same instant.

* serial protocol: the glove streams data frame j when row j is due, whether a
  host listens or not (as a glove does), with a hello at every (re)plug and
  every ``hello_period_s``; before ``start`` it only says hello.
* CyberGlove protocol: the glove answers each ``G`` with the row due at that
  moment (the hand's posture now), and the queries ``?N``, ``?U``, ``?S``.

Faults reuse the virtual chip's FaultInjector (drops, CRC-breaking corruption,
garbage bursts), plus an unplug (``disconnect_after_s``; like a bus-powered
glove it restarts, sequence 0 and a hello, after the replug) and a stall
(``stall_after_s``: the firmware freezes, nothing is sent and nothing answered,
for ``stall_for_s`` or for good).  A CyberGlove record has no checksum, so its
corruption could not be detected: it is refused.

Standard library and numpy only (runs on the Jetson's Python 3.6 too).
"""
import time

import numpy as np

from neurohand.firmware_bridge.gloves import cyberglove as cg
from neurohand.firmware_bridge.gloves import protocol as gp
from neurohand.firmware_bridge.gloves.calibration import (
    CYBERGLOVE_22_FINGERS, FINGERS, GloveCalibration, default_sensor_fingers)
from neurohand.firmware_bridge.shared.checks import check_number, check_option
from neurohand.firmware_bridge.shared.counters import new_counters
from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
from neurohand.firmware_bridge.virtual.chip import FaultInjector, PacingScheduler
from neurohand.firmware_bridge.virtual.pty_device import DrainWatch, PtyDevice

PROTOCOLS = ("serial", "cyberglove")
#: What a glove's transmit buffer holds when its host does not read (bytes
#: unread on the terminal); beyond it frames are dropped, as on a USB device.
UNREAD_LIMIT_BYTES = 4096
VIRTUAL_NAME = "nh-virtual-glove"

# --- the linear map label -> raw counts (docs/glove-protocol.md, "Virtual glove") ----
SERIAL_OPEN_COUNTS = 200
SERIAL_FLEXED_COUNTS = 800
CYBERGLOVE_OPEN_COUNTS = 40
CYBERGLOVE_FLEXED_COUNTS = 200
CYBERGLOVE_IDLE_COUNTS = 128      # sensors of no finger (abduction, palm arch, wrist) stay here


def _sensor_map(protocol):
    """(sensor_names, sensor_fingers, open counts, flexed counts, idle counts) of the virtual glove."""
    if protocol == "serial":
        n = gp.DEFAULT_N_CHANNELS
        names = ["flex{}".format(i) for i in range(n)]
        fingers = default_sensor_fingers("serial", n)
        return names, fingers, np.full(n, SERIAL_OPEN_COUNTS, float), np.full(n, SERIAL_FLEXED_COUNTS, float), \
            np.full(n, SERIAL_OPEN_COUNTS, float)
    names = cg.sensor_names(22)
    fingers = {f: list(s) for f, s in CYBERGLOVE_22_FINGERS.items()}
    return names, fingers, np.full(22, CYBERGLOVE_OPEN_COUNTS, float), \
        np.full(22, CYBERGLOVE_FLEXED_COUNTS, float), np.full(22, CYBERGLOVE_IDLE_COUNTS, float)


def labels_to_raw(labels, protocol):
    """Finger labels, array (n, 5) in 0..1 (FINGERS order) -> raw counts, int array (n, n_sensors).

    Sensor s of finger f: ``round(open + label_f * (flexed - open))``; sensors of
    no finger read their idle value.
    """
    check_option("glove protocol", protocol, PROTOCOLS)
    labels = np.clip(np.asarray(labels, dtype=np.float64).reshape(-1, len(FINGERS)), 0.0, 1.0)
    names, fingers, open_counts, flexed_counts, idle = _sensor_map(protocol)
    raw = np.tile(idle, (labels.shape[0], 1))
    for column, finger in enumerate(FINGERS):
        for s in fingers[finger]:
            raw[:, s] = open_counts[s] + labels[:, column] * (flexed_counts[s] - open_counts[s])
    return np.round(raw).astype(np.int64)


def virtual_calibration(protocol):
    """The GloveCalibration that inverts :func:`labels_to_raw` exactly (up to rounding)."""
    check_option("glove protocol", protocol, PROTOCOLS)
    names, fingers, open_counts, flexed_counts, idle = _sensor_map(protocol)
    open_raw = idle.copy()
    for finger in FINGERS:
        open_raw[fingers[finger]] = open_counts[fingers[finger]]
    flexed = {f: flexed_counts[fingers[f]] for f in FINGERS}
    return GloveCalibration(fingers, open_raw, flexed, names, ("virtual",))


def recording_labels(recording, stream=None):
    """(labels (n, 5) float in FINGERS order, rate Hz, stream name) of a recording's finger label stream.

    ``stream`` None: the one stream whose columns include every finger name.
    """
    streams = recording.label_streams
    if stream is None:
        candidates = [name for name, s in streams.items() if set(FINGERS) <= set(s.names)]
        if not candidates:
            raise RecordingError("{} has no label stream with the finger columns {} (streams: {})".format(
                recording.path, ", ".join(FINGERS), ", ".join(streams) or "none"))
        if len(candidates) > 1:
            raise UsageError("{} has several finger label streams ({}); choose one with --stream".format(
                recording.path, ", ".join(candidates)))
        stream = candidates[0]
    if stream not in streams:
        check_option("label stream", stream, sorted(streams))
    s = streams[stream]
    missing = [f for f in FINGERS if f not in s.names]
    if missing:
        raise RecordingError("label stream {!r} of {} has no column {!r}".format(stream, recording.path, missing[0]))
    if s.data.shape[0] == 0:
        raise RecordingError("label stream {!r} of {} is empty".format(stream, recording.path))
    labels = np.asarray(s.data[:, [s.names.index(f) for f in FINGERS]], dtype=np.float64)
    if not np.all(np.isfinite(labels)):
        raise RecordingError("label stream {!r} of {} holds non-finite labels".format(stream, recording.path))
    return labels, float(s.rate), stream


def glove_faults(protocol, drop_rate=0.0, corrupt_rate=0.0, garbage_probability=0.0, garbage_max_bytes=64,
                 seed=None):
    """The virtual chip's FaultInjector for ``protocol``'s frames: garbage never holds the
    glove's own frame start, so a burst never forges a frame and every fault is
    countable (UsageError: corruption of a CyberGlove, which nobody could detect)."""
    check_option("glove protocol", protocol, PROTOCOLS)
    if protocol == "cyberglove" and corrupt_rate:
        raise UsageError("a CyberGlove record has no checksum, so a corrupted byte could never be counted; "
                         "use --drop-rate or --garbage-bursts with --protocol cyberglove")
    # A CyberGlove's garbage must hold no 'G' (a record start) and no 0 (a record end).
    forbidden = (gp.SYNC,) if protocol == "serial" else (b"G", b"\x00")
    return FaultInjector(drop_rate, corrupt_rate, garbage_probability, garbage_max_bytes, seed, sync=forbidden,
                         header_size=gp.HEADER_SIZE)


GLOVE_COUNTERS = ("frames_sent", "hellos_sent", "polls_answered", "queries_answered", "unknown_commands",
                  "frames_unread_dropped", "frames_lost_unplugged", "frames_stalled", "polls_stalled",
                  "host_bytes_ignored", "disconnects", "loops")


class VirtualGlove(PtyDevice):
    """A glove on a pseudo-terminal, playing ``labels``; see the module docstring.

    Parameters
    ----------
    labels : array (n_rows, 5), 0..1 per finger in FINGERS order
    label_rate_hz : float, rows per second
    protocol : "serial" or "cyberglove"
    speed : float, playback speed factor
    loop : bool, start again at row 0 after the last
    start_at : float or None, ``time.monotonic()`` of row 0 (None: when the terminal first opens)
    faults : FaultInjector (see :func:`glove_faults`) or None
    disconnect_after_s, reconnect_pause_s : an unplug after this long open, and its length
    stall_after_s, stall_for_s : a firmware freeze this long after ``start``, for this long (None: for good)
    link_path : str or None, a symlink to the terminal (virtual/port_link.py rules)
    on_port : callable(slave_path), called at each (re)plug
    clock : the glove's clock (``time.monotonic``); everything timed reads it

    The constructor only stores; :meth:`open` makes the terminal, :meth:`serve`
    runs the loop in the caller's thread, :meth:`close` ends it.
    """

    def __init__(self, labels, label_rate_hz, protocol="serial", speed=1.0, loop=False, start_at=None,
                 faults=None, disconnect_after_s=None, reconnect_pause_s=1.0, stall_after_s=None, stall_for_s=None,
                 link_path=None, on_port=None, clock=time.monotonic, hello_period_s=gp.HELLO_PERIOD_S):
        PtyDevice.__init__(self, link_path)
        self.protocol = check_option("glove protocol", protocol, PROTOCOLS)
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim != 2 or labels.shape[1] != len(FINGERS) or labels.shape[0] == 0:
            raise UsageError("labels must be (n_rows, {}) with at least one row, got shape {}".format(
                len(FINGERS), labels.shape))
        self.raw = labels_to_raw(labels, protocol)
        if protocol == "cyberglove":
            self.raw = np.clip(self.raw, 1, 255)
        self.label_rate_hz = check_number("label rate", label_rate_hz, minimum=0, exclusive_minimum=True)
        if protocol == "serial" and round(self.label_rate_hz) > gp.MAX_RATE_HZ:
            raise UsageError("the serial glove protocol carries at most {} Hz, the labels are {:g} Hz".format(
                gp.MAX_RATE_HZ, self.label_rate_hz))
        self.speed = check_number("speed", speed, minimum=0, exclusive_minimum=True)
        self.loop = bool(loop)
        self.start_at = start_at
        if protocol == "cyberglove" and faults is not None and faults.corrupt_rate:
            raise UsageError("a CyberGlove record has no checksum; corruption cannot be injected countably")
        self.faults = faults
        self.disconnect_after_s = disconnect_after_s
        self.reconnect_pause_s = reconnect_pause_s
        self.stall_after_s = stall_after_s
        self.stall_for_s = stall_for_s
        self.on_port = on_port
        self.hello_period_s = hello_period_s
        self._clock = clock
        self.counters = new_counters(GLOVE_COUNTERS)
        self.finished = False
        self._scheduler = None
        self._row = 0                     # next row (serial)
        self._sequence = 0
        self._next_hello = None
        self._connected_at = None
        self._replug_at = None
        self._unplugged_once = False
        self._query_pending = False       # CyberGlove: a '?' waits for its second byte

    # -- the rows ----------------------------------------------------------------
    @property
    def n_rows(self):
        return self.raw.shape[0]

    @property
    def row_period_s(self):
        return 1.0 / (self.label_rate_hz * self.speed)

    def _elapsed(self, now):
        return now - self.start_at

    def _stalled(self, now):
        if self.stall_after_s is None:
            return False
        since = self._elapsed(now) - self.stall_after_s
        return since >= 0 and (self.stall_for_s is None or since < self.stall_for_s)

    def row_at(self, now):
        """The row due at ``now`` (the posture a CyberGlove reports then); None after the end."""
        row = int(np.floor(self._elapsed(now) / self.row_period_s))
        if row < 0:
            return 0
        if row >= self.n_rows:
            return row % self.n_rows if self.loop else None
        return row

    # -- the terminal ---------------------------------------------------------------
    def open(self):
        """Create the pseudo-terminal (and symlink); return the slave path."""
        self._open_pty()
        now = self._clock()
        self._connected_at = now
        if self.start_at is None:
            self.start_at = now
        if self._scheduler is None and self.protocol == "serial":
            self._scheduler = PacingScheduler(self.row_period_s, self._clock)
            self._scheduler.start(at=self.start_at)
        # A (re)plugged glove boots: new stream, and it says hello first.
        self._sequence = 0
        self._next_hello = now
        self._query_pending = False
        if self.faults is not None:
            self.faults.stream_restarted()
        if self.on_port is not None:
            self.on_port(self.slave_path)
        return self.slave_path

    def close(self):
        self._close_pty()

    # -- sending -------------------------------------------------------------------
    def _send(self, data, counter=None):
        """Queue ``data`` unless the host left too much unread (then it is dropped, counted)."""
        if not data:
            return
        if len(self._out) + self.unread_bytes() > UNREAD_LIMIT_BYTES:
            self.counters["frames_unread_dropped"] += 1
            return
        self._out += data
        if counter is not None:
            self.counters[counter] += 1

    def _through_faults(self, frame):
        """(bytes to send, whether the frame itself goes out, intact or corrupted)."""
        if self.faults is None:
            return frame, True
        dropped = self.faults.counters["frames_dropped"]
        data = self.faults.apply(frame)
        return data, self.faults.counters["frames_dropped"] == dropped

    def _serial_tick(self, now):
        if self._next_hello is not None and now >= self._next_hello and self.connected and not self._stalled(now):
            hello = gp.GloveHello(gp.DEFAULT_N_CHANNELS, int(round(self.label_rate_hz * self.speed)),
                                  gp.DEFAULT_ADC_BITS, VIRTUAL_NAME)
            self._send(gp.encode_hello(hello), "hellos_sent")   # hellos bypass the faults: they are the hand-shake
            if self.faults is not None:
                self.faults.intact_frame_passed()
            self._next_hello = now + self.hello_period_s
        for _ in range(self._scheduler.take_due(now)):
            if self._row >= self.n_rows:
                if not self.loop:
                    self.finished = True
                    return
                self._row = 0
                self.counters["loops"] += 1
            row = self._row
            self._row += 1
            if self._stalled(self.start_at + row * self.row_period_s):
                self.counters["frames_stalled"] += 1
                continue
            frame = gp.encode_data(self._sequence, self.raw[row])
            self._sequence = (self._sequence + 1) % gp.SEQUENCE_MODULUS
            if not self.connected:
                self.counters["frames_lost_unplugged"] += 1
                continue
            data, sent = self._through_faults(frame)
            self._send(data, "frames_sent" if sent else None)
        if self._row >= self.n_rows and not self.loop:
            self.finished = True

    def _handle_host_bytes(self, data):
        now = self._clock()
        if self.protocol == "serial":
            self.counters["host_bytes_ignored"] += len(data)      # this glove never listens
            return
        for byte in bytearray(data):
            if self._query_pending:
                self._query_pending = False
                self._answer_query(byte, now)
            elif byte == cg.QUERY[0]:
                self._query_pending = True
            elif byte == cg.CMD_SAMPLE[0]:
                self._answer_poll(now)
            elif byte == cg.CMD_STOP_STREAM[0]:
                pass                                               # not streaming: nothing to stop
            else:
                self.counters["unknown_commands"] += 1
                self._send(b"e?")

    def _answer_query(self, byte, now):
        if self._stalled(now):
            return
        values = {ord("N"): self.raw.shape[1], ord("S"): self.raw.shape[1], ord("U"): 0}
        if byte not in values:
            self.counters["unknown_commands"] += 1
            self._send(b"e?")
            return
        self._send(cg.encode_query_reply(cg.QUERY + bytes(bytearray([byte])), values[byte]), "queries_answered")

    def _answer_poll(self, now):
        if self._stalled(now):
            self.counters["polls_stalled"] += 1
            return
        row = self.row_at(now)
        if row is None:
            self.finished = True
            return
        data, sent = self._through_faults(cg.encode_record(self.raw[row]))
        self._send(data, "polls_answered" if sent else None)

    # -- the loop --------------------------------------------------------------------
    def serve(self, stop_event, drain_timeout_s=2.0):
        """Run until ``stop_event`` is set, or the labels ended (without loop) and
        the host read everything (or ``drain_timeout_s`` passed)."""
        if not self.connected and self._replug_at is None:
            self.open()
        drain = DrainWatch(drain_timeout_s)
        while not stop_event.is_set():
            now = self._clock()
            self._maybe_unplug_or_replug(now)
            if self.protocol == "serial" and not self.finished:
                self._serial_tick(now)
            elif self.protocol == "cyberglove" and not self.finished and self.row_at(now) is None:
                self.finished = True
            if self.finished and drain.over(now, not self._host_has_everything()):
                return
            timeout = 0.05
            if self.protocol == "serial" and not self.finished:
                timeout = min(timeout, max(0.0, self._scheduler.seconds_until_next()))
                if self._next_hello is not None:
                    timeout = min(timeout, max(0.0, self._next_hello - now))
            if not self.connected:
                if self._replug_at is not None:
                    timeout = min(timeout, max(0.0, self._replug_at - now))
                stop_event.wait(timeout)
                continue
            self._exchange(timeout, self._handle_host_bytes)

    def _maybe_unplug_or_replug(self, now):
        if self._replug_at is not None and now >= self._replug_at:
            if self.protocol == "serial" and not self.finished:
                self._serial_tick(self._replug_at)      # rows due before the replug died with the link
            self._replug_at = None
            self.open()
        elif (self.connected and self.disconnect_after_s is not None and not self._unplugged_once
              and now - self._connected_at >= self.disconnect_after_s):
            self._unplugged_once = True
            self.counters["disconnects"] += 1
            self._unplug_pty()
            self._replug_at = now + self.reconnect_pause_s

    def summary(self):
        """Counters of the glove and of injected faults, and the start time, as one dict."""
        result = {"glove": dict(self.counters), "protocol": self.protocol, "start_at": self.start_at}
        if self.faults is not None:
            result["faults"] = dict(self.faults.counters)
        return result
