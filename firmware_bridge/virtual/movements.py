"""The movement protocol of the synthetic recordings and its finger trajectories.

Modelled on mirrored bilateral training: the patient flexes each finger alone,
then combinations, with rest between, and repeats the sequence; a data glove on
the intact hand gives the labels.  Two trajectories exist per trial:

* the *glove* trajectory: what the labels show (0 = open/rest .. 1 = fully flexed);
* the *intent* trajectory: what drives the nerve, i.e. the phantom hand's attempt
  to mirror the glove.  It starts a little earlier or later, ramps at a
  different speed and with a different effort, and recruits neighbouring fingers
  differently.  This mismatch is what keeps a decoder from being perfect, as in
  the clinic.

Everything here is a pure function of the random draws made in
:func:`make_protocol`, so trajectories can be evaluated at any times, in any
order, and give the same values (that is what makes generation independent of
block size).
"""
import numpy as np

FINGERS = ("thumb", "index", "middle", "ring", "little")

# Explicit registry: movement id -> (name, fingers flexed on purpose).
# Id 0 is rest; the protocol runs the movements in this order each repetition.
MOVEMENTS = (
    (0, "rest", ()),
    (1, "thumb", ("thumb",)),
    (2, "index", ("index",)),
    (3, "middle", ("middle",)),
    (4, "ring", ("ring",)),
    (5, "little", ("little",)),
    (6, "pinch", ("thumb", "index")),
    (7, "tripod", ("thumb", "index", "middle")),
    (8, "fist", ("thumb", "index", "middle", "ring", "little")),
)

# Enslaving: flexing finger ROW on purpose drags finger COLUMN along by this
# fraction (shared tendons and muscle bellies; the thumb is independent).
ENSLAVING = np.array([
    # thumb index middle ring little
    [0.00, 0.00, 0.00, 0.00, 0.00],   # thumb
    [0.00, 0.00, 0.18, 0.06, 0.00],   # index
    [0.00, 0.15, 0.00, 0.30, 0.08],   # middle
    [0.00, 0.04, 0.25, 0.00, 0.35],   # ring
    [0.00, 0.00, 0.06, 0.30, 0.00],   # little
])

# Timing of one trial, seconds: (low, high) of uniform draws.
REST_S = (1.5, 2.5)
RAMP_S = (0.35, 0.7)
HOLD_S = (1.2, 2.0)
FIRST_REST_S = 1.0
ONSET_JITTER_S = 0.05          # fingers of one combination do not start together
AMPLITUDE = (0.75, 1.0)        # how far the glove hand flexes on purpose
# Intent relative to glove (see module docstring).
INTENT_SPEED = (0.7, 1.4)      # factor on ramp durations
INTENT_EFFORT = (0.6, 1.0)     # intended flexion of the fingers moved on purpose
INTENT_ENSLAVED = (0.0, 0.6)   # fraction of the glove's enslaved flexion that is intended
HOLD_WOBBLE = 0.03             # relative slow wobble of the glove while holding


_PER_FINGER = ("onset", "up", "hold", "down", "amp", "intent_onset", "intent_up", "intent_hold",
               "intent_down", "intent_amp")
_TRIAL_FIELDS = _PER_FINGER + ("movement", "repetition", "wobble_hz", "wobble_phase")


class Protocol(object):
    """Drawn trials.  Arrays have shape (n_trials, 5) unless noted; times in seconds.

    Attributes: ``movement`` (n_trials,) int, ``repetition`` (n_trials,) int (1-based),
    ``onset``, ``up``, ``hold``, ``down``, ``amp`` for the glove and
    ``intent_onset`` ... ``intent_amp`` for the intent, ``wobble_hz`` and
    ``wobble_phase`` (n_trials,), and the trial windows ``window_start`` /
    ``window_end`` (n_trials,) that contain every non-zero value of both.
    """

    def __init__(self, **arrays):
        for name, value in arrays.items():
            setattr(self, name, value)

    @property
    def n_trials(self):
        return len(self.movement)

    def movement_spans(self):
        """(movement id, repetition, glove start s, glove end s) per trial."""
        start = self.onset.min(axis=1)
        end = (self.onset + self.up + self.hold + self.down).max(axis=1)
        return [(int(m), int(r), float(s), float(e))
                for m, r, s, e in zip(self.movement, self.repetition, start, end)]

    def to_metadata(self):
        """JSON-able description: the movement table and each trial's glove timing."""
        return {
            "fingers": list(FINGERS),
            "movements": [{"id": i, "name": name, "fingers": list(fingers)}
                          for i, name, fingers in MOVEMENTS],
            "order": ("each repetition runs movements 1..8 in an order drawn from the seed, rest between"
                      if getattr(self, "random_order", False)
                      else "each repetition runs movements 1..8 in id order, rest between"),
            "trials": [{"movement": m, "repetition": r, "start_s": round(s, 4), "end_s": round(e, 4)}
                       for m, r, s, e in self.movement_spans()],
        }


