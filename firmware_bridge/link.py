"""A serial link that survives the port vanishing: transport apart from protocol.

As pyserial's ``serial.threaded``: a reader thread owns the port and hands the
bytes it reads to a protocol object; the protocol never touches the port::

    class Printer(LinkProtocol):
        def data_received(self, data):
            print(len(data))

    with SerialLink("/dev/ttyACM0", Printer()) as link:   # or a pty path
        link.write(b"...")

A port is a device path: a UART, a USB CDC-ACM device or a pseudo-terminal.
pyserial URLs (``socket://``, ``rfc2217://``, ``spy://``, ``hwgrep://``,
``loop://`` ...) are refused with a UsageError: the first two open TCP
connections, the others files or devices that were never named, while the
device path promises, and the service's sandbox enforces, no network
(``RestrictAddressFamilies=AF_UNIX``, ``IPAddressDeny=any``).  Only code, never
a command line, can let ``loop://`` (bytes written are read back, nothing
leaves the process) through, for tests: ``with allow_url_schemes("loop"):``.
See docs/chip-protocol.md, "Ports".  When the port fails (USB unplug: a
SerialException or OSError, or its path disappears) the thread reports
``connection_lost(exc)``, then reopens it with exponential backoff (bounded by
``backoff_max_s``) and reports ``connection_made(link)`` again.  Counters say how
often.  Writes from any thread go through one lock.  ``close()`` stops the
thread and closes the port (no leaked threads or descriptors).
"""
import contextlib
import os
import threading
import time

from neurohand.firmware_bridge.shared.backoff import Backoff
from neurohand.firmware_bridge.shared.counters import new_counters
from neurohand.firmware_bridge.shared.errors import LinkError, UsageError

PATH_CHECK_INTERVAL_S = 0.5


class LinkProtocol:
    """What a SerialLink reports to; override the methods you need.

    All calls come from the link's reader thread.
    """

    def connection_made(self, link):
        """The port is open (first time or after a reconnect)."""

    def data_received(self, data):
        """``data``: bytes just read (at least one)."""

    def connection_lost(self, exc):
        """The port failed (``exc``) or was closed by ``close()`` (``exc`` is None)."""


#: disconnects: port failures; reconnects: successful reopens after one;
#: open_failures: failed (re)open attempts; write_timeouts: writes that timed out.
LINK_COUNTERS = ("opens", "disconnects", "reconnects", "open_failures", "bytes_read", "bytes_written",
                 "write_timeouts")


class FeedProtocol(LinkProtocol):
    """Hands every chunk read to ``feed(data)`` (a parser's); opens and losses need nothing."""

    def __init__(self, feed):
        self.feed = feed

    def data_received(self, data):
        self.feed(data)


#: pyserial URL schemes that reach nothing outside the process; the only ones
#: :func:`allow_url_schemes` accepts.
IN_PROCESS_SCHEMES = ("loop",)
_allowed_schemes = set()        # none unless allow_url_schemes is in force


def url_scheme(port):
    """The pyserial URL scheme of ``port`` (lower case, as pyserial reads it), or None for a path."""
    lowered = port.lower()
    if "://" not in lowered:
        return None
    return lowered.split("://", 1)[0]


def check_port(name, port):
    """Return ``port`` if it is a device path (or a URL of a scheme allowed in code); else UsageError.

    ``name`` says what the port is for, as the user gave it (``--chip``, ``hand port``).
    """
    if not isinstance(port, str):
        raise UsageError("{} must be a device path, got {!r}".format(name, port))
    if not port.strip():
        raise UsageError("{} is an empty path; give the serial device, e.g. /dev/ttyACM0".format(name))
    if "\x00" in port:
        raise UsageError("{} {!r} contains a NUL character".format(name, port))
    scheme = url_scheme(port)
    if scheme is not None and scheme not in _allowed_schemes:
        raise UsageError("{} {!r} is a pyserial URL ({}://); only serial device paths are opened (e.g. "
                         "/dev/ttyACM0, /dev/pts/3), never a network or other URL port "
                         "(docs/chip-protocol.md)".format(name, port, scheme))
    return port


