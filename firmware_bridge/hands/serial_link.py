"""A serial port shared by a writer and one reader thread (after pyserial's
``serial.threaded``): the thread owns reading and feeds bytes to a parser
object; writes go through one lock; I/O errors are kept apart from protocol
errors and reported as :class:`LinkError` naming the port.

Ports are opened with ``serial.serial_for_url``, so ``/dev/ttyUSB0``, a
pseudo-terminal such as ``/dev/pts/5`` and ``loop://`` all work.
"""
import threading

from neurohand.firmware_bridge.shared.errors import LinkError

#: How long the reader blocks per read, so that close() is never kept waiting long.
READ_TIMEOUT_S = 0.05


def open_port(url, baudrate, write_timeout_s):
    """Open ``url`` with pyserial; raise LinkError naming the port on failure."""
    import serial  # pyserial; imported here so that the CLI's --help stays light

    try:
        # exclusive: a second runtime must not be able to drive the same hand.
        return serial.serial_for_url(url, baudrate=baudrate, timeout=READ_TIMEOUT_S,
                                     write_timeout=write_timeout_s, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise LinkError("cannot open hand port {!r}: {}".format(url, exc)) from exc


class SerialLink(object):
    """An open port, a write lock and a reader thread feeding ``parser``.

    Parameters
    ----------
    url : str
        Port name or pyserial URL.
    baudrate : int
        Bits per second (ignored by pseudo-terminals and ``loop://``).
    write_timeout_s : float
        A write that takes longer raises LinkError (a hand that stopped
        draining its input must not block the runtime's writer).
    parser : object or None
        ``parser.feed(data) -> None``, called from the reader thread with
        every chunk of bytes received.  None: incoming bytes are discarded.
    """

    def __init__(self, url, baudrate, write_timeout_s, parser=None):
        self.url = url
        self._port = open_port(url, baudrate, write_timeout_s)
        self._parser = parser
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.read_error = None  # LinkError seen by the reader thread, if any
        self.bytes_received = 0
        self._thread = threading.Thread(target=self._read_loop,
                                        name="hand-reader {}".format(url), daemon=True)
        self._thread.start()

    def write(self, data):
        """Write ``data`` (bytes) completely or raise LinkError."""
        import serial

        if self.read_error is not None:
            raise self.read_error
        with self._write_lock:
            try:
                self._port.write(data)
            except serial.SerialTimeoutException as exc:
                raise LinkError("hand port {!r}: write timed out after {} s (hand not reading?)".format(
                    self.url, self._port.write_timeout)) from exc
            except (serial.SerialException, OSError) as exc:
                raise LinkError("hand port {!r} vanished: {}".format(self.url, exc)) from exc

    def _read_loop(self):
        import serial

        while not self._stop.is_set():
            try:
                data = self._port.read(max(1, self._port.in_waiting))
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                # TypeError/AttributeError: pyserial read racing close() on some versions.
                if not self._stop.is_set():
                    self.read_error = LinkError("hand port {!r} vanished: {}".format(self.url, exc))
                return
            if data:
                self.bytes_received += len(data)
                if self._parser is not None:
                    self._parser.feed(data)

    def close(self):
        """Stop the reader and close the port.  Safe to call twice."""
        self._stop.set()
        try:
            self._port.cancel_read()
        except Exception:  # not every port type can cancel; the read timeout bounds the wait
            pass
        self._thread.join(timeout=1.0)
        with self._write_lock:
            self._port.close()