def make_protocol(seconds, rng, order_rng=None, lead_s=(-0.20, 0.15), aligned_release=False, speed=1.0,
                  strength=1.0):
    """Draw trials until ``seconds`` is covered.  Returns a :class:`Protocol`.

    ``order_rng``: if given, each repetition runs the movements in an order
    drawn from it (else in id order).  ``lead_s``: (low, high) of the uniform
    draw of how long the intent starts before the glove (negative: after).
    ``aligned_release``: the intent also releases that long before the glove
    (else its hold differs from the glove's by up to +-0.2 s).  ``speed``: the
    day's movements are this many times as fast (ramps shorter); ``strength``:
    the day's intended effort is this many times as strong (at most full effort).
    """
    finger_index = {name: i for i, name in enumerate(FINGERS)}
    rows = []
    t = FIRST_REST_S
    repetition = 0
    while t < seconds:
        repetition += 1
        movements = MOVEMENTS[1:]
        if order_rng is not None:
            movements = [movements[i] for i in order_rng.permutation(len(movements))]
        for movement_id, _, fingers in movements:
            t += rng.uniform(*REST_S) if rows else 0.0
            if t >= seconds:
                break
            primary = np.zeros(5, bool)
            primary[[finger_index[f] for f in fingers]] = True
            row = _draw_trial(t, primary, rng, lead_s, aligned_release, speed, strength)
            row["movement"] = movement_id
            row["repetition"] = repetition
            rows.append(row)
            t = float((row["onset"] + row["up"] + row["hold"] + row["down"]).max())
    arrays = {name: np.array([row[name] for row in rows]) for name in _TRIAL_FIELDS}
    if not rows:                      # shorter than the first rest: no trials at all
        arrays = {name: np.zeros((0, 5) if name in _PER_FINGER else 0) for name in _TRIAL_FIELDS}
    glove_end = arrays["onset"] + arrays["up"] + arrays["hold"] + arrays["down"]
    intent_end = (arrays["intent_onset"] + arrays["intent_up"] + arrays["intent_hold"]
                  + arrays["intent_down"])
    arrays["window_start"] = np.minimum(arrays["onset"], arrays["intent_onset"]).min(axis=1)
    arrays["window_end"] = np.maximum(glove_end, intent_end).max(axis=1)
    arrays["random_order"] = order_rng is not None
    return Protocol(**arrays)


def _draw_trial(start, primary, rng, lead_s=(-0.20, 0.15), aligned_release=False, speed=1.0, strength=1.0):
    """One trial starting at ``start`` s; ``primary`` (5,) bool marks fingers moved on purpose."""
    base_amp = rng.uniform(*AMPLITUDE, size=5) * primary
    # Enslaved fingers follow the strongest puller, with some variability.
    pulled = (base_amp[:, None] * ENSLAVING).max(axis=0) * rng.uniform(0.5, 1.3, size=5)
    amp = np.where(primary, base_amp, pulled)
    onset = start + rng.uniform(0.0, ONSET_JITTER_S, size=5)
    up = np.full(5, rng.uniform(*RAMP_S)) * rng.uniform(0.9, 1.1, size=5)
    hold = np.full(5, rng.uniform(*HOLD_S)) + rng.uniform(-0.05, 0.05, size=5)
    down = np.full(5, rng.uniform(*RAMP_S)) * rng.uniform(0.9, 1.1, size=5)
    if speed != 1.0:            # left alone at 1, so the first session's numbers are the same bits
        up, down = up / speed, down / speed

    # Written as the legacy draw uniform(-0.15, 0.20) of the lag, so the easy
    # preset's numbers are unchanged.
    lag = rng.uniform(-lead_s[1], -lead_s[0])
    speed = rng.uniform(*INTENT_SPEED)
    intent_amp = np.where(primary, rng.uniform(*INTENT_EFFORT, size=5),
                          amp * rng.uniform(*INTENT_ENSLAVED, size=5))
    if strength != 1.0:
        intent_amp = np.minimum(intent_amp * strength, 1.0)
    intent_onset = onset + lag + rng.uniform(-0.03, 0.03, size=5)
    hold_jitter = rng.uniform(-0.2, 0.2)
    if aligned_release:
        # The release leads the glove's release as the onset leads its onset
        # (with a little scatter): the nerve drives the hand, both ways.
        release = onset + up + hold + lag + 0.15 * hold_jitter
        intent_hold = np.maximum(release - intent_onset - up * speed, 0.3)
    else:
        intent_hold = np.maximum(hold + hold_jitter, 0.3)
    return {
        "onset": onset, "up": up, "hold": hold, "down": down, "amp": amp,
        "intent_onset": intent_onset,
        "intent_up": up * speed,
        "intent_hold": intent_hold,
        "intent_down": down * speed * rng.uniform(0.85, 1.15),
        "intent_amp": intent_amp,
        "wobble_hz": rng.uniform(0.4, 1.2),
        "wobble_phase": rng.uniform(0, 2 * np.pi),
    }