@contextlib.contextmanager
def allow_url_schemes(*schemes):
    """Within the block, ports may also be URLs of ``schemes`` (only :data:`IN_PROCESS_SCHEMES`).

    For tests that need a port without a device (``loop://``).  No command-line
    option leads here: a deployed decoder opens device paths only.
    """
    wanted = set(scheme.lower() for scheme in schemes)
    outside = sorted(wanted - set(IN_PROCESS_SCHEMES))
    if outside:
        raise ValueError("only in-process URL schemes can be allowed ({}), not {}".format(
            ", ".join(IN_PROCESS_SCHEMES), ", ".join(outside)))
    added = wanted - _allowed_schemes
    _allowed_schemes.update(added)
    try:
        yield
    finally:
        _allowed_schemes.difference_update(added)


def open_serial_port(url, baudrate, read_timeout_s, write_timeout_s, exclusive=False):
    """Open ``url`` with pyserial (``exclusive``: no other process may open it while we hold it).

    ``url`` is a device path; a URL is refused unless allowed (see :func:`check_port`).
    """
    check_port("serial port", url)
    import serial  # pyserial; imported here so that the CLI's --help stays light
    # baudrate None: pyserial's default; a pseudo-terminal or USB CDC-ACM ignores it anyway.
    options = {} if baudrate is None else {"baudrate": baudrate}
    if exclusive:
        options["exclusive"] = True
    return serial.serial_for_url(url, timeout=read_timeout_s, write_timeout=write_timeout_s, **options)


def _write_at_once(port, data):
    """Write what one ``os.write`` takes of ``data`` to a POSIX pyserial port; returns the bytes written.

    pyserial's ``write`` follows every ``os.write`` with a ``select`` for the
    port to be writable again, a second system call that also lets other
    threads take the interpreter lock in between, in the middle of the hand
    command's way out (docs/latency.md, "third pass").  Its port is
    non-blocking, so ``os.write`` takes what fits at once, a whole command
    frame in practice; whatever is left (a full buffer) goes through
    pyserial's write with its timeout.  0 for other ports (test doubles,
    ``loop://``), which pyserial writes.
    """
    if type(port).__module__ != "serial.serialposix" or not port.is_open:
        return 0
    try:
        return os.write(port.fd, data)
    except BlockingIOError:
        return 0


