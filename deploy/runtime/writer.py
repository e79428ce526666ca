"""The hand-writing stage: decides what the hand is told, checks it, sends it.

Pure and synchronous like the decode stage: the real-time shell calls
:meth:`HandWriterStage.step` from its writer thread (when a new command
arrives, and at least once per writer period otherwise), fast replay calls
it in process with a virtual clock.

Per call::

    supervisor.on_command(command.arrival_s) # a new command: how fresh its data are
    may_send = supervisor.check(now)        # watchdog: a trustworthy command within the data timeout
    new command and may_send  -> send it    (latency measured)
    no new command, may_send  -> resend the last positions (keep-alive)
    not may_send              -> send the safe posture
    last line: every position finite and in 0..1, or the safe posture is sent instead

Movement classes (a model with a class head): the hand is told the class
decided with the positions it is sent, through the driver's optional
``set_class(index or None)``, called right before ``send``: a new command's
``decided``, the last one again for a keep-alive, and None (no class) with the
safe posture, so no key bound to a class stays pressed while the hand is held.
Drivers without ``set_class`` never hear of classes.

The check right before ``hand.send`` is the one that guarantees a NaN or an
out-of-range value never reaches the hand, whatever happened upstream.

``publish(positions, arrival_s)`` (``--lsl-outlet``), when given, is called
for each new command once the hand was written (its latency measured first):
with what the hand was told, stamped with the arrival of the command's data.

A vanished hand port (``hand.send`` raised LinkError: cable or USB glitch)
starts an outage, logged once (``hand_error``).  During it nothing is
written; each command that could not be delivered is counted in
``hand_errors``, and ``hand.reopen()`` is tried with bounded exponential
backoff (``reopen_initial_s`` doubling to ``reopen_max_s``), from this stage,
i.e. from the writer thread: a failed open of a missing port takes
microseconds and the decode thread never waits on it.  Once the port is back
the first thing written is the safe posture; the outage ends when that write
succeeded (``hand_reconnects``, event ``hand_reconnected``), and decoded
commands follow only after the recovery rule is met again
(``SafetySupervisor.require_recovery``).
"""
import numpy as np

from neurohand.deploy.runtime.classes import class_name
from neurohand.firmware_bridge.shared.backoff import Backoff
from neurohand.firmware_bridge.shared.errors import LinkError

#: First wait before reopening a vanished hand port, and the longest (seconds).
REOPEN_INITIAL_S = 0.05
REOPEN_MAX_S = 1.0


