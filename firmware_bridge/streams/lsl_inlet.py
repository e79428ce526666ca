"""``--chip lsl:NAME``: any Lab Streaming Layer stream decoded through the chip's runtime.

Specs: ``lsl:NAME`` (the stream's name), ``lsl:name=NAME``, ``lsl:type=EEG``,
``lsl:source_id=ID``.  :meth:`LslSource.open` resolves the stream (within
:data:`RESOLVE_TIMEOUT_S`), refuses a query that matches more than one stream
(which one would be decoded is chance), and reads from the stream's metadata
what the chip reports with GET_CONFIG: the channel count, the nominal rate and
each channel's unit (``desc/channels/channel/unit``, the XDF convention:
microvolts, millivolts, volts).  A stream that declares no unit, an
irregular rate or a non-numeric format is refused: a wrong scale would be a
silent wrong decode.  Samples are converted to microvolts in the reader
thread.

The inlet is opened without liblsl's own recovery, so a stream that vanishes
(its outlet closed, its app crashed) is noticed at once: the hand goes to its
safe posture, the loss is counted (``stream_losses``), and the stream is
looked for again by the same query (a continuous resolver, polled every
:data:`RECONNECT_POLL_S`); a stream that comes back is checked
against the bundle again before it is decoded (``config_mismatches``
otherwise), and the samples missed meanwhile reach the decoder as a gap,
estimated from the arrival clock as after a chip reset.  Gaps inside a
stream are found from its timestamps (:mod:`.source`).  Timestamps are
liblsl's, corrected to this machine's clock (``proc_clocksync``) and not
dejittered: dejittering would smooth a gap away.

pylsl is imported only in :meth:`LslSource.open`.
"""
import numpy as np

from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, UsageError
from neurohand.firmware_bridge.streams.source import READER_WAKE_S, SignalSource

PREFIX = "lsl:"
#: Properties a spec may query, as liblsl names them.
QUERY_PROPERTIES = ("name", "type", "source_id")
#: How long ``open`` looks for the stream (seconds).
RESOLVE_TIMEOUT_S = 5.0
#: After the stream was found, how long to wait for a second one that the same query matches.
AMBIGUITY_WAIT_S = 0.25
#: How often a lost stream is looked for, how long liblsl remembers a stream that stopped answering,
#: and how long opening it may take (the reader thread must notice a stop within source.JOIN_TIMEOUT_S).
RECONNECT_POLL_S = 0.1
RECONNECT_FORGET_S = 1.0
RECONNECT_OPEN_S = 1.0
#: Seconds of data liblsl keeps for this inlet when the reader falls behind; older samples
#: are dropped by liblsl and then show as a gap in the timestamps.
INLET_BUFFER_S = 2
#: Samples read at most per wake (the reader loops while more are waiting).
MAX_CHUNK_SAMPLES = 1024
#: Units of the XDF convention (lower case) -> microvolts per unit.
UNIT_TO_UV = {"microvolts": 1.0, "microvolt": 1.0, "uv": 1.0, "\u00b5v": 1.0, "\u03bcv": 1.0,
              "millivolts": 1e3, "millivolt": 1e3, "mv": 1e3,
              "volts": 1e6, "volt": 1e6, "v": 1e6,
              "nanovolts": 1e-3, "nanovolt": 1e-3, "nv": 1e-3}
#: Channel formats decoded, and the numpy type each is read into.
NUMERIC_FORMATS = {"float32": np.float32, "double64": np.float64, "int32": np.int32, "int16": np.int16,
                   "int8": np.int8}


def parse_spec(spec):
    """``lsl:...`` -> (property, value) to resolve by; UsageError for anything else."""
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        raise UsageError("an LSL source is lsl:NAME or lsl:type=TYPE, but got {!r}".format(spec))
    query = spec[len(PREFIX):]
    prop, equals, value = query.partition("=")
    if not equals:
        prop, value = "name", query
    if prop not in QUERY_PROPERTIES:
        raise UsageError("--chip {!r}: an LSL stream is found by {} (lsl:NAME, lsl:type=EEG, lsl:source_id=ID), "
                         "not by {!r}".format(spec, ", ".join(QUERY_PROPERTIES), prop))
    # liblsl puts the value into an XPath query between single quotes.
    if not value.strip() or any(c in value for c in "'\"\\") or any(ord(c) < 32 for c in value):
        raise UsageError("--chip {!r}: the LSL stream's {} must be non-empty, without quotes, backslashes or "
                         "control characters".format(spec, prop))
    return prop, value


def _import_pylsl():
    try:
        import pylsl
    except ImportError as exc:   # also raised when pylsl is there but liblsl is not
        raise UsageError("--chip lsl:... needs pylsl and liblsl (pip install 'neurohand[lab]'; on a Jetson see "
                         "docs/lab-streams.md): {}".format(exc)) from None
    return pylsl


