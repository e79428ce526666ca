"""Atomic file writing: a reader sees the old file or the new one, never a part.

Every file neurohand writes over (bundles' engines and self-test records,
stats, benchmark results, exported models, checkpoints, imported recordings)
goes through :func:`atomic_path`: the content goes to a temporary file in the
same directory, is forced to the disk (fsync), then renamed over the target,
and the directory entry is synced too (a power cut must not undo the rename).
On any failure the temporary file is removed and the old file is untouched.
A target that exists and is not a regular file is never renamed over (one
error), except ``/dev/null``, which the writer writes to directly (it discards everything).
"""
import contextlib
import json
import os
import tempfile

from neurohand.firmware_bridge.shared.errors import UsageError


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside ``path`` to write; on success it becomes ``path``.

    Whatever wrote it (``open``, ``torch.save``, a RecordingWriter) must have
    closed the file when the block ends.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        # Renaming over a device node, a FIFO or a directory would replace it (as root, even /dev/null).
        if os.path.realpath(path) != os.devnull:
            raise UsageError("{!r} exists and is not a regular file; it is never replaced".format(path))
        # Writing to /dev/null: the writer runs (its errors still show) and the sink discards it.
        yield os.devnull
        return
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=directory)
    os.close(handle)
    try:
        yield temporary
        _sync_file(temporary)
        # mkstemp makes the file private (0600); the result gets the usual mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    sync_directory(directory)


def write_atomic(path, data):
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            stream.write(data)


def write_json_atomic(path, value, indent=1, sort_keys=True, allow_nan=False):
    """Write ``value`` as JSON (strict by default: no NaN) with a final newline, atomically."""
    write_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def _sync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(directory):
    """fsync a directory, so that a new or renamed entry in it survives a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