def _min_jerk(x):
    """Minimum-jerk position profile 0..1 and its derivative, for x in [0, 1]."""
    x2 = x * x
    position = x2 * x * (10.0 - 15.0 * x + 6.0 * x2)
    slope = 30.0 * x2 * (1.0 - x) * (1.0 - x)
    return position, slope


def trajectories(protocol, times, kind="glove"):
    """Finger positions and velocities at ``times``.

    Parameters: ``times`` ndarray (n,) in seconds, any order; ``kind`` "glove" or "intent".
    Returns ``(position, velocity)``, each ndarray (n, 5) float64: position 0..1,
    velocity in 1/s.
    """
    times = np.asarray(times, dtype=np.float64)
    position = np.zeros((times.size, 5))
    velocity = np.zeros((times.size, 5))
    if protocol.n_trials == 0 or times.size == 0:
        return position, velocity
    prefix = "" if kind == "glove" else "intent_"
    trial = np.searchsorted(protocol.window_start, times, side="right") - 1
    inside = (trial >= 0) & (times < protocol.window_end[np.maximum(trial, 0)])
    rows = np.nonzero(inside)[0]
    k = trial[rows]
    t = times[rows][:, None]
    onset = getattr(protocol, prefix + "onset")[k]
    up = getattr(protocol, prefix + "up")[k]
    hold = getattr(protocol, prefix + "hold")[k]
    down = getattr(protocol, prefix + "down")[k]
    amp = getattr(protocol, prefix + "amp")[k]

    rel = t - onset
    rising = (rel >= 0) & (rel < up)
    holding = (rel >= up) & (rel < up + hold)
    falling = (rel >= up + hold) & (rel < up + hold + down)
    p_up, v_up = _min_jerk(np.clip(rel / up, 0.0, 1.0))
    p_dn, v_dn = _min_jerk(np.clip((rel - up - hold) / down, 0.0, 1.0))
    shape = np.where(rising, p_up, 0.0) + np.where(holding, 1.0, 0.0) + np.where(falling, 1.0 - p_dn, 0.0)
    slope = np.where(rising, v_up / up, 0.0) - np.where(falling, v_dn / down, 0.0)
    pos = amp * shape
    vel = amp * slope
    if kind == "glove":
        # A slow wobble while holding, faded in and out with the ramps so the
        # trajectory stays smooth.
        wobble = HOLD_WOBBLE * np.sin(2 * np.pi * protocol.wobble_hz[k][:, None] * t
                                      + protocol.wobble_phase[k][:, None])
        pos = pos * (1.0 + wobble * shape)
    position[rows] = np.clip(pos, 0.0, 1.0)
    velocity[rows] = vel
    return position, velocity


def mirror_mismatch(protocol, rng, effort_sd=0.0, timing_sd_s=0.0, cocontraction=0.0, miss_prob=0.0):
    """A copy of ``protocol`` whose phantom intent differs more from the glove.

    In mirrored training the intact hand's glove is only a proxy of the phantom's
    attempt; per trial: each finger's intended effort is multiplied by
    exp(N(0, ``effort_sd``)) (at most full effort); the whole intent is shifted
    by N(0, ``timing_sd_s``) s (clipped to +-3 sd); every finger not flexed in the
    glove receives up to ``cocontraction`` (uniform) of the trial's strongest
    intent (co-contraction); with chance ``miss_prob`` the phantom does not
    perform the trial at all (no intent).  The glove is unchanged.  Every draw is
    made whatever the values, so one option does not move another's draws.
    """
    n = protocol.n_trials
    effort = np.exp(effort_sd * rng.standard_normal((n, 5)))
    shift = timing_sd_s * np.clip(rng.standard_normal(n), -3.0, 3.0)
    leak = cocontraction * rng.random((n, 5))
    missed = rng.random(n) < miss_prob
    arrays = dict(vars(protocol))
    amp = np.minimum(protocol.intent_amp * effort, 1.0)
    strongest = amp.max(axis=1)[:, None]
    moved = protocol.amp > 0
    amp = np.where(moved, amp, np.maximum(amp, leak * strongest))
    arrays["intent_amp"] = np.where(missed[:, None], 0.0, amp)
    arrays["intent_onset"] = protocol.intent_onset + shift[:, None]
    glove_end = protocol.onset + protocol.up + protocol.hold + protocol.down
    intent_end = arrays["intent_onset"] + protocol.intent_up + protocol.intent_hold + protocol.intent_down
    arrays["window_start"] = np.minimum(protocol.onset, arrays["intent_onset"]).min(axis=1)
    arrays["window_end"] = np.maximum(glove_end, intent_end).max(axis=1)
    return Protocol(**arrays)
