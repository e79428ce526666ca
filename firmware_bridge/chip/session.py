"""Opening the chip for a run: the reconnecting serial link, the command
channel, a configuration check, START on open and STOP on close.

:class:`ChipSession` opens the port once, reads the configuration, and then
streams on the same connection; :func:`chip_opener` returns the ``open_chip(receiver)`` callable that
:class:`~neurohand.deploy.runtime.realtime.RealtimeRunner` calls.  Once streaming,
the receiver (a ChipReceiver) is the link's protocol object, so the link's
reader thread feeds the parser directly.

**After a reconnect** (USB unplug and replug: the link reopens the port) a
chip that reset waits for START.  The link reports the reopen from its reader
thread (``ChipReceiver.connection_made`` -> ``on_reconnect``), which must not
wait for a reply: the replies arrive through that very thread.  So the
receiver only holds back data frames (nothing from an unchecked chip is
decoded) and wakes :class:`ChipRestarter`, a small thread of its own, which
reads the configuration again (GET_CONFIG), compares it with what the bundle
needs, lets frames through and sends START (idempotent on a chip that kept
streaming).  A chip that comes back configured differently is never decoded:
the restarter reports a ``chip_config`` fault (safe posture, logged) and
leaves the frames held until the next reconnect.  A command that gets no
reply (the port flapping) is retried with backoff while the link is up.

**Other signal sources.**  ``--chip`` may also name a source of the lab's
tools (:data:`SIGNAL_SOURCES`: ``lsl:NAME``, ``brainflow:BOARD[:PORT]``;
docs/lab-streams.md).  ``ChipSession(url)`` then returns that source, which
is opened, checked, streamed and closed exactly as a chip session is, and
feeds the same receiver; a device path opens the chip as before.
"""
import importlib
import threading

from neurohand.firmware_bridge.chip.parser import ChipParser, ChipReply
from neurohand.firmware_bridge.chip.protocol import BAUDRATE, ChipCommandChannel
from neurohand.firmware_bridge.link import SerialLink, check_port
from neurohand.firmware_bridge.shared.backoff import Backoff
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, ProtocolError


# Only a reconnect (link_reconnected) or stop() gives the restart thread work, and both wake it at once:
# the timeout is a backstop.  Its wakes take the interpreter lock from the decoding at random
# moments (docs/latency.md, "third pass"), so they are rare.
#: Longest the restarter thread sleeps before it looks at its stop flag.
RESTARTER_WAKE_S = 1.0
#: Backoff of a re-start whose command got no reply: first wait, longest wait (s).
RESTART_RETRY_INITIAL_S = 0.05
RESTART_RETRY_MAX_S = 1.0


class ChipRestarter(object):
    """Re-checks the configuration and re-sends START after each reconnect, in its own thread.

    Parameters
    ----------
    channel : ChipCommandChannel
    receiver : ChipReceiver (``release_frames``, ``report_fault``)
    check_config : callable(ChipConfig), raises ConfigError on a mismatch
    is_connected : callable () -> bool, whether the link has a port now

    :meth:`link_reconnected` is what the link's reader thread calls: it only
    sets an event.  Counters: ``chip_restarts`` (START acknowledged after a
    reconnect), ``chip_restart_failures`` (a command unanswered or refused;
    retried), ``chip_config_mismatches`` (refused to decode).
    """

    def __init__(self, channel, receiver, check_config, is_connected,
                 retry_initial_s=RESTART_RETRY_INITIAL_S, retry_max_s=RESTART_RETRY_MAX_S):
        self._channel = channel
        self._receiver = receiver
        self._check_config = check_config
        self._is_connected = is_connected
        self._retry = Backoff(retry_initial_s, retry_max_s)
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self.last_error = None
        self.counters = {"chip_restarts": 0, "chip_restart_failures": 0, "chip_config_mismatches": 0}

    def start(self):
        self._thread = threading.Thread(target=self._run, name="neurohand-chip-restart", daemon=True)
        self._thread.start()
        return self

    def link_reconnected(self):
        """The link reopened its port (called from its reader thread): re-start soon, never block."""
        self._wanted.set()

    def stop(self, timeout_s=3.0):
        """Stop the thread (a command in flight ends within its reply timeout and retries)."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise LinkError("the chip restart thread did not stop within {} s".format(timeout_s))

    def _run(self):
        while not self._stop.is_set():
            if not self._wanted.wait(RESTARTER_WAKE_S):
                continue
            self._wanted.clear()
            if self._stop.is_set():
                return
            if self._restart():
                self._retry.reset()
                continue
            # No reply (or a NAK): try again while the port is there; a new reconnect wakes us anyway.
            if self._stop.wait(self._retry.next_wait()):
                return
            if self._is_connected() and not self._wanted.is_set():
                self._wanted.set()

    def _restart(self):
        """One attempt; True when done (restarted, or refused for its configuration)."""
        receiver = self._receiver
        try:
            config = self._channel.get_config()
        except (LinkError, ProtocolError) as exc:
            return self._failed(exc)
        try:
            self._check_config(config)
        except ConfigError as exc:
            self.counters["chip_config_mismatches"] += 1
            self.last_error = exc
            # Frames stay held: a differently configured chip is never decoded.
            receiver.report_fault("chip_config", "after a reconnect: {}".format(exc))
            return True
        # Let frames through before START, so the first frames of the new stream are kept.
        receiver.release_frames()
        try:
            self._channel.start_streaming()
        except (LinkError, ProtocolError) as exc:
            return self._failed(exc)
        self.counters["chip_restarts"] += 1
        return True

    def _failed(self, exc):
        self.counters["chip_restart_failures"] += 1
        self.last_error = exc
        return False


class _ReplyReader(object):
    """The link's protocol object while the configuration is read: passes the
    chip's replies on, ignores anything else.  Streaming replaces it with the
    receiver itself, so the reader thread's path to the decoder has no extra hop."""

    def __init__(self, on_reply):
        self.parser = ChipParser()
        self.on_reply = on_reply

    def connection_made(self, link):
        pass

    def data_received(self, data):
        for event in self.parser.feed(data):
            if type(event) is ChipReply:
                self.on_reply(event)

    def connection_lost(self, exc):
        self.parser.flush()