class HandWriterStage(object):
    """Owns the decision and the ``hand.send`` call.

    Parameters
    ----------
    hand : object
        ``send(positions (n_outputs,) float 0..1)``; may raise (link failure).
    supervisor : SafetySupervisor
    stats : RuntimeStats
        Receives ``write`` timings and the end-to-end ``latency``.
    timer : callable () -> float seconds
        Monotonic clock for the ``write`` duration and the latency (the same
        clock the reader stamps arrivals with).
    n_outputs : int
    measure_latency : bool
        False in fast replay, where arrival times are virtual.
    reopen_initial_s, reopen_max_s : float
        Backoff of ``hand.reopen()`` after the hand's port vanished: the
        first attempt after ``reopen_initial_s``, then doubling up to
        ``reopen_max_s`` between attempts.
    publish : callable(positions, arrival_s) or None
        Told what the hand was sent for each new command, after the write;
        timed into the ``publish`` stage of ``stats``.
    class_names : sequence of str
        The model's movement classes (empty without a class head): ``class_counts`` counts the new
        commands sent per decided class, and ``current_class`` is the class the hand was last told.
    sent_classes : list or None
        Where given, the class told with every command the hand was sent (keep-alives and safe
        postures included, in order; None = no class): ``replay --realtime`` pairs them with the
        commands its virtual hand received.
    """

    def __init__(self, hand, supervisor, stats, timer, n_outputs, measure_latency=True,
                 reopen_initial_s=REOPEN_INITIAL_S, reopen_max_s=REOPEN_MAX_S, publish=None, class_names=(),
                 sent_classes=None):
        self._hand = hand
        self._supervisor = supervisor
        self._write_timer = stats.stages["write"]
        self._latency = stats.latency
        self._clock = timer
        self._measure_latency = measure_latency
        self._publish = publish
        self._publish_timer = stats.stages.get("publish") if publish is not None else None
        self.n_outputs = int(n_outputs)
        self._open = np.zeros(self.n_outputs)
        self._last_sent = None
        self._hand_failing = False
        self._reopen_backoff = Backoff(reopen_initial_s, reopen_max_s)
        self._port_down = False         # LinkError seen: write nothing until hand.reopen() worked
        self._reopened = False          # reopened; the outage ends when a write succeeds
        self._reopen_at = 0.0
        self.last_telemetry = None
        self.class_names = tuple(class_names)
        self._set_class = getattr(hand, "set_class", None) if self.class_names else None
        self.current_class = None       # the class told with the last command sent (a keep-alive repeats it)
        self._sent_classes = sent_classes
        # Index -1 counts the new commands sent with no class (below the confidence, or decided before
        # the supervisor was ok and taken once it was).
        self.class_counts = {index: 0 for index in range(-1, len(self.class_names))}
        self.counters = {"commands_sent": 0, "new_commands_sent": 0, "keepalives_sent": 0,
                         "safe_posture_sent": 0, "invalid_blocked": 0, "hand_errors": 0,
                         "commands_superseded": 0, "hand_reconnects": 0, "hand_reopen_failures": 0}

    def step(self, command, now_s):
        """Send what the hand should do now.

        Parameters
        ----------
        command : DecodedCommand or None
            The newest decoded command, None when nothing new arrived.
        now_s : float
            Monotonic time of this wake.

        Returns
        -------
        ndarray (n_outputs,) or None
            The positions sent, None if the hand refused or failed.
        """
        supervisor = self._supervisor
        if command is not None:
            supervisor.on_command(command.arrival_s)
        may_send = supervisor.check(now_s)
        if self._port_down:
            if not self._reopen(now_s):
                self.counters["hand_errors"] += 1       # not delivered: the port is still gone
                return None
            # The hand heard nothing during the outage: the safe posture comes first.
            return self.send_safe_posture(now_s)
        fresh = False
        decided = None
        if not may_send:
            positions = supervisor.safe_posture()
            kind = "safe_posture_sent"
        elif command is not None:
            positions = command.positions
            kind = "new_commands_sent"
            fresh = True
            decided = command.decided
        elif self._last_sent is not None:
            positions = self._last_sent
            kind = "keepalives_sent"
            decided = self.current_class
        else:
            positions = supervisor.safe_posture()
            kind = "safe_posture_sent"
        if not self._is_valid(positions):
            self.counters["invalid_blocked"] += 1
            supervisor.on_fault("invalid_command", now_s,
                                "blocked finger positions {!r} before the hand".format(
                                    np.asarray(positions).tolist()))
            positions = supervisor.safe_posture()
            if not self._is_valid(positions):
                positions = self._open
            kind = "safe_posture_sent"
            fresh = False
            decided = None
        sent = self._send(positions, kind, command if fresh else None, now_s, decided)
        if self._publish is not None and command is not None and sent is not None:
            start = self._clock()
            self._publish(sent, command.arrival_s)
            if self._publish_timer is not None:
                self._publish_timer.add(self._clock() - start)
        return sent

    def send_safe_posture(self, now_s):
        """Shutdown path: put the hand in the safe posture now, whatever the state."""
        positions = self._supervisor.safe_posture()
        if not self._is_valid(positions):
            positions = self._open
        return self._send(positions, "safe_posture_sent", None, now_s, None)

    def class_summary(self):
        """JSON-ready class counts: ``{"current": name, "counts": {name: new commands sent}}`` ("none": no
        class); None without a class head."""
        if not self.class_names:
            return None
        names = self.class_names
        return {"current": class_name(names, self.current_class),
                "counts": {class_name(names, None if index < 0 else index): count
                           for index, count in sorted(self.class_counts.items())}}

    def _is_valid(self, positions):
        values = np.asarray(positions, dtype=np.float64)
        if values.shape != (self.n_outputs,):
            return False
        # A handful of floats: a Python loop beats numpy's call overhead here.
        # NaN fails every comparison, so it is rejected too.
        for value in values.tolist():
            if not 0.0 <= value <= 1.0:
                return False
        return True

    def _reopen(self, now_s):
        """Try ``hand.reopen()`` if the backoff allows; True once the port is open again."""
        if now_s < self._reopen_at:
            return False
        try:
            self._hand.reopen()
        except Exception:  # still gone (LinkError) or a driver that cannot reopen: try again later
            self.counters["hand_reopen_failures"] += 1
            self._reopen_at = now_s + self._reopen_backoff.next_wait()
            return False
        self._port_down = False
        self._reopened = True
        return True

    def _send(self, positions, kind, command, now_s, decided):
        if self._port_down:
            self.counters["hand_errors"] += 1
            return None
        start = self._clock()
        try:
            if self._set_class is not None:
                self._set_class(decided)
            self._hand.send(positions)
        except Exception as exc:  # link down or driver refusal: keep trying, never die
            self.counters["hand_errors"] += 1
            if isinstance(exc, LinkError):
                # The port vanished: reopen it with backoff.  The backoff is reset only
                # by a successful write, so a port that opens but cannot be written
                # (or a flapping cable) is not reopened faster than reopen_max_s.
                self._port_down = True
                self._reopened = False
                self._reopen_at = now_s + self._reopen_backoff.next_wait()
            if not self._hand_failing:
                self._hand_failing = True
                self._supervisor.on_fault("hand_error", now_s, "hand.send failed: {!r}".format(exc))
            return None
        sent = self._clock()
        self._hand_failing = False
        if self._reopened:
            self._reopened = False
            self._reopen_backoff.reset()
            self.counters["hand_reconnects"] += 1
            self._supervisor.require_recovery("hand_reconnected", now_s,
                                              "hand port reopened; safe posture until recovery")
        self._write_timer.add(sent - start)
        self._last_sent = positions
        self.current_class = decided
        if self._sent_classes is not None:
            self._sent_classes.append(decided)
        if command is not None and self.class_names:
            self.class_counts[-1 if decided is None else decided] += 1
        self.counters["commands_sent"] += 1
        self.counters[kind] += 1
        if command is not None:
            if self._measure_latency:
                self._latency.add(sent - command.arrival_s)
            self._supervisor.note_sent(positions)
        poll = getattr(self._hand, "poll_telemetry", None)
        if poll is not None:
            telemetry = poll()
            if telemetry is not None:
                self.last_telemetry = telemetry
        return positions