def _lost_error(pylsl):
    """pylsl's LostError (the package exports it from 1.16's pylsl.pylsl, 1.17+'s pylsl.util keeps it)."""
    for module in (pylsl, getattr(pylsl, "util", None), getattr(pylsl, "pylsl", None)):
        error = getattr(module, "LostError", None)
        if isinstance(error, type):
            return error
    raise UsageError("this pylsl ({}) has no LostError; install pylsl 1.16 or later".format(
        getattr(pylsl, "__version__", "unknown version")))


def unit_factor(unit):
    """Microvolts per ``unit`` (a stream's unit text), or None when it is not a voltage unit known here."""
    return UNIT_TO_UV.get(unit.strip().lower()) if isinstance(unit, str) else None


def read_channels(info):
    """(labels, units) of a full StreamInfo's ``desc/channels``; missing entries are ''."""
    labels, units = [], []
    channel = info.desc().child("channels").child("channel")
    while not channel.empty() and len(labels) < info.channel_count():
        labels.append(channel.child_value("label"))
        units.append(channel.child_value("unit"))
        channel = channel.next_sibling("channel")
    missing = info.channel_count() - len(labels)
    return labels + [""] * missing, units + [""] * missing


class LslSource(SignalSource):
    """An LSL stream as a signal source; see the module docstring.  The constructor only stores the spec."""

    noun = "LSL stream"

    def __init__(self, spec, resolve_timeout_s=None):
        super(LslSource, self).__init__(spec)
        self.query = parse_spec(spec)
        self.resolve_timeout_s = RESOLVE_TIMEOUT_S if resolve_timeout_s is None else float(resolve_timeout_s)
        self.stream_info = None
        self._pylsl = None
        self._lost_error = None
        self._inlet = None
        self._finder = None
        self._factors = None
        self._dtype = None
        self._counters.update({"stream_losses": 0, "reconnects": 0, "config_mismatches": 0,
                               "ambiguous_reconnects": 0})

    @staticmethod
    def check_spec(spec):
        parse_spec(spec)
        return spec

    def open(self):
        """Find the stream, read its metadata, open the inlet; UsageError/LinkError/ConfigError name it."""
        self._pylsl = _import_pylsl()
        self._lost_error = _lost_error(self._pylsl)
        infos = self._resolve(1, self.resolve_timeout_s)
        if infos:
            # A second, short look: a second stream of that name or type on a slower host must be seen,
            # or which one is decoded would be chance.
            infos = _unique(infos + self._resolve(2, AMBIGUITY_WAIT_S))
        if not infos:
            raise LinkError("no LSL stream with {} {!r} found within {:g} s (is its app streaming? liblsl looks as "
                            "far as its ResolveScope and KnownPeers allow, docs/lab-streams.md)".format(
                                self.query[0], self.query[1], self.resolve_timeout_s))
        if len(infos) > 1:
            raise ConfigError("{} LSL streams have {} {!r} ({}); give the one to decode, e.g. lsl:source_id=ID".format(
                len(infos), self.query[0], self.query[1], ", ".join(
                    "{} (source_id {!r} on {})".format(i.name(), i.source_id(), i.hostname()) for i in infos)))
        self._connect(infos[0])
        return self

    def _resolve(self, minimum, timeout_s):
        prop, value = self.query
        return list(self._pylsl.resolve_byprop(prop, value, minimum, timeout_s))

    def _connect(self, info, timeout_s=None):
        """Open an inlet on ``info`` and read its configuration (sets ``chip_config``)."""
        pylsl = self._pylsl
        timeout_s = self.resolve_timeout_s if timeout_s is None else timeout_s
        inlet = pylsl.StreamInlet(info, max_buflen=INLET_BUFFER_S, max_chunklen=0, recover=False,
                                  processing_flags=pylsl.proc_clocksync)
        try:
            full = inlet.info(timeout_s)
            config = self._read_config(full)
            inlet.open_stream(timeout_s)
        except BaseException as exc:
            inlet.close_stream()
            if isinstance(exc, Exception) and not isinstance(exc, (ConfigError, UsageError, LinkError)):
                raise LinkError("LSL stream {}: {}".format(self.url, exc)) from exc
            raise
        self._inlet, self.stream_info = inlet, full
        self._dtype, self._factors, labels = config
        self._configured(full.channel_count(), full.nominal_srate(), labels)

    def _read_config(self, info):
        where = "LSL stream {!r} (from {})".format(info.name(), self.url)
        rate = info.nominal_srate()
        if not rate > 0:
            raise ConfigError("{} has an irregular rate (nominal_srate {!r}); the decoder needs a regular one".format(
                where, rate))
        fmt = _format_name(self._pylsl, info.channel_format())
        if fmt not in NUMERIC_FORMATS:
            raise ConfigError("{} sends {} samples; numeric ones ({}) are decoded".format(
                where, fmt, ", ".join(sorted(NUMERIC_FORMATS))))
        labels, units = read_channels(info)
        factors = []
        for index, unit in enumerate(units):
            factor = unit_factor(unit)
            if factor is None:
                raise ConfigError("{}: channel {} ({!r}) has unit {!r}; the decoder needs a voltage unit in the "
                                  "stream's metadata (desc/channels/channel/unit: microvolts, millivolts or volts)"
                                  .format(where, index, labels[index], unit))
            factors.append(factor)
        factors = np.asarray(factors, dtype=np.float64)
        return NUMERIC_FORMATS[fmt], (None if np.all(factors == 1.0) else factors), labels

    def _stream(self):
        buffer = None
        first = True
        while not self.stopping():
            inlet = self._inlet
            if inlet is None:
                if not self._reconnect():
                    continue
                first = True
                inlet = self._inlet
            if buffer is None or buffer.shape[1] != self.chip_config.n_channels or buffer.dtype != self._dtype:
                buffer = np.empty((MAX_CHUNK_SAMPLES, self.chip_config.n_channels), dtype=self._dtype)
            try:
                # Wait for one sample, then take all that are there: latency is one sample, not a chunk.
                _, stamps = inlet.pull_chunk(timeout=READER_WAKE_S, max_samples=1, dest_obj=buffer[:1])
                n = len(stamps)
                if n == 0:
                    continue
                _, more = inlet.pull_chunk(timeout=0.0, max_samples=MAX_CHUNK_SAMPLES - 1, dest_obj=buffer[1:])
            except self._lost_error as exc:
                self._counters["stream_losses"] += 1
                # Destroyed, not only closed: a lost inlet kept alive keeps trying its old outlet, and
                # liblsl's next resolve waits for that (seconds) instead of answering within its timeout.
                inlet = None
                self._drop_inlet()
                self._lost("its outlet is gone ({})".format(exc), exc)
                continue
            n += len(more)
            last = more[-1] if len(more) else stamps[0]
            self._deliver(self._microvolts(buffer[:n]), stamps[0], last, stream_start=first)
            first = False

    def _microvolts(self, block):
        if self._factors is None:
            return block.copy() if block.dtype.kind == "f" else block.astype(np.float32)
        return np.multiply(block, self._factors, dtype=np.float64)

    def _reconnect(self):
        """Look for the lost stream once; True when it is back and fits the bundle."""
        if self._finder is None:
            # A continuous resolver, polled: liblsl's one-shot resolve can overrun its timeout by seconds
            # while a stream is (re)appearing, and the reader must notice a stop quickly.
            prop, value = self.query
            self._finder = self._pylsl.ContinuousResolver(prop=prop, value=value, forget_after=RECONNECT_FORGET_S)
        if self._stop.wait(RECONNECT_POLL_S):
            return False
        lost = self.stream_info.uid() if self.stream_info is not None else None
        infos = [i for i in _unique(self._finder.results()) if i.uid() != lost]
        if len(infos) > 1 and self.stream_info is not None and self.stream_info.source_id():
            # The app restarted (a new uid): the stream with the same source_id is the same stream.
            infos = [i for i in infos if i.source_id() == self.stream_info.source_id()]
        if len(infos) != 1:
            if len(infos) > 1:
                self._counters["ambiguous_reconnects"] += 1
            return False
        try:
            previous = self.chip_config
            self._connect(infos[0], RECONNECT_OPEN_S)
            if self._check_config is not None:
                self._check_config(self.chip_config)
        except ConfigError as exc:
            self._counters["config_mismatches"] += 1
            self._drop_inlet()
            self.chip_config = previous
            # Never decoded: the hand stays safe, and the stream is looked for again.
            self._receiver.report_fault("chip_config", "after the LSL stream came back: {}".format(exc))
            self._stop.wait(1.0)
            return False
        except LinkError:
            self._drop_inlet()
            return False
        self._counters["reconnects"] += 1
        self._finder = None
        self._receiver.connection_made(self)
        return True

    def _drop_inlet(self):
        inlet, self._inlet = self._inlet, None
        close_inlet(inlet)

    def _release(self):
        self._finder = None
        self._drop_inlet()


def close_inlet(inlet):
    """Close a pylsl inlet being dropped (None: nothing); one that is already broken raises nothing."""
    if inlet is not None:
        try:
            inlet.close_stream()
        except Exception:  # already broken; it is being dropped
            pass


def _unique(infos):
    """``infos`` without repeats (one stream answers each query of a resolve)."""
    seen, unique = set(), []
    for info in infos:
        if info.uid() not in seen:
            seen.add(info.uid())
            unique.append(info)
    return unique


def _format_name(pylsl, channel_format):
    """liblsl's channel format code -> its name (float32, string, ...)."""
    names = {getattr(pylsl, "cf_" + name, None): name
             for name in ("float32", "double64", "string", "int32", "int16", "int8", "int64")}
    return names.get(channel_format, "format {}".format(channel_format))
