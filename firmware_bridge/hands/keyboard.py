"""Keyboard output: finger movements press keys, to play games or drive any PC
program (thumb flexion walks forward, a fist fires).

A mapping file (JSON, format in docs/hand-protocol.md, "Keyboard mapping")
lists bindings.  Each binding has a set of fingers that must all be flexed,
thresholds with hysteresis (press when every finger reaches ``on``, release
when any drops below ``off``), optional ``unless`` fingers that must stay
below ``on``, and the key to hold.  With a bundle whose model has a
movement-class head, a binding may instead name a ``class`` (its name, or its
index in the model's class list, "rest" being 0): its key is held while the
runtime decides that class and released otherwise, and always while the hand
is held in its safe posture (the runtime then decides no class).  Key events go to a *sink*:
:class:`UinputKeySink` (Linux uinput through python-evdev, imported only
when used) or :class:`RecordingKeySink` (records events; tests, dry runs).
"""
import re
import time

from neurohand.firmware_bridge.shared.checks import load_json_file
from neurohand.firmware_bridge.shared.errors import ConfigError
from neurohand.firmware_bridge.hands.base import HandDriver, HandError, finger_names

MAPPING_FORMAT = "neurohand-keys"
MAPPING_VERSION = 1
ALL_FINGERS = "all"
_KEY_NAME = re.compile(r"^(KEY|BTN)_[A-Z0-9_]+$")
_BINDING_FIELDS = {"name", "fingers", "unless", "on", "off", "key", "class"}
#: The fields of a class binding; thresholds mean nothing there.
_CLASS_BINDING_FIELDS = {"name", "class", "key"}


class Binding(object):
    """One key held while a combination of fingers is flexed (hysteresis state inside)."""

    def __init__(self, name, finger_indices, unless_indices, on, off, key):
        self.name = name
        self.finger_indices = tuple(finger_indices)
        self.unless_indices = tuple(unless_indices)
        self.on = on
        self.off = off
        self.key = key
        self.pressed = False

    def update(self, positions):
        """Advance the state for one positions vector; return True if it changed."""
        blocked = any(positions[i] >= self.on for i in self.unless_indices)
        if self.pressed:
            release = blocked or any(positions[i] < self.off for i in self.finger_indices)
            if release:
                self.pressed = False
                return True
        elif not blocked and all(positions[i] >= self.on for i in self.finger_indices):
            self.pressed = True
            return True
        return False


class ClassBinding(object):
    """One key held while the runtime decides one movement class."""

    def __init__(self, name, class_index, class_name, key):
        self.name = name
        self.class_index = int(class_index)
        self.class_name = class_name
        self.key = key
        self.pressed = False

    def update_class(self, decided):
        """Advance the state for the decided class index (None: no class); return True if it changed."""
        pressed = decided == self.class_index
        changed = pressed != self.pressed
        self.pressed = pressed
        return changed


def _fail(source, message):
    raise ConfigError("keyboard mapping {}: {}".format(source, message))


