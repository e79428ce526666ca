"""The one small interface every hand driver implements.

The runtime's writer thread owns a driver and calls, at a fixed rate::

    hand.send(positions)        # ndarray (n_outputs,), float, 0 = open .. 1 = flexed
    hand.poll_telemetry()       # latest acknowledgement/telemetry since the last poll, or None
    hand.counters               # frames_sent, write_errors, acks, ...
    hand.reopen()               # after a LinkError: the port again (LinkError while still gone)
    hand.close()

``send`` is the last line of defence before the motors: a value that is not
finite, or outside 0..1, raises :class:`HandError` and nothing is written.
Drivers whose hand drops out of its command mode when commands stop (the
PSYONIC Ability Hand, neurohand-protocol hands) declare ``keepalive_period_s``:
the writer must call ``send`` (or ``keepalive``) at least that often.  The
drivers own no timer thread of their own, so exactly one thread decides what
the hand is told and when.

Decoder outputs are in the order of :data:`DECODER_FINGERS`; a sixth output,
where a decoder has one, is the thumb rotation.
"""
import numbers

import numpy as np

from neurohand.firmware_bridge.shared.errors import LinkError, NeurohandError

#: Order of the decoder's outputs, shared by every driver and the virtual hand.
DECODER_FINGERS = ("thumb", "index", "middle", "ring", "little")
#: Name of the optional sixth decoder output.
THUMB_ROTATION = "thumb_rotation"


class HandError(NeurohandError):
    """A command refused before it reached the hand, or a hand that cannot be used."""


def finger_names(n_outputs):
    """Names of the decoder outputs for a decoder with ``n_outputs`` outputs."""
    names = DECODER_FINGERS + (THUMB_ROTATION,)
    if not 1 <= n_outputs <= len(names):
        raise HandError("finger names are defined for 1 to {} outputs, not {}".format(
            len(names), n_outputs))
    return names[:n_outputs]


def check_positions(positions, n_outputs):
    """Return ``positions`` as a float64 array after refusing anything unsafe.

    Parameters
    ----------
    positions : array-like, shape (n_outputs,)
        Finger positions, 0 = fully open, 1 = fully flexed.
    n_outputs : int
        Number of positions the driver takes.

    Raises
    ------
    HandError
        Wrong shape, a non-finite value, or a value outside 0..1.  The message
        names the offending index and value.
    """
    try:
        array = np.asarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise HandError("finger positions must be numbers, got {!r}".format(positions)) from exc
    if array.shape != (n_outputs,):
        raise HandError("expected {} finger positions (shape ({},)), got shape {}".format(
            n_outputs, n_outputs, array.shape))
    # A handful of floats on every command's way out: a Python loop is faster than numpy's calls
    # (NaN fails the comparison too).  Only a refusal needs the checks below, for its message.
    for value in array.tolist():
        if not 0.0 <= value <= 1.0:
            break
    else:
        return array
    finite = np.isfinite(array)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise HandError("refusing non-finite finger position {!r} at index {}".format(
            float(array[index]), index))
    outside = (array < 0.0) | (array > 1.0)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise HandError("refusing finger position {!r} at index {}: allowed range is 0..1".format(
            float(array[index]), index))
    return array


