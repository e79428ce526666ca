"""The collection protocol: which movements are cued, in which order, for how long.

A protocol is a JSON object (docs/collect.md, "Protocol files")::

    {"format": "neurohand-collect-protocol", "version": 1, "name": "my-protocol",
     "movements": [{"id": 1, "name": "thumb", "posture": {"thumb": 1.0}}, ...],
     "repetitions": 10, "hold_s": 3.0, "rest_s": 3.0, "lead_in_s": 3.0,
     "order": "random", "blocks": "repetition", "seed": 1,
     "rest_posture": {"thumb": 0.0, ...},
     "calibration": {"poses": ["open", "fist", "thumb", ...], "hold_s": 3.0, "rest_s": 1.5, "settle_s": 1.0}}

Postures are per-finger flexion targets, 0 = open .. 1 = fully flexed (what
the glove's calibrated labels show); a finger a movement does not name takes
its ``rest_posture``.  A movement's ``id`` is the value of its ``movement``
events in the recording (0 is rest), so ids must be positive and distinct.

:func:`load_protocol` takes a built-in name (:data:`BUILTIN_NAMES`) or a file;
every mistake is one :class:`UsageError` naming the field, e.g.
``protocol 'p.json': movements[2].posture: unknown finger 'indx'; did you mean 'index'?``.

Standard library only (Python 3.6).
"""
import copy
import difflib
import numbers
import os

from neurohand.firmware_bridge.hands.base import DECODER_FINGERS
from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import UsageError

FORMAT = "neurohand-collect-protocol"
VERSION = 1
#: Finger order of postures, labels and the glove calibration: the decoder's.
FINGERS = DECODER_FINGERS
ORDERS = ("random", "fixed")
BLOCKS = ("repetition", "movement")
#: Calibration poses: the open hand, the fist, then each finger flexed alone.
CALIBRATION_POSES = ("open", "fist") + FINGERS
REQUIRED_POSES = ("open", "fist")
#: What the protocol's timing may be: long enough to see, short enough to be a typo beyond.
MAX_STEP_S = 600.0
MIN_HOLD_S = 0.2
MAX_REPETITIONS = 1000
MAX_MOVEMENTS = 256
MAX_NAME_CHARS = 64
MAX_TOTAL_S = 24 * 3600.0
MAX_ID = 2 ** 31 - 1

_TOP_KEYS = ("format", "version", "name", "description", "movements", "repetitions", "hold_s", "rest_s",
             "lead_in_s", "order", "blocks", "seed", "rest_posture", "calibration")
_MOVEMENT_KEYS = ("id", "name", "posture", "description")
_CALIBRATION_KEYS = ("poses", "hold_s", "rest_s", "settle_s")
DEFAULTS = {"repetitions": 10, "hold_s": 3.0, "rest_s": 3.0, "lead_in_s": 3.0, "order": "random",
            "blocks": "repetition", "seed": 1, "description": ""}
CALIBRATION_DEFAULTS = {"poses": list(CALIBRATION_POSES), "hold_s": 3.0, "rest_s": 1.5, "settle_s": 1.0}


def _flexed(*fingers):
    return {finger: 1.0 for finger in fingers}


# The movement set of the Jetson Nano neuroprosthesis papers' mirrored training (single fingers,
# then pinch, tripod and fist), with the ids of neurohand's simulator (virtual/movements.py),
# so a simulated recording and a collected one name movements alike.  Timing chosen here.
_PAPER = {
    "format": FORMAT, "version": VERSION, "name": "paper",
    "description": "five single-finger flexions, pinch, tripod and fist (mirrored bilateral training)",
    "movements": [
        {"id": 1, "name": "thumb", "posture": _flexed("thumb")},
        {"id": 2, "name": "index", "posture": _flexed("index")},
        {"id": 3, "name": "middle", "posture": _flexed("middle")},
        {"id": 4, "name": "ring", "posture": _flexed("ring")},
        {"id": 5, "name": "little", "posture": _flexed("little")},
        {"id": 6, "name": "pinch", "posture": _flexed("thumb", "index")},
        {"id": 7, "name": "tripod", "posture": _flexed("thumb", "index", "middle")},
        {"id": 8, "name": "fist", "posture": _flexed(*FINGERS)},
    ],
    "repetitions": 10, "hold_s": 3.0, "rest_s": 3.0, "lead_in_s": 3.0, "order": "random",
    "blocks": "repetition", "seed": 1,
}

