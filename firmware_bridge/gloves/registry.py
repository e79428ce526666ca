"""The explicit registry of glove sources and ``open_glove``, which turns a
glove specification such as ``serial:/dev/ttyACM0`` into an open source."""
from neurohand.firmware_bridge.link import check_port
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.gloves.cyberglove import CyberGloveSource
from neurohand.firmware_bridge.gloves.serial_glove import DETECT_TIMEOUT_S, SerialGloveSource, detect_protocol

#: Protocols a ``virtual:PORT:PROTOCOL`` spec may name (what ``neurohand virtual-glove --protocol`` plays).
VIRTUAL_PROTOCOLS = ("serial", "cyberglove")


def _open_virtual(port, protocol=None, detect_timeout_s=DETECT_TIMEOUT_S, **options):
    """A glove played by ``neurohand virtual-glove``: either protocol, detected unless given."""
    if protocol is None:
        protocol = detect_protocol(port, detect_timeout_s)
    return GLOVE_KINDS[protocol](port, **options)


def _open_lsl(query, **options):
    """A glove that publishes LSL; imported here so that nothing loads pylsl's adapter unless asked."""
    from neurohand.firmware_bridge.gloves.lsl_glove import LslGloveSource
    return LslGloveSource(query, **options)


#: Source name (the part of a spec before the first ":") -> callable(port, **options)
#: returning an open GloveSource; for ``lsl`` the "port" is the stream query (NAME or type=TYPE).
GLOVE_KINDS = {
    "cyberglove": CyberGloveSource,    # cyberglove:PORT   CyberGlove II/III serial protocol
    "lsl": _open_lsl,                  # lsl:NAME, lsl:type=Glove  a glove or hand tracker on LSL
    "serial": SerialGloveSource,       # serial:PORT       neurohand glove protocol (docs/glove-protocol.md)
    "virtual": _open_virtual,          # virtual:PORT[:serial|:cyberglove]  neurohand virtual-glove
}

_EXAMPLE = "serial:/dev/ttyACM0, cyberglove:/dev/ttyUSB0, virtual:/tmp/glove or lsl:NAME"


def parse_glove_spec(spec):
    """Split a glove spec into ``(kind, port, protocol)``; protocol only for ``virtual``.

    Only the first colon separates kind and port, so ``serial:/dev/pts/3`` keeps
    its path whole; a ``virtual`` spec may end in ``:serial`` or ``:cyberglove``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("glove must be given as KIND:PORT (e.g. {}), got {!r}".format(_EXAMPLE, spec))
    kind, colon, port = spec.partition(":")
    if kind not in GLOVE_KINDS:
        if not colon:
            raise UsageError("glove {!r} has no kind: give KIND:PORT (e.g. {})".format(spec, _EXAMPLE))
        from neurohand.firmware_bridge.shared.checks import check_option
        check_option("glove kind", kind, sorted(GLOVE_KINDS))
    protocol = None
    if kind == "virtual":
        head, colon2, tail = port.rpartition(":")
        if colon2 and tail in VIRTUAL_PROTOCOLS:
            port, protocol = head, tail
    if not port:
        raise UsageError("glove {!r} needs a port: {}:PORT (e.g. {})".format(spec, kind, _EXAMPLE))
    if kind == "lsl":
        from neurohand.firmware_bridge.gloves.lsl_glove import parse_lsl_glove
        parse_lsl_glove(port)
        return kind, port, protocol
    check_port("glove port", port)
    return kind, port, protocol


def open_glove(spec, **options):
    """Open the glove of ``spec`` and return it streaming (a GloveSource; close it).

    Parameters
    ----------
    spec : str
        ``cyberglove:PORT``, ``serial:PORT``, ``virtual:PORT`` (a pseudo-terminal
        made by ``neurohand virtual-glove``; the protocol is detected) or
        ``virtual:PORT:serial`` / ``virtual:PORT:cyberglove``, or ``lsl:NAME`` /
        ``lsl:type=TYPE`` (an LSL stream; needs pylsl).
    **options
        Passed to the source (e.g. ``baudrate=``, ``hello_timeout_s=``).

    Raises UsageError for a bad spec, LinkError for a port that cannot be
    opened, ProtocolError for a device that does not speak the protocol.
    """
    kind, port, protocol = parse_glove_spec(spec)
    if kind == "virtual":
        return _open_virtual(port, protocol, **options)
    return GLOVE_KINDS[kind](port, **options)
