"""The one rule for every file a command writes, checked before the work starts.

An output never overwrites an input; an existing output is replaced only when
the user said ``--force`` (or where replacing is the command's documented job,
and then atomically on success); an output that cannot be written is refused
in one line *before* a session, an import or a training run, not after it.

``check_output_path`` is what every command calls on each of its output paths.
It probes the directory by creating (and removing) a file in it, because
permission bits say nothing useful when running as root and nothing at all
about read-only or virtual file systems (``/proc``, ``/sys``).
"""
import errno
import os
import tempfile

from neurohand.firmware_bridge.shared.checks import check_path_text
from neurohand.firmware_bridge.shared.errors import UsageError

#: Virtual file systems whose "files" are kernel interfaces, never outputs.
_KERNEL_TREES = ("/proc", "/sys", "/dev")
#: ... except these, which are harmless sinks people do use for an output.
_DEVICE_SINKS = ("/dev/null",)


def kernel_tree(real_path, trees):
    """The one of ``trees`` (absolute paths) that ``real_path`` is or lies inside, else None."""
    for tree in trees:
        if real_path == tree or real_path.startswith(tree + os.sep):
            return tree
    return None


def _same_or_inside(path, other):
    """True if ``path`` is ``other`` or lies inside the directory ``other``."""
    if os.path.isdir(other):
        prefix = other.rstrip(os.sep) + os.sep
        return path == other or path.startswith(prefix)
    return path == other


def _real(path):
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def check_output_path(name, path, inputs=(), force=False, directory=False):
    """Return ``path`` (absolute) if the command may write it; else raise UsageError.

    ``name`` is the option as the user typed it (``--record``), ``inputs`` the
    files and directories the same command reads (a recording being replayed,
    the bundle in use): the output may be none of them and not inside any.
    ``directory=True`` is for outputs that are directories (``bundle --out``):
    an existing one must be empty unless ``force``.
    """
    path = check_path_text(name, path)
    absolute = os.path.abspath(path)
    real = _real(path)
    if real in _DEVICE_SINKS:
        return absolute
    tree = kernel_tree(real, _KERNEL_TREES)
    if tree is not None:
        raise UsageError("{} {!r} is inside {}, which holds no files to write".format(name, path, tree))
    for item in inputs:
        if item is None:
            continue
        other = _real(item)
        if _same_or_inside(real, other):
            what = "is" if real == other else "is inside"
            raise UsageError("{} {!r} {} an input of this command ({!r}); choose another path".format(
                name, path, what, os.fspath(item)))
    if os.path.lexists(path):
        if directory:
            if not os.path.isdir(path):
                raise UsageError("{} {!r} exists and is not a directory".format(name, path))
            if os.listdir(path) and not force:
                raise UsageError("{} {!r} exists and is not empty; pass --force to replace it".format(name, path))
            _probe_directory(name, path, absolute)
            return absolute
        if os.path.isdir(path):
            raise UsageError("{} {!r} is a directory; give a file name".format(name, path))
        if os.path.exists(path) and not os.path.isfile(path):
            raise UsageError("{} {!r} exists and is not a regular file".format(name, path))
        if not force:
            raise UsageError("{} {!r} already exists; pass --force to replace it".format(name, path))
    parent = os.path.dirname(absolute)
    if not os.path.isdir(parent):
        raise UsageError("{} {!r}: directory {!r} does not exist".format(name, path, parent))
    _probe_directory(name, path, parent)
    return absolute


def _probe_directory(name, path, directory):
    try:
        handle, probe = tempfile.mkstemp(prefix=".neurohand-probe.", dir=directory)
    except OSError as exc:
        raise UsageError("{} {!r}: cannot write in {!r} ({})".format(
            name, path, directory, _reason(exc))) from None
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError:
        pass


def _reason(exc):
    if exc.errno in (errno.EROFS,):
        return "read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def describe_os_error(exc):
    """One short phrase for an OSError met while reading or writing (no errno noise)."""
    return _reason(exc)