# NinaPro DB1 exercise 1 (exercise A): 12 basic finger movements, ids as NinaPro's stimulus
# 1-12, each held 5 s with 3 s rest, 10 repetitions of one movement in a row (Atzori et al.,
# Scientific Data 1, 140053, 2014).  Postures in flexion only (the 5 labels): an extension
# opens that finger fully from a relaxed rest (0.2); the thumb's abduction and extension
# look alike in flexion, its adduction is half-way.
_NINAPRO_REST = 0.2
_NINAPRO_E1 = {
    "format": FORMAT, "version": VERSION, "name": "ninapro-e1",
    "description": "NinaPro DB1 exercise 1: 12 basic finger movements, 5 s each, 3 s rest, 10 repetitions",
    "movements": [
        {"id": 1, "name": "index flexion", "posture": {"index": 1.0}},
        {"id": 2, "name": "index extension", "posture": {"index": 0.0}},
        {"id": 3, "name": "middle flexion", "posture": {"middle": 1.0}},
        {"id": 4, "name": "middle extension", "posture": {"middle": 0.0}},
        {"id": 5, "name": "ring flexion", "posture": {"ring": 1.0}},
        {"id": 6, "name": "ring extension", "posture": {"ring": 0.0}},
        {"id": 7, "name": "little finger flexion", "posture": {"little": 1.0}},
        {"id": 8, "name": "little finger extension", "posture": {"little": 0.0}},
        {"id": 9, "name": "thumb adduction", "posture": {"thumb": 0.5}},
        {"id": 10, "name": "thumb abduction", "posture": {"thumb": 0.0}},
        {"id": 11, "name": "thumb flexion", "posture": {"thumb": 1.0}},
        {"id": 12, "name": "thumb extension", "posture": {"thumb": 0.0}},
    ],
    "rest_posture": {finger: _NINAPRO_REST for finger in FINGERS},
    "repetitions": 10, "hold_s": 5.0, "rest_s": 3.0, "lead_in_s": 3.0, "order": "fixed",
    "blocks": "movement", "seed": 1,
}

BUILTINS = {"paper": _PAPER, "ninapro-e1": _NINAPRO_E1}
BUILTIN_NAMES = tuple(sorted(BUILTINS))


class Movement(object):
    """One cued movement: ``id`` (int > 0), ``name``, ``posture`` (tuple of 5 floats, FINGERS order)."""

    def __init__(self, id, name, posture, description=""):
        self.id = id
        self.name = name
        self.posture = posture
        self.description = description

    def __repr__(self):
        return "Movement({}, {!r})".format(self.id, self.name)


class Protocol(object):
    """A validated protocol (build it with :func:`load_protocol` or :meth:`from_config`).

    Attributes: name, description, movements (list of :class:`Movement`), repetitions,
    hold_s, rest_s, lead_in_s, order, blocks, seed, rest_posture (tuple of 5 floats),
    calibration (dict: poses, hold_s, rest_s, settle_s), source (where it came from).
    """

    def __init__(self, config, source):
        self._config = config
        self.source = source
        self.name = config["name"]
        self.description = config["description"]
        rest = config["rest_posture"]
        self.rest_posture = tuple(float(rest[f]) for f in FINGERS)
        self.movements = []
        for item in config["movements"]:
            posture = tuple(float(item["posture"].get(f, rest[f])) for f in FINGERS)
            self.movements.append(Movement(item["id"], item["name"], posture, item.get("description", "")))
        for key in ("repetitions", "hold_s", "rest_s", "lead_in_s", "order", "blocks", "seed"):
            setattr(self, key, config[key])
        self.calibration = dict(config["calibration"])

    @classmethod
    def from_config(cls, config, source="protocol"):
        """Validate a parsed JSON object; UsageError naming ``source`` and the field."""
        return cls(_validate(config, source), source)

    def to_config(self):
        """The complete protocol as a JSON-able dict (defaults filled in), for a recording's metadata."""
        return copy.deepcopy(self._config)

    def movement(self, movement_id):
        for movement in self.movements:
            if movement.id == movement_id:
                return movement
        raise KeyError(movement_id)

    @property
    def n_trials(self):
        return len(self.movements) * self.repetitions

    def __repr__(self):
        return "Protocol({!r}: {} movements x {} repetitions)".format(self.name, len(self.movements),
                                                                     self.repetitions)


