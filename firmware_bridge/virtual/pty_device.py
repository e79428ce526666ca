"""The device end of a pseudo-terminal, shared by the virtual chip, glove and hand.

A virtual device holds the master side; the host opens the slave path (or the
``link_path`` symlink to it, virtual/port_link.py) as it would a USB serial
port.  :class:`PtyDevice` owns the descriptors, the symlink and the bytes
queued for the host; the device classes built on it own their protocol.

Standard library only (runs on the Jetson's Python 3.6 too).
"""
import errno
import fcntl
import os
import select
import struct
import termios
import tty

from neurohand.firmware_bridge.virtual.port_link import PortLink

#: How long "nothing unread" must hold before a finished device believes the
#: host has read everything: the kernel moves bytes into the reader's queue
#: asynchronously.
DRAIN_SETTLE_S = 0.2
#: Largest single read of the host's bytes, and largest single write to it.
READ_SIZE = 4096
WRITE_SIZE = 65536


class PtyDevice(object):
    """Master side of a pseudo-terminal, plus the optional ``link_path`` symlink.

    ``_out``: bytes queued for the host (a bytearray), written by
    :meth:`_write_out`; ``bytes_written``: bytes written so far, so that a
    host can tell when it has read everything.  ``link_path`` may be set
    after construction, before :meth:`_open_pty`: only a stale link to a
    vanished terminal is replaced, anything else is refused with UsageError,
    and only our own link is removed.
    """

    def __init__(self, link_path=None):
        self.link_path = link_path
        self._link = None               # the PortLink of link_path
        self._master = self._slave = None
        self.slave_path = None
        self._out = bytearray()
        self.bytes_written = 0

    @property
    def connected(self):
        return self._master is not None

    def _open_pty(self):
        """Create the pseudo-terminal (and symlink); return the slave path."""
        master, slave = os.openpty()
        # Raw from the start: bytes written before the host configures the port
        # must not be echoed or translated by the line discipline.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.slave_path = os.ttyname(slave)
        if self.link_path is not None:
            if self._link is None or self._link.path != self.link_path:
                self._link = PortLink(self.link_path)
            try:
                self._link.make(self.slave_path)
            except BaseException:
                self._close_pty()
                raise
        return self.slave_path

    def _close_pty(self):
        # The symlink goes first, so a host reopening it at once cannot reach
        # the dying terminal (as a USB device node vanishes on unplug).
        if self._link is not None:
            self._link.remove()
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def _unplug_pty(self):
        """The cable is pulled: unsent bytes die with the link."""
        self._out = bytearray()
        self._close_pty()

    def unread_bytes(self):
        """Bytes written to the terminal that the host has not read yet."""
        if self._slave is None:
            return 0
        return struct.unpack("i", fcntl.ioctl(self._slave, termios.FIONREAD, b"\0" * 4))[0]

    def _host_has_everything(self):
        return not self._out and not self.unread_bytes()

    def _read_host(self):
        """What the host wrote (bytes, maybe empty)."""
        try:
            return os.read(self._master, READ_SIZE)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR, errno.EIO):
                return b""      # EIO: no host has the terminal open right now
            raise

    def _write_out(self):
        try:
            written = os.write(self._master, bytes(self._out[:WRITE_SIZE]))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return
            raise
        del self._out[:written]
        self.bytes_written += written

    def _exchange(self, timeout_s, on_host_bytes):
        """Wait up to ``timeout_s`` for the host's bytes (handed to ``on_host_bytes``)
        or room to write, then write what is queued."""
        want_write = [self._master] if self._out else []
        readable, _, _ = select.select([self._master], want_write, [], timeout_s)
        if readable:
            data = self._read_host()
            if data:
                on_host_bytes(data)
        if self._out and self.connected:
            self._write_out()


class DrainWatch(object):
    """Once a device's source has ended: has the host read everything, or is it time to stop waiting?

    Closing a pseudo-terminal discards what its reader has not read yet, so a
    finished device waits until nothing was pending for ``settle_s``, at most
    ``timeout_s`` after it finished.
    """

    def __init__(self, timeout_s, settle_s=DRAIN_SETTLE_S):
        self.timeout_s = timeout_s
        self.settle_s = settle_s
        self._finished_at = self._drained_since = None

    def over(self, now, pending):
        """``pending``: the host has not read everything yet."""
        if self._finished_at is None:
            self._finished_at = now
        if pending:
            self._drained_since = None
        elif self._drained_since is None:
            self._drained_since = now
        return (self._drained_since is not None and now - self._drained_since >= self.settle_s) \
            or now - self._finished_at > self.timeout_s
