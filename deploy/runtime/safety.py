"""When the hand must not follow the decoder, and what it does instead.

States::

    starting --N good windows--> ok --fault--> safe --N good windows--> ok
        (safe posture)                          (safe posture)

Faults: ``data_timeout`` (no trustworthy decoded command for
``data_timeout_ms``, whatever the cause: chip frames missing, every window
dropped because it touches a gap, or decoding too slow; checked by the writer
every time it wakes, i.e. at least once per writer period),
``decoder_error`` (the backend raised), ``non_finite_output`` (NaN/inf from
the backend), ``invalid_command`` (the writer's last check found a
non-finite or out-of-range position), ``hand_error`` (the hand link failed;
logged, the posture is unchanged because the hand cannot be told anything),
``chip_config`` (the chip came back from a reconnect configured differently
from the bundle: its frames are no longer decoded), ``source_lost`` (a
signal source that says when it is gone, an LSL stream or a BrainFlow board,
reported itself lost: the safe posture at once, without waiting for the data
timeout, and counted apart from ``data_timeout`` so that a vanished stream is
told from a slow or gappy one; while ``starting`` it is logged and counted
like a data timeout, the hand being in its safe posture already).

:meth:`require_recovery` is for events that are not faults but after which
the hand must start again from its safe posture (``hand_reconnected``: the
hand's port came back after an outage).

The watchdog's rule.  A command is trustworthy when its window decoded to
finite outputs and its data are fresh: the command's age (now minus the
arrival of the window's last sample, ``DecodedCommand.arrival_s``) is at most
``data_timeout_s``.  The writer reports each command it takes
(:meth:`on_command`) and then asks :meth:`check`; when the newest command's
data arrived more than ``data_timeout_s`` ago, the hand gets the safe
posture.  Frames arriving do not feed the watchdog: a chip that streams while
every window is dropped for gaps, or a decoder that finishes each window too
late, leaves the hand as stale as a silent chip.

Recovery rule: ``recovery_windows`` consecutive decoded windows with finite
outputs and fresh data after the last fault; "consecutive" means each
window's data arrived within ``data_timeout_s`` of the previous good one's;
any fault restarts the count.
The decoder resets the post-processor to the safe posture while not ``ok``,
so the first command after recovery moves away from the posture no faster
than the slew limit.

While ``starting`` the hand is already in the safe posture, so a data timeout
there is not a fault (the chip may take a while to start streaming).

The safe posture is ``open`` (all fingers 0) or ``hold`` (the last command
sent while ``ok``; open if there was none).

Thread use: the decoder thread calls :meth:`on_valid_data`,
:meth:`on_good_window`, :meth:`on_fault`; the writer thread calls
:meth:`on_command`, :meth:`check`, :meth:`note_sent`, :meth:`safe_posture`;
a lock guards the transitions.  Event listeners are called outside the lock and must not block.
"""
import threading

import numpy as np

STARTING = "starting"
OK = "ok"
SAFE = "safe"

#: Kinds of fault events (counted in ``count``).
FAULT_KINDS = ("data_timeout", "decoder_error", "non_finite_output", "invalid_command", "hand_error",
               "chip_config", "source_lost")
#: Faults that leave the state ``starting`` as it is: no data yet is what starting means.
_NO_DATA_KINDS = ("data_timeout", "source_lost")
#: Events kept in the log; later ones are only counted.
MAX_LOGGED_EVENTS = 1000