def load_protocol(name_or_path):
    """A built-in protocol by name, or one read from a JSON file; UsageError otherwise."""
    if name_or_path in BUILTINS:
        return Protocol.from_config(copy.deepcopy(BUILTINS[name_or_path]), "built-in protocol {!r}".format(
            name_or_path))
    path = checks.check_path_text("--protocol", name_or_path)
    if not os.path.exists(path):
        message = "--protocol {!r} is neither a built-in protocol ({}) nor an existing file".format(
            path, ", ".join(BUILTIN_NAMES))
        close = difflib.get_close_matches(path, BUILTIN_NAMES, n=1)
        if close:
            message += "; did you mean {!r}?".format(close[0])
        raise UsageError(message)
    checks.check_file_exists("--protocol", path)
    config = checks.load_json_file(path, "protocol", error=UsageError)
    return Protocol.from_config(config, "protocol {!r}".format(path))


# --- validation ------------------------------------------------------------------

def _fail(source, field, message):
    raise UsageError("{}: {}: {}".format(source, field, message))


def _unknown_keys(source, where, value, allowed):
    for key in sorted(value):
        if key not in allowed:
            message = "unknown field {!r}; fields are {}".format(key, ", ".join(allowed))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                message = "unknown field {!r}; did you mean {!r}?".format(key, close[0])
            _fail(source, where, message)


