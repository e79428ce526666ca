"""SIGINT/SIGTERM from the first moment of a command to its end (standard library only).

``neurohand run`` spends its first second or more loading the bundle,
opening the backend and the ports.  A stop signal then must not kill the
process mid-way (no message, a recording without its end chunk): the
handlers are installed first, a signal is only noted, and the command looks
at the note between start-up steps (:meth:`StopSignals.raise_if_stopped`)
and hands it to the run once there is one (:meth:`StopSignals.attach`), whose
shutdown then closes everything properly.
"""
import signal


class StoppedDuringStartup(Exception):
    """A stop signal arrived before the run started; ``reason`` is the signal's name."""

    def __init__(self, reason):
        Exception.__init__(self, "stopped by {} during start-up".format(reason))
        self.reason = reason


class StopSignals(object):
    """Context manager: SIGINT/SIGTERM handlers that note the stop and pass it to an attached runner.

    Main thread only (the rule of :func:`signal.signal`); the previous handlers
    come back on exit.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self._signals = tuple(signals)
        self._previous = {}
        self._runner = None
        self.reason = None

    def __enter__(self):
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        previous, self._previous = self._previous, {}
        for signum, old in previous.items():
            signal.signal(signum, old)
        return False

    def _handle(self, signum, frame):
        if self.reason is None:
            self.reason = signal.Signals(signum).name
        runner = self._runner
        if runner is not None:
            runner.request_stop(signal.Signals(signum).name)

    def raise_if_stopped(self):
        """StoppedDuringStartup if a stop signal came and no runner has taken it yet."""
        if self.reason is not None and self._runner is None:
            raise StoppedDuringStartup(self.reason)

    def attach(self, runner):
        """From now on a signal asks ``runner`` to stop; one noted before is passed on at once."""
        self._runner = runner
        if self.reason is not None:
            runner.request_stop(self.reason)

    def detach(self):
        self._runner = None