class SafetySupervisor(object):
    """Decides whether decoded commands may reach the hand.

    Parameters
    ----------
    safe_posture : {"open", "hold"}
    data_timeout_s : float
        Longest time without a trustworthy decoded command before the safe posture.
    recovery_windows : int
        Consecutive good windows needed to (re)enter ``ok``.
    n_outputs : int
    start_s : float
        Monotonic time the run started (event times are relative to it).
    """

    def __init__(self, safe_posture, data_timeout_s, recovery_windows, n_outputs, start_s):
        self.safe_posture_name = safe_posture
        self.data_timeout_s = float(data_timeout_s)
        self.recovery_windows = int(recovery_windows)
        self.start_s = float(start_s)
        self._open = np.zeros(int(n_outputs))
        self._last_good = None
        self._lock = threading.Lock()
        self.state = STARTING
        self._good_windows = 0
        self._fault_kind = None
        # Written by the decoder thread without the lock: a float/int store is
        # atomic in CPython and the writer only compares against it.
        self.last_data_s = float(start_s)
        self.last_sample = 0
        # Arrival of the data of the newest command the writer took (writer thread).
        self.last_command_data_s = float(start_s)
        # Arrival of the data of the previous good window (decoder thread, recovery count).
        self._previous_good_s = None
        self.counts = {kind: 0 for kind in FAULT_KINDS}
        self.events = []
        self.events_dropped = 0
        self.listeners = []

    @classmethod
    def from_config(cls, config, n_outputs, start_s):
        return cls(config.safe_posture, config.data_timeout_ms / 1000.0, config.recovery_windows,
                   n_outputs, start_s)

    @property
    def is_ok(self):
        return self.state == OK

    def on_valid_data(self, now_s, sample):
        """A valid chip frame arrived at ``now_s``; ``sample`` = index after its last sample."""
        self.last_data_s = now_s
        self.last_sample = sample

    def on_good_window(self, now_s, data_s=None):
        """A window decoded to finite outputs at ``now_s``; its last sample arrived at ``data_s``
        (None: ``now_s``).  Returns True if the state is ``ok`` after it.

        A window whose data are older than the data timeout is stale: it does
        not count towards recovery (and the writer will not send its command).
        """
        data_s = now_s if data_s is None else data_s
        previous, self._previous_good_s = self._previous_good_s, data_s
        if self.state == OK:
            return True
        event = None
        with self._lock:
            if self.state != OK:
                if now_s - data_s > self.data_timeout_s:
                    self._good_windows = 0
                    return False
                if previous is not None and data_s - previous > self.data_timeout_s:
                    # The good windows before this one were not followed closely enough.
                    self._good_windows = 0
                self._good_windows += 1
                if self._good_windows >= self.recovery_windows:
                    event = self._log("recovered" if self.state == SAFE else "ready", now_s,
                                      "{} good windows".format(self._good_windows))
                    self.state = OK
                    self._fault_kind = None
            ok = self.state == OK
        self._notify(event)
        return ok

    def on_fault(self, kind, now_s, reason):
        """Enter the safe posture because of ``kind`` (one of FAULT_KINDS)."""
        if kind not in self.counts:
            raise ValueError("unknown fault kind {!r}".format(kind))
        event = None
        with self._lock:
            self.counts[kind] += 1
            if kind == "hand_error":
                # The posture cannot change if the hand cannot be reached; log only.
                event = self._log(kind, now_s, reason)
            else:
                if self.state != SAFE or self._fault_kind != kind:
                    event = self._log(kind, now_s, reason)
                if self.state != STARTING or kind not in _NO_DATA_KINDS:
                    self.state = SAFE
                    self._fault_kind = kind
                self._good_windows = 0
        self._notify(event)

    def require_recovery(self, kind, now_s, reason):
        """Log ``kind`` (not a fault) and hold the safe posture until the recovery rule is met again.

        For a hand whose port came back: it was told nothing during the outage,
        so it gets the safe posture first and decoded commands only after
        ``recovery_windows`` good windows (from the posture at the slew limit,
        as after any fault).
        """
        with self._lock:
            event = self._log(kind, now_s, reason)
            if self.state != STARTING:
                self.state = SAFE
                self._fault_kind = kind
            self._good_windows = 0
        self._notify(event)

    def note(self, kind, now_s, reason):
        """Log an event that is not a fault (e.g. ``shutdown``); the state is unchanged."""
        with self._lock:
            event = self._log(kind, now_s, reason)
        self._notify(event)

    def on_command(self, data_s):
        """The writer took a decoded command whose window's last sample arrived at ``data_s``."""
        if data_s > self.last_command_data_s:
            self.last_command_data_s = data_s

    def check(self, now_s):
        """Writer's watchdog.  Returns True if decoded commands may be sent now."""
        stale_s = now_s - self.last_command_data_s
        if stale_s > self.data_timeout_s and self.state == OK:
            chip_silent_s = now_s - self.last_data_s
            if chip_silent_s > self.data_timeout_s:
                reason = "no valid chip data for {:.0f} ms".format(chip_silent_s * 1000.0)
            else:
                reason = ("no trustworthy decoded command for {:.0f} ms although chip data arrive (windows "
                          "dropped for gaps, or decoding too slow)".format(stale_s * 1000.0))
            self.on_fault("data_timeout", now_s, reason)
        return self.state == OK

    def note_sent(self, positions):
        """The writer sent decoded ``positions`` while ``ok`` (kept for ``hold``)."""
        self._last_good = positions

    def safe_posture(self):
        """Positions for the safe posture, shape (n_outputs,), in 0..1."""
        if self.safe_posture_name == "hold" and self._last_good is not None:
            return self._last_good
        return self._open

    def _log(self, kind, now_s, reason):
        event = {"kind": kind, "time_s": round(now_s - self.start_s, 6), "reason": reason,
                 "sample": int(self.last_sample)}
        if len(self.events) < MAX_LOGGED_EVENTS:
            self.events.append(event)
        else:
            self.events_dropped += 1
        return event

    def _notify(self, event):
        if event is not None:
            for listener in self.listeners:
                listener(event)

    def summary(self):
        """JSON-ready: fault count, counts by kind, the event log and the final state."""
        with self._lock:
            return {"count": int(sum(self.counts.values())),
                    "by_kind": dict(self.counts),
                    "events": [dict(e) for e in self.events],
                    "events_not_logged": self.events_dropped,
                    "state": self.state}