#: Signal sources other than the chip, by the prefix of ``--chip``: name -> "module:class",
#: imported only when asked for (their libraries are optional extras).
SIGNAL_SOURCES = {
    "lsl": "neurohand.firmware_bridge.streams.lsl_inlet:LslSource",
    "brainflow": "neurohand.firmware_bridge.streams.brainflow_source:BrainFlowSource",
}


def source_kind(url):
    """The :data:`SIGNAL_SOURCES` name ``url`` starts with (``lsl:...`` -> "lsl"), or None for a port."""
    if isinstance(url, str):
        prefix, colon, _ = url.partition(":")
        if colon and prefix in SIGNAL_SOURCES:
            return prefix
    return None


def source_class(kind):
    """The class of signal source ``kind`` (a :data:`SIGNAL_SOURCES` name)."""
    module_name, class_name = SIGNAL_SOURCES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def check_chip_spec(name, url):
    """``url`` if it is a device path or a well-formed source spec; UsageError (one line) otherwise.

    ``name`` is the option (``--chip``).  A source spec is checked without
    opening anything (a BrainFlow board name is looked up in BrainFlow).
    """
    kind = source_kind(url)
    if kind is None:
        return check_port(name, url)
    return source_class(kind).check_spec(url)


class ChipSession(object):
    """One connection to the chip, opened once: configuration first, then streaming.

        session = ChipSession("/dev/neurohand-chip").open()   # reads GET_CONFIG: session.chip_config
        session.check(n_channels, sample_rate_hz)             # ConfigError if configured otherwise
        session.start_streaming(receiver)                      # bytes -> receiver, START, re-START on reconnect
        session.close()                                        # STOP (best effort), close the port

    The port is opened once for all of it (``neurohand run`` reads the chip's
    scale before it builds the runtime, and streams on the same connection).
    ``ChipSession("lsl:MyAmp")`` (any :data:`SIGNAL_SOURCES` prefix) returns
    that signal source instead, which has the same methods.
    """

    def __new__(cls, url, *args, **kwargs):
        kind = source_kind(url) if cls is ChipSession else None
        if kind is not None:
            # Not a ChipSession, so __init__ is not run on it: the source was built by its own class.
            return source_class(kind)(url)
        return super(ChipSession, cls).__new__(cls)

    def __init__(self, url, baudrate=BAUDRATE, command_timeout_s=0.5):
        # A device path only: a URL such as socket:// would reach the network (docs/chip-protocol.md).
        self.url = check_port("chip port", url)
        self.link = SerialLink(url, None, baudrate=baudrate)
        self.channel = ChipCommandChannel(self.link.write, timeout_s=command_timeout_s)
        self.link.protocol = _ReplyReader(self.channel.handle_reply)
        self._streaming = False
        self.chip_config = None
        self.restarter = None
        self._closed = False

    def open(self):
        """Open the port and read the chip's configuration; LinkError/ProtocolError name the port."""
        self.link.open()
        try:
            self.chip_config = self.channel.get_config()
        except (LinkError, ProtocolError) as exc:
            self.link.close()
            raise type(exc)("chip at {}: {}".format(self.url, exc)) from exc
        except BaseException:
            self.link.close()
            raise
        return self

    def check(self, n_channels, sample_rate_hz, scale_uv=None):
        """ConfigError unless the chip's configuration is what the decoder needs."""
        check_chip_config(self.url, self.chip_config, n_channels, sample_rate_hz, scale_uv)

    def start_streaming(self, receiver, check_config=None):
        """Hand every byte to ``receiver`` (a ChipReceiver) and send START.

        ``check_config(ChipConfig)`` (raises ConfigError) is what the
        :class:`ChipRestarter` checks again after each reconnect before it
        re-sends START.  Returns this session.
        """
        # The port is open already: the receiver counts this as its first open,
        # so only a later one is taken for a reconnect.
        receiver.connection_made(self.link)
        receiver.on_reply = self.channel.handle_reply
        self.link.protocol = receiver     # the reader thread reads this attribute for every chunk
        self._streaming = True
        try:
            if check_config is not None:
                link = self.link
                self.restarter = ChipRestarter(self.channel, receiver, check_config, lambda: link.connected).start()
                receiver.on_reconnect = self.restarter.link_reconnected
            self.channel.start_streaming()
        except BaseException:
            receiver.on_reconnect = None
            self.close()
            raise
        return self

    @property
    def counters(self):
        counters = dict(self.link.counters)
        if self.restarter is not None:
            counters.update(self.restarter.counters)
        return counters

    def close(self):
        """Stop streaming (best effort) and close the port.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.restarter is not None:
                self.restarter.stop()
            if self._streaming:
                self.channel.stop_streaming()
        except (LinkError, ProtocolError):
            pass  # the chip may be gone already; closing the port is what matters now
        finally:
            self.link.close()


def chip_opener(url, n_channels, sample_rate_hz, scale_uv=None, baudrate=BAUDRATE, command_timeout_s=0.5):
    """Return ``open_chip(receiver) -> ChipSession`` for the chip at ``url``.

    On open: the link starts (LinkError if the port cannot be opened), the
    chip's configuration is read and compared with what the bundle expects
    (``n_channels``, ``sample_rate_hz`` and, if given, one ``scale_uv`` for
    every channel): a mismatch raises ConfigError before any data is decoded.
    Then START is sent.  After every reconnect of the link the same check and
    START are repeated by a :class:`ChipRestarter` (see the module docstring).
    """
    def check(chip_config):
        check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv)

    def open_chip(receiver):
        session = ChipSession(url, baudrate, command_timeout_s).open()
        try:
            check(session.chip_config)
        except BaseException:
            session.close()
            raise
        return session.start_streaming(receiver, check)

    return open_chip


def read_chip_config(url, baudrate=BAUDRATE, timeout_s=0.5):
    """Open the chip at ``url`` briefly and return its ChipConfig (GET_CONFIG).

    Raises LinkError (port missing, no answer) or ProtocolError (refused),
    naming the port.
    """
    session = ChipSession(url, baudrate, timeout_s).open()
    session.close()
    return session.chip_config


def chip_scale_uv(url, chip_config):
    """The chip's µV per count, checked (finite, > 0)."""
    scale = float(chip_config.scale_uv)
    if not (scale > 0.0 and scale != float("inf")):
        raise ConfigError("chip at {} reports a scale of {!r} uV per count; it must be finite and positive".format(
            url, chip_config.scale_uv))
    return scale


def check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv=None):
    """ConfigError naming what differs unless ``chip_config`` is what the decoder needs.

    ``url``: the chip's port, or a signal source's spec (then named as that source).
    """
    problems = []
    if chip_config.n_channels != n_channels:
        problems.append("{} channels, the decoder needs {}".format(chip_config.n_channels, n_channels))
    if abs(chip_config.sample_rate_hz - float(sample_rate_hz)) > 1e-6 * float(sample_rate_hz):
        problems.append("{} Hz, the decoder needs {:g} Hz".format(chip_config.sample_rate_hz, sample_rate_hz))
    if scale_uv is not None:
        # The chip reports one float32 scale for all channels.
        wrong = [s for s in scale_uv if abs(float(s) - chip_config.scale_uv) > 1e-6 * max(abs(float(s)), 1e-12)]
        if wrong:
            problems.append("scale {:g} µV/count, the run was given {}".format(chip_config.scale_uv,
                                                                               list(scale_uv)))
    if problems:
        what = "chip at {}".format(url) if source_kind(url) is None else "signal source {}".format(url)
        raise ConfigError("{} is configured for {}".format(what, "; ".join(problems)))
