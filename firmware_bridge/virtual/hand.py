"""A virtual prosthetic hand on a pseudo-terminal, for bench runs and tests.

It checks every frame the way a real hand would (framing, checksum or CRC,
the 300 ms keep-alive), answers neurohand-protocol commands with telemetry
frames (and PSYONIC commands with variant-2 replies), and records each valid
command with a monotonic and a wall-clock timestamp, in memory and
optionally as JSON lines for later scoring.

Log lines (one JSON object per line, flushed as written)::

    {"event": "start", "protocol": "neurohand", "port": "/dev/pts/7", "keepalive_timeout_s": 0.3, ...}
    {"event": "command", "t_monotonic": 12.345, "t_wall": 1700000000.1, "seq": 17,
     "positions": [thumb, index, middle, ring, little(, thumb_rotation)], "raw": [...]}
    {"event": "keepalive_timeout", "t_monotonic": ..., "t_wall": ..., "since_last_command_s": 0.31}
    {"event": "stop", "counters": {...}}

``positions`` are 0..1 in decoder order for both protocols (PSYONIC frames
are mapped back from the hand's motor order, so their sixth value is the
thumb rotator); ``seq`` is the frame's sequence number, or null for PSYONIC
frames, which carry none.  The keep-alive clock starts with the first valid
command (a hand enters its command mode only then); one timeout is counted
per silence longer than the limit, however long it lasts.

The keep-alive clock and every ``t_monotonic`` are read from ``clock``
(``time.monotonic`` unless another is injected).  A test can inject a clock it
advances itself, then call :meth:`VirtualHand.sync` so that the serving thread
has looked at the advanced clock before it asserts on ``counters["timeouts"]``;
the watchdog then fires after the limit and not before, however loaded the
machine.  Waits (``wait_for``, ``sync``) are bounded by real time.
"""
import collections
import errno
import fcntl
import json
import os
import select
import struct
import termios
import threading
import time

from neurohand.firmware_bridge.shared.errors import LinkError, ProtocolError, UsageError
from neurohand.firmware_bridge.shared.outputs import describe_os_error
from neurohand.firmware_bridge.hands import neurohand_protocol as nhp
from neurohand.firmware_bridge.hands import ppp, psyonic
from neurohand.firmware_bridge.virtual.port_link import PortLink, check_port_link
from neurohand.firmware_bridge.virtual.pty_device import PtyDevice

PROTOCOLS = ("psyonic", "neurohand")
DEFAULT_KEEPALIVE_TIMEOUT_S = 0.3
_POLL_S = 0.01              # how often the keep-alive clock is looked at
_READ_SIZE = 4096

ReceivedCommand = collections.namedtuple("ReceivedCommand", "t_monotonic t_wall seq positions raw")
ReceivedCommand.__doc__ = """One valid command: receive times (s), seq (int or None),
positions (tuple of float, 0..1, decoder order), raw (tuple of int as on the wire)."""


class _PsyonicReceiver(object):
    """Validates PSYONIC position commands; stuffed (PPP) or raw 15-byte frames."""

    def __init__(self, counters, stuffing, address):
        self._counters = counters
        self._unstuffer = ppp.Unstuffer() if stuffing else None
        self._raw = bytearray()
        self._address = address
        self._last_counts = None

    def feed(self, data):
        """Return a list of ``(seq, positions, raw)`` for the valid commands in ``data``."""
        frames = self._unstuffer.feed(data) if self._unstuffer is not None else self._raw_frames(data)
        commands = []
        for frame in frames:
            try:
                address, _, counts = psyonic.decode_position_command(frame)
            except psyonic.ChecksumError:
                self._counters["bad_checksums"] += 1
                continue
            except ProtocolError:
                self._counters["framing_errors"] += 1
                continue
            if address != self._address:
                self._counters["wrong_address"] += 1
                continue
            degrees = [c / psyonic.COUNTS_PER_DEGREE for c in counts]
            fractions = [d / s for d, s in zip(degrees, psyonic.DEFAULT_FULL_SCALE_DEG)]
            self._last_counts = counts
            commands.append((None, tuple(psyonic.motor_fractions_to_decoder(fractions)), counts))
        return commands

    def _raw_frames(self, data):
        # Without stuffing there are no delimiters: a frame is 15 bytes that start
        # with our address and a position command byte and sum to zero.
        self._raw.extend(data)
        frames = []
        length = psyonic.COMMAND_LENGTH
        while len(self._raw) >= length:
            candidate = bytes(self._raw[:length])
            if (candidate[0] == self._address
                    and candidate[1] - psyonic.POSITION_COMMAND in psyonic.REPLY_VARIANTS
                    and sum(bytearray(candidate)) & 0xFF == 0):
                frames.append(candidate)
                del self._raw[:length]
            else:
                self._counters["framing_errors"] += 1
                del self._raw[:1]
        return frames

    def reply(self, seq, positions):
        """A variant-2 reply echoing the commanded motor positions as measured."""
        degrees = [c / psyonic.COUNTS_PER_DEGREE for c in self._last_counts]
        return psyonic.encode_reply(degrees, [0.0] * 6, [0.0] * 6, 0, 2,
                                    stuffing=self._unstuffer is not None)


