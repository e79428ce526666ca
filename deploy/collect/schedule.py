"""The cue timeline of a session: calibration poses first, then the trials.

Pure functions of a :class:`~.protocol.Protocol`: no clock, no I/O, so the
whole timeline can be tested without waiting.  Times are seconds from the
start of a phase; the session drives them with the chip's sample counter
(docs/collect.md, "One timeline").

A *trial* is one movement of one repetition: a ``move`` step (the target
posture is shown for ``hold_s``) then a ``rest`` step (``rest_s``).  Trials are
numbered by their place in the protocol's full order (0 .. n_trials - 1),
whatever was skipped, so ``--continue`` can name what is already done.  The
trials phase starts with a ``lead_in`` rest (get ready).

Order: ``blocks="repetition"`` runs every movement once per repetition (a
repetition is a block, which the trainer's leakage-free split keeps whole);
``blocks="movement"`` runs each movement's repetitions in a row (NinaPro).
``order="random"`` shuffles the movements of each block from ``seed``
(numpy's RandomState, the same on every numpy version); ``"fixed"`` keeps the
file's order.
"""
import bisect
import collections

import numpy as np

from neurohand.deploy.collect.protocol import CALIBRATION_POSES, FINGERS

Step = collections.namedtuple("Step", "kind start_s duration_s label posture movement repetition trial pose")
Step.__doc__ = """One cue.

kind : "calibrate" (hold a calibration pose), "calibrate_rest", "lead_in", "move", "rest"
start_s, duration_s : float, seconds from the start of the phase
label : str, what the display says
posture : tuple of 5 floats (FINGERS order), the target hand shown
movement : int, movement id for "move" (0 otherwise)
repetition : int, from 1 (0 for calibration)
trial : int, the trial's place in the protocol's full order (-1 outside trials)
pose : str, the calibration pose ("open", "fist", a finger) or ""
"""

Trial = collections.namedtuple("Trial", "index movement repetition")

#: Targets shown for the calibration poses: open, fist, one finger flexed alone.
POSE_POSTURES = {"open": (0.0,) * len(FINGERS), "fist": (1.0,) * len(FINGERS)}
POSE_POSTURES.update({finger: tuple(1.0 if f == finger else 0.0 for f in FINGERS) for finger in FINGERS})
POSE_LABELS = {"open": "open hand, fingers straight", "fist": "fist"}
POSE_LABELS.update({finger: "{} alone".format(finger) for finger in FINGERS})
#: Cue codes of the ``cue`` events (docs/collect.md): a movement's id, 0 for rest and
#: lead-in, and these negative codes for the calibration poses.
POSE_CODES = {pose: -(i + 1) for i, pose in enumerate(CALIBRATION_POSES)}


def trial_order(protocol):
    """Every trial of the protocol in the order it is run: a list of :class:`Trial`."""
    rng = np.random.RandomState(protocol.seed)
    indices = list(range(len(protocol.movements)))
    trials = []
    if protocol.blocks == "repetition":
        for repetition in range(1, protocol.repetitions + 1):
            order = list(rng.permutation(len(indices))) if protocol.order == "random" else indices
            trials.extend((protocol.movements[i].id, repetition) for i in order)
    else:
        order = list(rng.permutation(len(indices))) if protocol.order == "random" else indices
        for i in order:
            trials.extend((protocol.movements[i].id, repetition) for repetition in range(1, protocol.repetitions + 1))
    return [Trial(index, int(movement), repetition) for index, (movement, repetition) in enumerate(trials)]


def calibration_steps(protocol):
    """The calibration phase: each pose held ``hold_s``, with ``rest_s`` of rest before it."""
    settings = protocol.calibration
    steps, t = [], 0.0
    for pose in settings["poses"]:
        if settings["rest_s"] > 0:
            steps.append(Step("calibrate_rest", t, settings["rest_s"], "relax, next: " + POSE_LABELS[pose],
                              protocol.rest_posture, 0, 0, -1, ""))
            t += settings["rest_s"]
        steps.append(Step("calibrate", t, settings["hold_s"], "calibration: " + POSE_LABELS[pose],
                          POSE_POSTURES[pose], 0, 0, -1, pose))
        t += settings["hold_s"]
    return steps


def trial_steps(protocol, done=()):
    """The trials phase: lead-in, then move + rest per trial not in ``done`` (trial indices)."""
    done = set(done)
    steps, t = [], 0.0
    if protocol.lead_in_s > 0:
        steps.append(Step("lead_in", 0.0, protocol.lead_in_s, "get ready", protocol.rest_posture, 0, 0, -1, ""))
        t = protocol.lead_in_s
    for trial in trial_order(protocol):
        if trial.index in done:
            continue
        movement = protocol.movement(trial.movement)
        steps.append(Step("move", t, protocol.hold_s, movement.name, movement.posture, movement.id,
                          trial.repetition, trial.index, ""))
        t += protocol.hold_s
        if protocol.rest_s > 0:
            steps.append(Step("rest", t, protocol.rest_s, "rest", protocol.rest_posture, 0, trial.repetition,
                              trial.index, ""))
            t += protocol.rest_s
    return steps


def cue_code(step):
    """The value of a step's ``cue`` event: movement id, 0 for rest, negative for a calibration pose."""
    if step.kind == "calibrate":
        return POSE_CODES[step.pose]
    return step.movement if step.kind == "move" else 0


class Schedule(object):
    """Steps laid end to end; answers "what is shown at time t" (seconds into the phase)."""

    def __init__(self, steps):
        self.steps = list(steps)
        self._starts = [step.start_s for step in self.steps]
        last = self.steps[-1] if self.steps else None
        self.total_s = last.start_s + last.duration_s if last else 0.0
        self.trials = sorted({s.trial for s in self.steps if s.trial >= 0})

    def __len__(self):
        return len(self.steps)

    def index_at(self, t):
        """Index of the step shown at ``t`` (the first at t < 0), or None once the schedule is over."""
        if t >= self.total_s:
            return None
        return max(0, bisect.bisect_right(self._starts, t) - 1)

    def at(self, t):
        """``(step, seconds left in it)`` at ``t``, or ``(None, 0.0)`` once over."""
        index = self.index_at(t)
        if index is None:
            return None, 0.0
        step = self.steps[index]
        return step, step.start_s + step.duration_s - max(t, 0.0)

    def trial_end_s(self, trial):
        """When trial ``trial`` (index) is over: the end of its last step."""
        ends = [s.start_s + s.duration_s for s in self.steps if s.trial == trial]
        if not ends:
            raise KeyError(trial)
        return max(ends)

    def next_step(self, index):
        """The step after ``index``, or None."""
        return self.steps[index + 1] if index + 1 < len(self.steps) else None


def done_trials(events):
    """Trial indices a recording marks complete (its ``trial_done`` events)."""
    return sorted({int(e.value) for e in events if e.kind == "trial_done"})
