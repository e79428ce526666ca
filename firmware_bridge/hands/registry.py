"""The explicit registry of hand drivers and ``create_hand``, which turns a
hand specification such as ``psyonic:/dev/ttyUSB0`` into an open driver."""
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.hands.base import NullHand
from neurohand.firmware_bridge.hands.keyboard import KeyboardHand
from neurohand.firmware_bridge.hands.neurohand_protocol import NeurohandHand
from neurohand.firmware_bridge.hands.psyonic import PsyonicHand

#: Driver name (the part of a spec before ":") -> class.  Classes taking a
#: target (port or file) get it as their first argument.
HAND_DRIVERS = {
    "psyonic": PsyonicHand,        # psyonic:PORT   PSYONIC Ability Hand, UART API
    "neurohand": NeurohandHand,    # neurohand:PORT neurohand protocol (docs/hand-protocol.md)
    "keys": KeyboardHand,          # keys:FILE      key presses from a JSON mapping
    "none": NullHand,              # none           validate and count only
}
_TARGETLESS = ("none",)


def parse_hand_spec(spec):
    """Split ``"name:target"`` into ``(name, target)``; ``"none"`` has no target.

    Only the first colon separates, so ``neurohand:/dev/pts/3`` keeps its path whole.
    """
    if not isinstance(spec, str) or not spec:
        raise UsageError("hand must be given as NAME:TARGET (e.g. psyonic:/dev/ttyUSB0) or 'none', "
                         "got {!r}".format(spec))
    name, _, target = spec.partition(":")
    if name not in HAND_DRIVERS:
        from neurohand.firmware_bridge.shared.checks import check_option
        check_option("hand driver", name, sorted(HAND_DRIVERS))
    if name in _TARGETLESS:
        if target:
            raise UsageError("hand {!r} takes no target, got {!r}".format(name, spec))
        return name, None
    if not target:
        raise UsageError("hand {!r} needs a target: {}:PORT_OR_FILE".format(name, name))
    return name, target


def create_hand(spec, n_outputs=5, class_names=(), **options):
    """Create and open the driver for ``spec``.

    Parameters
    ----------
    spec : str
        ``psyonic:PORT``, ``neurohand:PORT``, ``keys:MAPPING.json`` or ``none``.
    n_outputs : int
        Decoder outputs the driver will be sent (5, or 6 with thumb rotation): the finger positions.
    class_names : sequence of str
        The model's movement classes (empty without a class head); passed to drivers that bind
        them (``takes_classes``: ``keys``), the others never hear of classes.
    **options
        Passed to the driver class (e.g. ``thumb_rotator=0.3`` for psyonic,
        ``sink=`` for keys).

    Returns
    -------
    HandDriver
        Opened; close it (or use it as a context manager).
    """
    name, target = parse_hand_spec(spec)
    cls = HAND_DRIVERS[name]
    if getattr(cls, "takes_classes", False):
        options["class_names"] = tuple(class_names)
    driver = cls(n_outputs=n_outputs, **options) if target is None else cls(target, n_outputs=n_outputs, **options)
    return driver.open()