class _NeurohandReceiver(object):
    """Validates neurohand-protocol commands and builds telemetry replies."""

    def __init__(self, counters):
        self._counters = counters
        self._parser = nhp.StreamParser()
        self._reported_bad = 0
        self._bad_headers_counted = 0
        self.watchdog_expired = False

    def feed(self, data):
        commands = []
        for frame in self._parser.feed(data):
            if isinstance(frame, nhp.CommandFrame):
                raw = tuple(nhp.quantise(frame.positions))
                commands.append((frame.seq, frame.positions, raw))
            else:
                self._counters["framing_errors"] += 1  # a hand never receives telemetry
        self._counters["bad_checksums"] = self._parser.bad_crc
        self._counters["framing_errors"] += self._parser.bad_header - self._bad_headers_counted
        self._bad_headers_counted = self._parser.bad_header
        return commands

    def reply(self, seq, positions):
        bad = self._parser.bad_crc + self._parser.bad_header
        flags = 0
        if bad != self._reported_bad:
            flags |= nhp.FLAG_BAD_FRAMES
            self._reported_bad = bad
        if self.watchdog_expired:
            flags |= nhp.FLAG_WATCHDOG_EXPIRED
            self.watchdog_expired = False
        # A virtual hand reaches its target at once and runs cool.
        return nhp.encode_telemetry(seq, positions, flags, temperature_c=30.0, current_a=0.0)