class SerialLink:
    """Own one serial port in a reader thread; see the module docstring.

    url: device path or pty path (a pyserial URL only where :func:`allow_url_schemes`
    allows it; otherwise UsageError here, before anything is opened).  protocol: a LinkProtocol; it
    may be replaced while the link runs (the reader thread looks it up for
    every call), as a chip session does when it starts streaming.
    read_timeout_s bounds each blocking read (how fast close() and a vanished
    path are noticed); write_timeout_s bounds each write.  Reopen attempts wait
    backoff_initial_s, doubling up to backoff_max_s.  ``exclusive``: no other
    process may open the port while the link holds it (a hand must never be
    driven by two runtimes).  open_port(url, baudrate, read_timeout_s,
    write_timeout_s) -> port can be replaced (tests).
    """

    def __init__(self, url, protocol, baudrate=None, read_timeout_s=0.05, write_timeout_s=1.0,
                 backoff_initial_s=0.05, backoff_max_s=2.0, open_port=None, exclusive=False):
        self.url = check_port("serial port", url)
        self.protocol = protocol
        self.baudrate = baudrate
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.backoff = Backoff(backoff_initial_s, backoff_max_s)
        if open_port is None:
            def open_port(url, baudrate, read_timeout_s, write_timeout_s):
                return open_serial_port(url, baudrate, read_timeout_s, write_timeout_s, exclusive)
        self._open_port = open_port
        self.counters = new_counters(LINK_COUNTERS)
        self.error = None                      # exception that stopped the reader thread, if any
        self._port = None
        self._write_lock = threading.Lock()    # guards _port for writers and for replacing it
        self._stop = threading.Event()
        self._thread = None
        self._is_path = "://" not in url

    # -- life cycle --------------------------------------------------------------
    def open(self, wait=False):
        """Open the port and start the reader thread.

        Raises LinkError if the port cannot be opened, unless ``wait``: then the
        thread keeps trying with backoff (for a device not plugged in yet).
        """
        if self._thread is not None:
            raise LinkError("link to {} is already open".format(self.url))
        try:
            self._connect()
        except LinkError:
            if not wait:
                raise
        self._thread = threading.Thread(target=self._run, name="serial-link {}".format(self.url), daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s=2.0):
        """Stop the reader thread and close the port."""
        self._stop.set()
        with self._write_lock:
            port = self._port
        if port is not None and hasattr(port, "cancel_read"):
            try:
                port.cancel_read()
            except Exception:       # the port may be failing at the same moment; the thread will see the stop
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise LinkError("reader thread of {} did not stop within {} s".format(self.url, timeout_s))
        self._drop_port()

    def __enter__(self):
        return self.open() if self._thread is None else self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def connected(self):
        return self._port is not None

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    # -- writing -----------------------------------------------------------------
    def write(self, data):
        """Send all of ``data``; raises LinkError if disconnected or on timeout."""
        import serial
        with self._write_lock:
            port = self._port
            if port is None:
                raise LinkError("cannot write to {}: not connected".format(self.url))
            try:
                written = _write_at_once(port, data)
                if written < len(data):
                    port.write(data[written:])
            except serial.SerialTimeoutException as exc:
                self.counters["write_timeouts"] += 1
                raise LinkError("write to {} timed out after {} s".format(self.url, self.write_timeout_s)) from exc
            except (serial.SerialException, OSError) as exc:
                raise LinkError("write to {} failed: {}".format(self.url, exc)) from exc
            self.counters["bytes_written"] += len(data)

    # -- the reader thread -------------------------------------------------------
    def _connect(self):
        try:
            port = self._open_port(self.url, self.baudrate, self.read_timeout_s, self.write_timeout_s)
        except (OSError, ValueError, ImportError) as exc:   # SerialException is an OSError (IOError)
            self.counters["open_failures"] += 1
            raise LinkError("cannot open serial port {}: {}".format(self.url, exc)) from exc
        with self._write_lock:
            self._port = port
        if self.counters["opens"]:
            self.counters["reconnects"] += 1
        self.counters["opens"] += 1
        self.protocol.connection_made(self)

    def _drop_port(self):
        with self._write_lock:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:       # closing a port whose device is gone can fail; it is gone either way
                pass
        return port is not None

    def _run(self):
        self.backoff.reset()
        last_path_check = time.monotonic()
        try:
            while not self._stop.is_set():
                port = self._port
                if port is None:
                    try:
                        self._connect()
                        self.backoff.reset()
                    except LinkError:
                        self._stop.wait(self.backoff.next_wait())
                    continue
                try:
                    waiting = port.in_waiting
                    data = port.read(waiting or 1)
                    if data and not waiting:
                        # Woken by the first byte of a chunk: take the rest that came with it too, so the
                        # protocol sees the chunk at once, not its first byte and then the rest.
                        waiting = port.in_waiting
                        if waiting:
                            data += port.read(waiting)
                    if not data and self._is_path and time.monotonic() - last_path_check > PATH_CHECK_INTERVAL_S:
                        last_path_check = time.monotonic()
                        if not os.path.exists(self.url):
                            raise OSError("{} disappeared".format(self.url))
                except (OSError, TypeError, AttributeError) as exc:
                    # TypeError/AttributeError: pyserial's read on a port closed under it.
                    if self._stop.is_set():
                        break
                    self.counters["disconnects"] += 1
                    self._drop_port()
                    self.protocol.connection_lost(exc)
                    continue
                if data:
                    self.counters["bytes_read"] += len(data)
                    self.protocol.data_received(data)
        except Exception as exc:       # a bug in the protocol: stop, keep it for the owner
            self.error = exc
            self._drop_port()
            self.protocol.connection_lost(exc)
            return
        if self._drop_port():
            self.protocol.connection_lost(None)
