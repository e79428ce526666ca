"""Validation of user-supplied values, in one place (after MNE's utils/check.py).

Never use ``assert`` for user input: it vanishes under ``python -O``.  These
helpers raise :class:`UsageError` with a message that names the parameter, the
value received and what was expected.

JSON from files (configs, manifests, recording headers) is parsed here too, by
:func:`parse_json` and :func:`load_json_file`: whatever the bytes are, they give
a value or one error naming the file, never a RecursionError, a
UnicodeDecodeError or a locale-dependent decoding (files are always UTF-8).
"""
import difflib
import json
import numbers
import os

from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

#: Deepest nesting of arrays/objects accepted in a JSON file.  Our files nest
#: at most about 6 levels; a deeper one is damage, and refusing it here keeps
#: every later recursive walk (copy.deepcopy, np.array) far from Python's
#: recursion limit.
MAX_JSON_DEPTH = 64


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
    try:
        value = float(value)
    except OverflowError:
        # A JSON integer such as 10**400 is a valid int but no float holds it.
        raise UsageError("{} must be a finite number, but got an integer of {} digits".format(
            name, len(str(abs(int(value)))))) from None
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


def check_path_text(name, path):
    """Return ``path`` as a str if it can name a file at all: not None, not blank, no NUL byte.

    (os.path.exists raises ValueError on 3.6 for a NUL byte instead of answering.)
    """
    if path is None:
        raise UsageError("{} needs a path".format(name))
    path = os.fspath(path)
    if not path.strip():
        raise UsageError("{} is an empty path".format(name))
    if "\x00" in path:
        raise UsageError("{} {!r} contains a NUL character".format(name, path))
    return path


def check_file_exists(name, path):
    """Return ``path`` if it names an existing regular file."""
    path = check_path_text(name, path)
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


def check_real_array(name, value):
    """Return ``value`` (nested lists of numbers, or an ndarray) as a float64 ndarray.

    Refuses what ``np.array(value, dtype=float)`` would silently accept or
    crash on: booleans (``True`` would become 1.0), strings, None, integers too
    large for a float (OverflowError) and ragged nesting.  The shape is for the
    caller to check.
    """
    import numpy as np   # here, not at the top: the CLI imports this module without numpy
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind not in "fiu":
                raise UsageError("{} must hold real numbers, but has dtype {}".format(name, item.dtype))
        elif isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise UsageError("{} must hold only numbers, but holds {!r}".format(name, item))
    try:
        return np.array(value, dtype=np.float64)
    except OverflowError:
        raise UsageError("{} holds an integer too large for a float".format(name)) from None
    except (TypeError, ValueError) as exc:
        raise UsageError("{} must be a regular (not ragged) array of numbers: {}".format(name, exc)) from None


def json_depth(value):
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1); iterative."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                pending.extend((child, depth) for child in item)
    return deepest


def parse_json(data):
    """Parse JSON text (str, or bytes as UTF-8); raise ValueError describing any problem.

    ValueError covers invalid UTF-8, invalid JSON (json.JSONDecodeError),
    integers with too many digits (Python 3.11+) and nesting deeper than
    :data:`MAX_JSON_DEPTH` -- which the C parser would otherwise report as a
    RecursionError, or accept for a later walk to crash on.
    """
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("utf-8")   # UnicodeDecodeError is a ValueError
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError("nested more than {} levels deep".format(MAX_JSON_DEPTH)) from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError("nested more than {} levels deep".format(MAX_JSON_DEPTH))
    return value


def load_json_file(path, what, error=ConfigError, require_object=True):
    """Read the UTF-8 JSON file at ``path``; raise ``error`` naming ``what`` and the path.

    what : str, e.g. "runtime config"; messages read "runtime config '/x.json' ..."
    error : NeurohandError subclass to raise
    require_object : bool, refuse anything but a JSON object (dict)
    """
    path = os.fspath(path)
    try:
        # Binary read + explicit UTF-8: open(path) would decode with the
        # locale's encoding, ASCII under LANG=C (systemd on the Jetson).
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise error("cannot read {} {!r}: {}".format(what, path, exc)) from exc
    try:
        value = parse_json(data)
    except ValueError as exc:
        raise error("{} {!r} is not valid JSON: {}".format(what, path, exc)) from None
    if require_object and not isinstance(value, dict):
        raise error("{} {!r} must hold a JSON object, not {}".format(what, path, type(value).__name__))
    return value
