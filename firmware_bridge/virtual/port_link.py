"""The ``--port PATH`` symlink of a virtual device: a fixed name for its pseudo-terminal.

A symlink here must never cost the user a file.  The rule, for the virtual
chip and the virtual hand alike:

* nothing at PATH: the symlink is created;
* a *stale* symlink at PATH, one to a pseudo-terminal (``/dev/pts/N``) that
  no longer exists, as a crashed or killed run leaves behind: it is replaced;
* anything else at PATH (a regular file, a directory, a symlink to anything
  else, including a pseudo-terminal still open, which may be another virtual
  device's or someone's shell): refused in one line, and left alone;
* on unplug and on exit only the symlink this process made is removed, and
  only while it still points to this process's pseudo-terminal.

The check runs before the device opens (``check_port_link``) and again each
time the link is made (a replug), since something may appear meanwhile.
"""
import binascii
import os
import re

from neurohand.firmware_bridge.shared.checks import check_path_text
from neurohand.firmware_bridge.shared.errors import LinkError, UsageError
from neurohand.firmware_bridge.shared.outputs import describe_os_error, kernel_tree

#: The slave side of a Unix 98 pseudo-terminal (Linux, where the devices run).
_PTY_SLAVE = re.compile(r"^/dev/pts/[0-9]+$")
#: Kernel interfaces, where a symlink has no business (the ``/dev`` of udev names is allowed).
_KERNEL_TREES = ("/proc", "/sys")


def is_stale_pty_link(path):
    """True if ``path`` is a symlink to a pseudo-terminal slave that no longer exists."""
    try:
        target = os.readlink(path)
    except OSError:
        return False
    return bool(_PTY_SLAVE.match(target)) and not os.path.lexists(target)


def check_port_link(name, path):
    """Return ``path`` (absolute) if a port symlink may be made there; else raise UsageError.

    ``name`` is the option as typed (``--port``).  Nothing is created or removed.
    """
    path = check_path_text(name, path)
    absolute = os.path.abspath(path)
    parent = os.path.dirname(absolute)
    tree = kernel_tree(os.path.realpath(parent), _KERNEL_TREES)
    if tree is not None:
        raise UsageError("{} {!r} is inside {}, where no symlink can be made".format(name, path, tree))
    if os.path.lexists(path):
        if not os.path.islink(path):
            kind = "a directory" if os.path.isdir(path) else "not a symlink"
            raise UsageError("{} {!r} exists and is {}; refusing to replace it".format(name, path, kind))
        if not is_stale_pty_link(path):
            target = _readlink(path)
            if _PTY_SLAVE.match(target):
                raise UsageError("{} {!r} is a symlink to the pseudo-terminal {!r}, which is still open (another "
                                 "virtual device's, or a terminal's); refusing to replace it".format(
                                     name, path, target))
            raise UsageError("{} {!r} is a symlink to {!r}, not a stale link to a vanished pseudo-terminal; "
                             "refusing to replace it".format(name, path, target))
    if not os.path.isdir(parent):
        raise UsageError("{} {!r}: directory {!r} does not exist".format(name, path, parent))
    _probe(name, path, parent)
    return absolute


def _probe(name, path, parent):
    # Mode bits say nothing for root nor for read-only file systems: try it.
    token = binascii.hexlify(os.urandom(4)).decode("ascii")
    probe = os.path.join(parent, ".neurohand-probe.{}.{}".format(os.getpid(), token))
    try:
        os.symlink("/dev/null", probe)
    except OSError as exc:
        raise UsageError("{} {!r}: cannot create a symlink in {!r} ({})".format(
            name, path, parent, describe_os_error(exc))) from None
    try:
        os.unlink(probe)
    except OSError:
        pass


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return "?"


class PortLink(object):
    """The symlink ``path`` -> the current pseudo-terminal; made per plug, removed per unplug."""

    def __init__(self, path, name="--port"):
        self.path = path
        self.name = name
        self.target = None      # the slave path our symlink points to, while it exists

    def make(self, slave_path):
        """Point ``path`` at ``slave_path`` (UsageError if something not ours is there)."""
        check_port_link(self.name, self.path)
        if os.path.islink(self.path):
            # check_port_link found it stale: a vanished terminal's link.
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        try:
            # symlink() never replaces: whatever appeared since the check stays.
            os.symlink(slave_path, self.path)
        except FileExistsError:
            raise UsageError("{} {!r} appeared while the link was being made; refusing to replace it".format(
                self.name, self.path)) from None
        except OSError as exc:
            raise LinkError("cannot create the port symlink {!r}: {}".format(
                self.path, exc.strerror or exc)) from None
        self.target = slave_path

    def remove(self):
        """Remove the symlink if it is still ours (pointing to our terminal); else leave it."""
        target, self.target = self.target, None
        if target is None:
            return
        try:
            if os.readlink(self.path) == target:
                os.unlink(self.path)
        except OSError:
            pass  # gone already, or replaced by something not ours: nothing of ours to clean
