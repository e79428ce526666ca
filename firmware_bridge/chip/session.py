"""Opening the chip for a run: the reconnecting serial link, the command
channel, a configuration check, START on open and STOP on close.

:func:`chip_opener` returns the ``open_chip(receiver)`` callable that
:class:`~neurohand.deploy.runtime.loop.RealtimeRunner` calls; the receiver
(a ChipReceiver) becomes the link's protocol object, so the link's reader
thread feeds the parser directly.

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
"""
import threading

from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, ProtocolError

#: Default UART speed of the chip link (ignored by pseudo-terminals).
DEFAULT_BAUDRATE = 3000000


#: Longest the restarter thread sleeps before it looks at its stop flag.
RESTARTER_WAKE_S = 0.1
#: Backoff of a re-start whose command got no reply: first wait, longest wait (s).
RESTART_RETRY_INITIAL_S = 0.05
RESTART_RETRY_MAX_S = 1.0


class ChipRestarter(object):
    """Re-checks the configuration and re-sends START after each reconnect, in its own thread.

    Parameters
    ----------
    channel : ChipCommandChannel
    receiver : ChipReceiver (``hold_frames``, ``release_frames``, ``report_fault``)
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
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
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
        retry_s = self._retry_initial_s
        while not self._stop.is_set():
            if not self._wanted.wait(RESTARTER_WAKE_S):
                continue
            self._wanted.clear()
            if self._stop.is_set():
                return
            if self._restart():
                retry_s = self._retry_initial_s
                continue
            # No reply (or a NAK): try again while the port is there; a new reconnect wakes us anyway.
            if self._stop.wait(retry_s):
                return
            retry_s = min(2.0 * retry_s, self._retry_max_s)
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


class ChipSession(object):
    """An open chip link that is streaming.  ``close()`` sends STOP (best effort) and closes."""

    def __init__(self, link, channel, chip_config, restarter=None):
        self.link = link
        self.channel = channel
        self.chip_config = chip_config
        self.restarter = restarter

    @property
    def counters(self):
        counters = self.link.counters.as_dict()
        if self.restarter is not None:
            counters.update(self.restarter.counters)
        return counters

    def close(self):
        try:
            if self.restarter is not None:
                self.restarter.stop()
            self.channel.stop_streaming()
        except (LinkError, ProtocolError):
            pass  # the chip may be gone already; closing the port is what matters now
        finally:
            self.link.close()


def chip_opener(url, n_channels, sample_rate_hz, scale_uv=None, baudrate=DEFAULT_BAUDRATE,
                command_timeout_s=0.5):
    """Return ``open_chip(receiver) -> ChipSession`` for the chip at ``url``.

    On open: the link starts (LinkError if the port cannot be opened), the
    chip's configuration is read and compared with what the bundle expects
    (``n_channels``, ``sample_rate_hz`` and, if given, one ``scale_uv`` for
    every channel): a mismatch raises ConfigError before any data is decoded.
    Then START is sent.  After every reconnect of the link the same check and
    START are repeated by a :class:`ChipRestarter` (see the module docstring).
    """
    from neurohand.firmware_bridge.chip.protocol import ChipCommandChannel
    from neurohand.firmware_bridge.link import SerialLink

    def check(chip_config):
        _check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv)

    def open_chip(receiver):
        link = SerialLink(url, receiver, baudrate=baudrate)
        link.open()
        restarter = None
        try:
            channel = ChipCommandChannel(link.write, timeout_s=command_timeout_s)
            receiver.on_reply = channel.handle_reply
            chip_config = channel.get_config()
            check(chip_config)
            restarter = ChipRestarter(channel, receiver, check, lambda: link.connected).start()
            receiver.on_reconnect = restarter.link_reconnected
            channel.start_streaming()
        except BaseException:
            receiver.on_reconnect = None
            if restarter is not None:
                restarter.stop()
            link.close()
            raise
        return ChipSession(link, channel, chip_config, restarter)

    return open_chip


def _check_chip_config(url, chip_config, n_channels, sample_rate_hz, scale_uv):
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
        raise ConfigError("chip at {} is configured for {}".format(url, "; ".join(problems)))