class VirtualHand(PtyDevice):
    """A hand on a pseudo-terminal.  ``start()``, connect a driver to ``slave_path``, ``stop()``.

    Parameters
    ----------
    protocol : str
        "psyonic" or "neurohand".
    link_path : str or None
        Also make this symlink to the slave.  Only a stale link to a vanished
        pseudo-terminal is replaced; anything else there is refused (UsageError).
        Removed on unplug and stop only while it still points to this hand's
        terminal (see :mod:`neurohand.firmware_bridge.virtual.port_link`).
    log_path : str or None
        Append JSON lines here.  If the log cannot be written any more (a full
        disk), logging stops, ``counters["log_errors"]`` and ``log_error`` say
        so, ``on_log_error(message)`` is called (from the serving thread), and
        the hand goes on serving.
    keepalive_timeout_s : float
        Silence after a valid command that counts as one keep-alive timeout.
    stuffing : bool
        PSYONIC only: expect PPP-stuffed frames (the default) or raw ones.
    address : int
        PSYONIC only: the hand's address byte.
    reply : bool
        Send telemetry/replies after each valid command.
    clock : callable
        Returns seconds (float) on a monotonic clock; the keep-alive watchdog and
        the ``t_monotonic`` timestamps use it.  Default ``time.monotonic``.
    on_log_error : callable or None
        Called once with a one-line message when the log cannot be written.

    Counters: valid_frames, bad_checksums, framing_errors, timeouts,
    replies_sent, replies_dropped, bytes_received, unplugs (wrong_address for PSYONIC).

    :meth:`unplug` and :meth:`replug` simulate a cable glitch: the terminal
    vanishes, then a new one appears behind the same ``link_path``.
    """

    def __init__(self, protocol, link_path=None, log_path=None,
                 keepalive_timeout_s=DEFAULT_KEEPALIVE_TIMEOUT_S, stuffing=True,
                 address=psyonic.DEFAULT_ADDRESS, reply=True, clock=time.monotonic, on_log_error=None):
        if protocol not in PROTOCOLS:
            from neurohand.firmware_bridge.shared.checks import check_option
            check_option("protocol", protocol, PROTOCOLS)
        if not keepalive_timeout_s > 0:
            raise UsageError("keepalive timeout must be > 0 s, got {!r}".format(keepalive_timeout_s))
        PtyDevice.__init__(self, link_path)
        self.protocol = protocol
        self.log_path = log_path
        self.keepalive_timeout_s = float(keepalive_timeout_s)
        self.stuffing = stuffing
        self.address = address
        self.reply = reply
        self._clock = clock
        self.on_log_error = on_log_error
        self.counters = {"valid_frames": 0, "bad_checksums": 0, "framing_errors": 0, "timeouts": 0,
                         "replies_sent": 0, "replies_dropped": 0, "bytes_received": 0, "unplugs": 0}
        self._commands = []
        self._condition = threading.Condition()
        self._wake_r = self._wake_w = None
        self._thread = None
        self._stop = threading.Event()
        self._log = None
        self.log_error = None       # why the log stopped being written (a full disk ...), or None
        self._receiver = None
        self._passes = 0            # serving-thread passes completed (see sync)

    # -- life cycle -------------------------------------------------------
    def start(self):
        """Open the pseudo-terminal and start serving; returns self."""
        if self._thread is not None:
            raise UsageError("virtual hand already started")
        if self.protocol == "psyonic":
            self.counters["wrong_address"] = 0
        if self.link_path is not None:
            self._link = PortLink(self.link_path)
            # Before the log is opened (which creates it): a refused link leaves nothing behind.
            check_port_link(self._link.name, self._link.path)
        try:
            if self.log_path is not None:
                self._log = _open_log(self.log_path)
            self._plug()
        except Exception:
            self._close_fds()
            raise
        self._write_log({"event": "start", "protocol": self.protocol, "port": self.slave_path,
                         "link": self.link_path, "keepalive_timeout_s": self.keepalive_timeout_s,
                         "t_monotonic": self._clock(), "t_wall": time.time()})
        return self

    def stop(self):
        """Stop serving, close the terminal (a connected driver sees its port vanish)."""
        if self._thread is None and self._master is None:
            return
        self._unplug()
        self._write_log({"event": "stop", "counters": dict(self.counters),
                         "t_monotonic": self._clock(), "t_wall": time.time()})
        self._close_fds()

    def unplug(self):
        """Pull the cable: the terminal and its symlink vanish (a connected driver's
        writes fail).  What was received so far and the counters are kept."""
        if self._thread is None:
            raise UsageError("virtual hand is not plugged in")
        self._unplug()
        self.counters["unplugs"] += 1
        self._write_log({"event": "unplug", "t_monotonic": self._clock(), "t_wall": time.time()})

    def replug(self):
        """Plug the cable back: a new pseudo-terminal, the same ``link_path`` symlink
        (as a udev name), so a driver reopening that path reaches the hand again.
        The keep-alive clock starts again with the first valid command."""
        if self._thread is not None:
            raise UsageError("virtual hand is already plugged in")
        self._plug()
        self._write_log({"event": "replug", "port": self.slave_path, "t_monotonic": self._clock(),
                         "t_wall": time.time()})

    def _plug(self):
        # A fresh receiver: a frame cut by the unplug must not be glued to the next one.
        if self.protocol == "psyonic":
            self._receiver = _PsyonicReceiver(self.counters, self.stuffing, self.address)
        else:
            self._receiver = _NeurohandReceiver(self.counters)
        self._open_pty()
        try:
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._close_pty()
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(self._receiver,),
                                        name="virtual-hand", daemon=True)
        self._thread.start()

    def _unplug(self):
        if self._thread is not None:
            self._stop.set()
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        self._close_pty_fds()

    def _close_pty_fds(self):
        self._close_pty()       # the symlink first, as a device node vanishes on unplug
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _close_fds(self):
        self._close_pty_fds()
        if self._log is not None:
            try:
                self._log.close()
            except OSError as exc:      # the last buffered line met a full disk
                self._log_failed(exc)
            self._log = None

    # -- received commands ------------------------------------------------
    def received(self):
        """Snapshot list of ReceivedCommand, oldest first (safe from any thread)."""
        with self._condition:
            return list(self._commands)

    def wait_for(self, count, timeout_s):
        """Block until at least ``count`` commands arrived; return whether they did."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while len(self._commands) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return True

    def sync(self, timeout_s=5.0):
        """Block until the serving thread completed a whole pass that began after
        this call: it looked at the clock (so a timeout due by then is counted)
        and read and handled what was waiting on the terminal (up to one read).
        Return whether it did within ``timeout_s`` (real time); False at once when
        not plugged in."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            if self._thread is None:
                return False
            # The pass under way may have looked at the clock before this call.
            target = self._passes + 2
            while self._passes < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None:
                    return False
                self._condition.wait(min(remaining, 0.1))
            return True

    def unread_bytes(self):
        """Bytes the driver wrote to the terminal that the hand has not read yet
        (the other direction from a streaming device's: here the host writes)."""
        if self._master is None:
            return 0
        return struct.unpack("i", fcntl.ioctl(self._master, termios.FIONREAD, b"\0" * 4))[0]

    # -- serving thread -----------------------------------------------------
    def _serve(self, receiver):
        state = {"last_valid": None, "timed_out": False}
        while not self._stop.is_set():
            try:
                self._serve_once(receiver, state)
            finally:
                with self._condition:
                    self._passes += 1
                    self._condition.notify_all()

    def _serve_once(self, receiver, state):
        """One pass: wait for input (at most _POLL_S), look at the keep-alive clock, read and handle."""
        ready, _, _ = select.select([self._master, self._wake_r], [], [], _POLL_S)
        now = self._clock()
        last_valid = state["last_valid"]
        # Look at the clock before reading: a frame arriving late still means a timeout happened.
        if last_valid is not None and not state["timed_out"] and now - last_valid > self.keepalive_timeout_s:
            state["timed_out"] = True
            self.counters["timeouts"] += 1
            if self.protocol == "neurohand":
                receiver.watchdog_expired = True
            self._write_log({"event": "keepalive_timeout", "t_monotonic": now, "t_wall": time.time(),
                             "since_last_command_s": now - last_valid})
        if self._master not in ready:
            return
        data = self._read_master()
        if not data:
            return
        self.counters["bytes_received"] += len(data)
        for seq, positions, raw in receiver.feed(data):
            t_mono, t_wall = self._clock(), time.time()
            state["last_valid"], state["timed_out"] = t_mono, False
            command = ReceivedCommand(t_mono, t_wall, seq, tuple(positions), tuple(raw))
            with self._condition:
                self._commands.append(command)
                self.counters["valid_frames"] += 1
                self._condition.notify_all()
            self._write_log({"event": "command", "t_monotonic": t_mono, "t_wall": t_wall, "seq": seq,
                             "positions": list(command.positions), "raw": list(raw)})
            if self.reply:
                self._send_reply(receiver.reply(seq, positions))

    def _read_master(self):
        try:
            return os.read(self._master, _READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open right now; wait for one
                time.sleep(_POLL_S)
                return b""
            raise LinkError("virtual hand terminal {!r}: {}".format(self.slave_path, exc)) from exc

    def _send_reply(self, frame):
        try:
            os.write(self._master, frame)
            self.counters["replies_sent"] += 1
        except BlockingIOError:
            # Nobody reads the replies (e.g. a driver that never polls): a real
            # hand would drop them too rather than stall.
            self.counters["replies_dropped"] += 1

    def _write_log(self, record):
        log = self._log         # the serving thread and start() both write; _log_failed may clear it
        if log is None:
            return
        try:
            log.write(json.dumps(record) + "\n")
            log.flush()
        except OSError as exc:
            self._log_failed(exc)

    def _log_failed(self, exc):
        # A hand goes on serving when its log cannot be written (a full disk):
        # the driver under test must not see a dead hand because of the bench's
        # disk.  The log stops there; the counter and ``log_error`` say why.
        log, self._log = self._log, None
        if log is None:
            return              # the other thread met the same failure first
        self.counters["log_errors"] = self.counters.get("log_errors", 0) + 1
        self.log_error = "cannot write the log {!r}: {}; logging stopped, the hand goes on".format(
            self.log_path, describe_os_error(exc))
        if self.on_log_error is not None:
            self.on_log_error(self.log_error)
        try:
            log.close()
        except OSError:
            pass  # the unwritten tail is lost either way


def _open_log(path):
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise UsageError("--log {!r}: cannot open it to append ({})".format(path, describe_os_error(exc))) from None