def _number(source, field, value, minimum, maximum, exclusive_minimum=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value \
            or value in (float("inf"), float("-inf")):
        _fail(source, field, "must be a number, but got {!r}".format(value))
    if (exclusive_minimum and value <= minimum) or value < minimum or value > maximum:
        _fail(source, field, "must be {} {:g} and at most {:g}, but got {!r}".format(
            "greater than" if exclusive_minimum else "at least", minimum, maximum, value))
    return float(value)


def _integer(source, field, value, minimum, maximum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(source, field, "must be an integer, but got {!r}".format(value))
    if not minimum <= value <= maximum:
        _fail(source, field, "must be between {} and {}, but got {!r}".format(minimum, maximum, value))
    return int(value)


def _text(source, field, value, allow_empty=False):
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        _fail(source, field, "must be a{} string, but got {!r}".format("" if allow_empty else " non-empty", value))
    if len(value) > (4096 if allow_empty else MAX_NAME_CHARS):
        _fail(source, field, "is too long ({} characters)".format(len(value)))
    return value


def _option(source, field, value, allowed):
    if value not in allowed:
        message = "must be one of {}, but got {!r}".format(", ".join(repr(a) for a in allowed), value)
        close = difflib.get_close_matches(str(value), allowed, n=1) if isinstance(value, str) else []
        if close:
            message += "; did you mean {!r}?".format(close[0])
        _fail(source, field, message)
    return value


def _posture(source, field, value, complete=False):
    if not isinstance(value, dict):
        _fail(source, field, "must be an object of finger: flexion (0 = open .. 1 = flexed), but got {!r}".format(
            value))
    for finger in sorted(value):
        if finger not in FINGERS:
            message = "unknown finger {!r}; fingers are {}".format(finger, ", ".join(FINGERS))
            close = difflib.get_close_matches(str(finger), FINGERS, n=1)
            if close:
                message = "unknown finger {!r}; did you mean {!r}?".format(finger, close[0])
            _fail(source, field, message)
    out = {finger: _number(source, "{}.{}".format(field, finger), value[finger], 0.0, 1.0) for finger in value}
    if complete:
        out = dict({finger: 0.0 for finger in FINGERS}, **out)
    return out


def _validate(config, source):
    if not isinstance(config, dict):
        raise UsageError("{}: must be a JSON object, but is {}".format(source, type(config).__name__))
    _unknown_keys(source, "the top level", config, _TOP_KEYS)
    if "format" in config and config["format"] != FORMAT:
        _fail(source, "format", "must be {!r}, but got {!r}".format(FORMAT, config["format"]))
    if "version" in config and config["version"] != VERSION:
        _fail(source, "version", "must be {} (this neurohand reads version {}), but got {!r}".format(
            VERSION, VERSION, config["version"]))
    out = {"format": FORMAT, "version": VERSION}
    out["name"] = _text(source, "name", config.get("name", "custom"))
    out["description"] = _text(source, "description", config.get("description", ""), allow_empty=True)
    if "movements" not in config:
        _fail(source, "movements", "is missing (a list of {\"id\", \"name\", \"posture\"})")
    movements = config["movements"]
    if not isinstance(movements, list) or not movements:
        _fail(source, "movements", "must be a non-empty list, but got {!r}".format(movements))
    if len(movements) > MAX_MOVEMENTS:
        _fail(source, "movements", "has {} movements, more than the {} allowed".format(len(movements),
                                                                                       MAX_MOVEMENTS))
    out["rest_posture"] = _posture(source, "rest_posture", config.get("rest_posture", {}), complete=True)
    seen_ids, seen_names, checked = {}, {}, []
    for index, item in enumerate(movements):
        where = "movements[{}]".format(index)
        if not isinstance(item, dict):
            _fail(source, where, "must be an object with id, name and posture, but got {!r}".format(item))
        _unknown_keys(source, where, item, _MOVEMENT_KEYS)
        for key in ("id", "name", "posture"):
            if key not in item:
                _fail(source, where, "has no {!r}".format(key))
        movement_id = _integer(source, where + ".id", item["id"], 1, MAX_ID)
        name = _text(source, where + ".name", item["name"])
        if movement_id in seen_ids:
            _fail(source, where + ".id", "{} is also the id of movements[{}]".format(movement_id, seen_ids[movement_id]))
        if name in seen_names:
            _fail(source, where + ".name", "{!r} is also the name of movements[{}]".format(name, seen_names[name]))
        seen_ids[movement_id], seen_names[name] = index, index
        entry = {"id": movement_id, "name": name, "posture": _posture(source, where + ".posture", item["posture"])}
        if "description" in item:
            entry["description"] = _text(source, where + ".description", item["description"], allow_empty=True)
        checked.append(entry)
    out["movements"] = checked
    out["repetitions"] = _integer(source, "repetitions", config.get("repetitions", DEFAULTS["repetitions"]), 1,
                                  MAX_REPETITIONS)
    out["hold_s"] = _number(source, "hold_s", config.get("hold_s", DEFAULTS["hold_s"]), MIN_HOLD_S, MAX_STEP_S)
    out["rest_s"] = _number(source, "rest_s", config.get("rest_s", DEFAULTS["rest_s"]), 0.0, MAX_STEP_S)
    out["lead_in_s"] = _number(source, "lead_in_s", config.get("lead_in_s", DEFAULTS["lead_in_s"]), 0.0, MAX_STEP_S)
    out["order"] = _option(source, "order", config.get("order", DEFAULTS["order"]), ORDERS)
    out["blocks"] = _option(source, "blocks", config.get("blocks", DEFAULTS["blocks"]), BLOCKS)
    out["seed"] = _integer(source, "seed", config.get("seed", DEFAULTS["seed"]), 0, 2 ** 32 - 1)
    out["calibration"] = _calibration(source, config.get("calibration", {}))
    total = (out["lead_in_s"] + len(checked) * out["repetitions"] * (out["hold_s"] + out["rest_s"]))
    if total > MAX_TOTAL_S:
        _fail(source, "repetitions", "the protocol would last {:.1f} h, more than the {:g} h allowed".format(
            total / 3600.0, MAX_TOTAL_S / 3600.0))
    return out


def _calibration(source, value):
    if not isinstance(value, dict):
        _fail(source, "calibration", "must be an object ({}), but got {!r}".format(", ".join(_CALIBRATION_KEYS),
                                                                                  value))
    _unknown_keys(source, "calibration", value, _CALIBRATION_KEYS)
    poses = value.get("poses", CALIBRATION_DEFAULTS["poses"])
    if not isinstance(poses, list) or not poses:
        _fail(source, "calibration.poses", "must be a non-empty list of {}, but got {!r}".format(
            ", ".join(CALIBRATION_POSES), poses))
    for index, pose in enumerate(poses):
        _option(source, "calibration.poses[{}]".format(index), pose, CALIBRATION_POSES)
    if len(set(poses)) != len(poses):
        _fail(source, "calibration.poses", "names a pose twice: {}".format(poses))
    for pose in REQUIRED_POSES:
        if pose not in poses:
            _fail(source, "calibration.poses", "must include {!r} (the calibration maps open to 0 and the fist "
                                               "to 1)".format(pose))
    hold = _number(source, "calibration.hold_s", value.get("hold_s", CALIBRATION_DEFAULTS["hold_s"]), MIN_HOLD_S,
                   MAX_STEP_S)
    rest = _number(source, "calibration.rest_s", value.get("rest_s", CALIBRATION_DEFAULTS["rest_s"]), 0.0,
                   MAX_STEP_S)
    settle = _number(source, "calibration.settle_s", value.get("settle_s", CALIBRATION_DEFAULTS["settle_s"]), 0.0,
                     MAX_STEP_S)
    if settle >= hold:
        _fail(source, "calibration.settle_s", "{:g} s leaves nothing of the {:g} s hold to calibrate on".format(
            settle, hold))
    return {"poses": list(poses), "hold_s": hold, "rest_s": rest, "settle_s": settle}