def check_fraction(name, value):
    """Return ``value`` as float if it is a finite number in 0..1, else raise HandError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HandError("{} must be a number in 0..1, got {!r}".format(name, value))
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also false for NaN
        raise HandError("{} must be in 0..1, got {!r}".format(name, value))
    return value


class HandDriver(object):
    """Base class: validation, counters and the keep-alive contract.

    Subclasses implement :meth:`open`, :meth:`_write_positions` and, where the
    hand talks back, :meth:`poll_telemetry`.  The constructor stores
    configuration only; :meth:`open` touches hardware (``create_hand`` calls it).

    Attributes
    ----------
    n_outputs : int
        Number of decoder outputs ``send`` takes.
    keepalive_period_s : float or None
        The writer must call ``send``/``keepalive`` at least this often; None
        where the hand needs no keep-alive.
    counters : dict
        ``frames_sent``, ``write_errors``, ``refused`` and driver-specific
        counts; read it from any thread, it is only replaced, never resized.
    """

    keepalive_period_s = None

    def __init__(self, n_outputs):
        self.n_outputs = n_outputs
        self.counters = {"frames_sent": 0, "write_errors": 0, "refused": 0}
        self._last_positions = None

    def open(self):
        """Acquire the hardware; returns self.  Default: nothing to acquire."""
        return self

    def send(self, positions):
        """Validate ``positions`` (shape (n_outputs,), 0..1) and command the hand.

        Raises HandError for unsafe values (nothing is written) and LinkError
        when the link to the hand failed.
        """
        try:
            checked = check_positions(positions, self.n_outputs)
        except HandError:
            self.counters["refused"] += 1
            raise
        self._write_positions(checked)
        self._last_positions = checked
        self.counters["frames_sent"] += 1

    def keepalive(self):
        """Resend the last positions, for a writer with nothing new to say.

        Does nothing before the first ``send``: a hand is never moved to a
        position nobody asked for.
        """
        if self._last_positions is not None:
            self.send(self._last_positions)

    def reopen(self):
        """Close the link to the hand and open it again (same port, e.g. a udev symlink).

        The writer calls this after ``send`` raised LinkError (the port
        vanished: a cable or USB glitch).  Raises LinkError while the port is
        still missing.  The driver's validation is unchanged: ``send`` still
        refuses non-finite or out-of-range values.  Default: ``close`` then
        ``open``, which suits drivers whose ``open`` builds a fresh link.
        """
        self.close()
        return self.open()

    def _write_positions(self, positions):
        raise NotImplementedError

    def poll_telemetry(self):
        """Latest telemetry received since the previous call, or None."""
        return None

    def close(self):
        """Release the hardware.  Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "{}(n_outputs={})".format(type(self).__name__, self.n_outputs)


class SerialHandDriver(HandDriver):
    """A hand on a serial port: one reconnecting link (:mod:`neurohand.firmware_bridge.link`,
    the same as the chip's) and a parser of what the hand sends back.

    Subclasses give ``label`` (for messages), ``_make_parser()`` (an object
    with ``feed(data)``, called from the link's reader thread, and
    ``take_latest()``) and ``frame_for(positions)``, the bytes of one command.
    The port is opened exclusively: no second runtime can drive the same hand.
    When the port vanishes the link looks for it again by itself, with
    backoff; :meth:`reopen` only tells the writer whether it is back.
    """

    label = "hand"

    def __init__(self, port, n_outputs, baudrate, write_timeout_s):
        super(SerialHandDriver, self).__init__(n_outputs)
        self.port = port
        self.baudrate = baudrate
        self.write_timeout_s = write_timeout_s
        self._parser = None
        self._link = None

    def open(self):
        from neurohand.firmware_bridge.link import FeedProtocol, SerialLink

        self._parser = self._make_parser()
        link = SerialLink(self.port, FeedProtocol(self._parser.feed), baudrate=self.baudrate,
                          write_timeout_s=self.write_timeout_s, exclusive=True)
        self._link = link.open()
        return self

    def reopen(self):
        if self._link is None:
            return self.open()
        if not self._link.connected:
            raise LinkError("{} port {!r} is still gone".format(self.label, self.port))
        return self

    def _make_parser(self):
        raise NotImplementedError

    def frame_for(self, positions):
        raise NotImplementedError

    def _frame_sent(self):
        """Called after each frame written completely (e.g. to advance a sequence number)."""

    def _write_positions(self, positions):
        if self._link is None:
            raise HandError("{} on {!r} is not open".format(self.label, self.port))
        try:
            self._link.write(self.frame_for(positions))
        except Exception:
            self.counters["write_errors"] += 1
            raise
        self._frame_sent()

    def poll_telemetry(self):
        return None if self._parser is None else self._parser.take_latest()

    def close(self):
        if self._link is not None:
            link, self._link = self._link, None
            link.close()


class NullHand(HandDriver):
    """``none``: validates and counts commands, drives nothing (decoder-only runs)."""

    def _write_positions(self, positions):
        pass
