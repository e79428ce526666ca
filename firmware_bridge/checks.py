"""Validation of user-supplied values, in one place (after MNE's utils/check.py).

Never use ``assert`` for user input: it vanishes under ``python -O``.  These
helpers raise :class:`UsageError` with a message that names the parameter, the
value received and what was expected.
"""
import difflib
import numbers
import os

from neurohand.firmware_bridge.errors import UsageError


def check_option(name, value, allowed):
    """Return ``value`` if it is one of ``allowed``, else raise with a suggestion."""
    if value in allowed:
        return value
    msg = "{} must be one of {}, but got {!r}".format(
        name, ", ".join(repr(a) for a in allowed), value)
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
        if close:
            msg += "; did you mean {!r}?".format(close[0])
    raise UsageError(msg)


def check_int(name, value, minimum=None, maximum=None):
    """Return ``value`` as int if it is an integer within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UsageError("{} must be an integer, but got {!r}".format(name, value))
    value = int(value)
    _check_range(name, value, minimum, maximum)
    return value


def check_number(name, value, minimum=None, maximum=None, exclusive_minimum=False):
    """Return ``value`` as a finite float within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError("{} must be a number, but got {!r}".format(name, value))
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError("{} must be finite, but got {!r}".format(name, value))
    if exclusive_minimum and minimum is not None and value <= minimum:
        raise UsageError("{} must be greater than {}, but got {!r}".format(name, minimum, value))
    _check_range(name, value, minimum, maximum)
    return value


def _check_range(name, value, minimum, maximum):
    if minimum is not None and value < minimum:
        raise UsageError("{} must be at least {}, but got {!r}".format(name, minimum, value))
    if maximum is not None and value > maximum:
        raise UsageError("{} must be at most {}, but got {!r}".format(name, maximum, value))


def check_file_exists(name, path):
    """Return ``path`` if it names an existing regular file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError("{} {!r} does not exist".format(name, path))
    if not os.path.isfile(path):
        raise UsageError("{} {!r} is not a file".format(name, path))
    return path


def check_dir_exists(name, path):
    """Return ``path`` if it names an existing directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UsageError("{} {!r} is not an existing directory".format(name, path))
    return path


def check_parent_writable(name, path):
    """Return ``path`` if its parent directory exists, so writing can start."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError("{} {!r}: directory {!r} does not exist".format(name, path, parent))
    return path