def parse_mapping(document, n_outputs, source="<mapping>", class_names=()):
    """Validate a mapping document (already parsed JSON) into a list of Binding and ClassBinding.

    ``class_names``: the movement classes of the bundle's model (empty: it has no class head, and a
    class binding is refused).  Raises ConfigError naming ``source`` and the binding at fault.
    """
    names = finger_names(n_outputs)
    if not isinstance(document, dict):
        _fail(source, "must be a JSON object")
    if document.get("format") != MAPPING_FORMAT:
        _fail(source, "'format' must be {!r}, got {!r}".format(MAPPING_FORMAT, document.get("format")))
    if document.get("version") != MAPPING_VERSION:
        _fail(source, "'version' must be {}, got {!r}".format(MAPPING_VERSION, document.get("version")))
    raw_bindings = document.get("bindings")
    if not isinstance(raw_bindings, list) or not raw_bindings:
        _fail(source, "'bindings' must be a non-empty list")
    bindings = []
    for number, raw in enumerate(raw_bindings):
        where = "binding {}".format(number)
        if not isinstance(raw, dict):
            _fail(source, "{} must be an object".format(where))
        where = "binding {} ({})".format(number, raw.get("name", "unnamed"))
        unknown = sorted(set(raw) - _BINDING_FIELDS)
        if unknown:
            _fail(source, "{}: unknown field(s) {}; allowed are {}".format(
                where, ", ".join(unknown), ", ".join(sorted(_BINDING_FIELDS))))
        if "class" in raw:
            bindings.append(_class_binding(raw, source, where, class_names))
            continue

        def indices(field, required):
            value = raw.get(field, [] if not required else None)
            if value == ALL_FINGERS:
                value = list(names)
            if not isinstance(value, list) or (required and not value):
                _fail(source, "{}: {!r} must be a list of finger names or \"all\"".format(where, field))
            result = []
            for finger in value:
                if finger not in names:
                    _fail(source, "{}: unknown finger {!r} in {!r}; fingers are {}".format(
                        where, finger, field, ", ".join(names)))
                result.append(names.index(finger))
            return result

        fingers = indices("fingers", True)
        unless = indices("unless", False)
        if set(fingers) & set(unless):
            _fail(source, "{}: a finger cannot be in both 'fingers' and 'unless'".format(where))
        on, off = raw.get("on"), raw.get("off")
        for label, value in (("on", on), ("off", off)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                _fail(source, "{}: {!r} must be a number in 0..1, got {!r}".format(where, label, value))
        if not off < on:
            _fail(source, "{}: 'off' ({}) must be below 'on' ({}) for hysteresis".format(where, off, on))
        key = raw.get("key")
        _check_key(source, where, key)
        bindings.append(Binding(raw.get("name", key), fingers, unless, float(on), float(off), key))
    return bindings


def _check_key(source, where, key):
    if not isinstance(key, str) or not _KEY_NAME.match(key):
        _fail(source, "{}: 'key' must be a Linux key name such as \"KEY_W\", got {!r}".format(where, key))


def _class_binding(raw, source, where, class_names):
    extra = sorted(set(raw) - _CLASS_BINDING_FIELDS)
    if extra:
        _fail(source, "{}: a class binding takes only {}, not {}".format(
            where, ", ".join(sorted(_CLASS_BINDING_FIELDS)), ", ".join(extra)))
    value = raw["class"]
    if not class_names:
        _fail(source, "{}: binds movement class {!r}, but the bundle's model has no class head".format(where, value))
    index = None
    if isinstance(value, str) and value in class_names:
        index = class_names.index(value)
    elif isinstance(value, str) and value.isdigit():
        index = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    if index is None or not 0 <= index < len(class_names):
        _fail(source, "{}: unknown movement class {!r}; the bundle's classes are {} (a name, or its index 0 to "
                      "{})".format(where, value, ", ".join(class_names), len(class_names) - 1))
    key = raw.get("key")
    _check_key(source, where, key)
    return ClassBinding(raw.get("name", key), index, class_names[index], key)


def load_mapping(path, n_outputs, class_names=()):
    """Read and validate the mapping file at ``path``; returns a list of Binding and ClassBinding."""
    document = load_json_file(path, "keyboard mapping", require_object=False)
    return parse_mapping(document, n_outputs, repr(path), tuple(class_names))


class RecordingKeySink(object):
    """Records key events as ``(t_monotonic, "press"|"release", key)`` in ``events``."""

    def __init__(self):
        self.events = []
        self.closed = False

    def press(self, key):
        self.events.append((time.monotonic(), "press", key))

    def release(self, key):
        self.events.append((time.monotonic(), "release", key))

    def close(self):
        self.closed = True


class UinputKeySink(object):
    """Emits key events through a virtual Linux keyboard (``/dev/uinput``, python-evdev).

    Parameters
    ----------
    keys : iterable of str
        Key names the device may send (e.g. ``KEY_W``); checked against evdev.
    """

    def __init__(self, keys):
        try:
            import evdev
        except ImportError as exc:
            raise HandError("keyboard output needs python-evdev (pip install evdev) on Linux; "
                            "it is not installed") from exc
        unknown = sorted(k for k in set(keys) if not hasattr(evdev.ecodes, k))
        if unknown:
            raise ConfigError("unknown key name(s) for evdev: {}".format(", ".join(unknown)))
        self._codes = {k: getattr(evdev.ecodes, k) for k in set(keys)}
        self._ecodes = evdev.ecodes
        try:
            self._device = evdev.UInput({evdev.ecodes.EV_KEY: sorted(self._codes.values())},
                                        name="neurohand-keys")
        except (OSError, evdev.UInputError) as exc:
            raise HandError("cannot create a uinput keyboard ({}); is /dev/uinput present and "
                            "writable by this user?".format(exc)) from exc

    def _emit(self, key, value):
        self._device.write(self._ecodes.EV_KEY, self._codes[key], value)
        self._device.syn()

    def press(self, key):
        self._emit(key, 1)

    def release(self, key):
        self._emit(key, 0)

    def close(self):
        self._device.close()


class KeyboardHand(HandDriver):
    """``keys:MAPPING.json``: finger positions -> key presses.

    Within one ``send``, releases are emitted before presses, so two bindings
    that hand over (thumb -> fist) never hold both keys at once.  Keys still
    held are released on ``close``.  Counters add ``presses`` and ``releases``.

    Class bindings follow the class given by :meth:`set_class`, which the
    runtime's writer calls right before each ``send``; it takes effect with
    that ``send``, so a class change and a finger change hand over in one step.

    Parameters
    ----------
    mapping_path : str
        Mapping file.
    n_outputs : int
        Decoder outputs (finger names as in base.DECODER_FINGERS).
    class_names : sequence of str
        The model's movement classes (empty without a class head).
    sink : object or None
        Where key events go (``press(key)``, ``release(key)``, ``close()``);
        None: a :class:`UinputKeySink`, created by ``open``.
    """

    #: create_hand passes the model's class names to this driver.
    takes_classes = True

    def __init__(self, mapping_path, n_outputs=5, sink=None, class_names=()):
        super(KeyboardHand, self).__init__(n_outputs)
        self.mapping_path = mapping_path
        self.class_names = tuple(class_names)
        self.bindings = load_mapping(mapping_path, n_outputs, self.class_names)
        self.sink = sink
        self._class = None
        self.counters.update({"presses": 0, "releases": 0})

    def open(self):
        if self.sink is None:
            self.sink = UinputKeySink(b.key for b in self.bindings)
        return self

    @property
    def pressed(self):
        """Keys currently held, as a sorted tuple."""
        return tuple(sorted({b.key for b in self.bindings if b.pressed}))

    def set_class(self, index):
        """The movement class decided now (index into ``class_names``, or None); applied by the next ``send``."""
        if index is not None and not 0 <= index < len(self.class_names):
            raise HandError("movement class index {!r} is outside the model's {} classes".format(
                index, len(self.class_names)))
        self._class = index

    def _write_positions(self, positions):
        if self.sink is None:
            raise HandError("keyboard output for {!r} is not open".format(self.mapping_path))
        before = set(self.pressed)
        for binding in self.bindings:
            if isinstance(binding, ClassBinding):
                binding.update_class(self._class)
            else:
                binding.update(positions)
        after = set(self.pressed)
        # Two bindings may share a key: the key is held while any of them is pressed.
        for key in sorted(before - after):
            self.sink.release(key)
            self.counters["releases"] += 1
        for key in sorted(after - before):
            self.sink.press(key)
            self.counters["presses"] += 1

    def close(self):
        if self.sink is None:
            return
        for key in self.pressed:
            self.sink.release(key)
            self.counters["releases"] += 1
        for binding in self.bindings:
            binding.pressed = False
        self._class = None
        self.sink.close()
        self.sink = None
