"""Per-finger post-processing of decoder outputs into hand positions.

Order, per window (each step per finger)::

    calibrate:  c = (y - lo) / (hi - lo)          decoder range [lo, hi] -> hand [0, 1]
    clamp:      c = clip(c, 0, 1)
    smooth:     s += alpha * (c - s),   alpha = 1 - exp(-dt / tau)   (tau = 0: s = c)
                or the 1-euro filter (below)
    slew limit: p += clip(s - p, -rate * dt, +rate * dt)
    clamp:      p = clip(p, 0, 1)                  (guards rounding; p is the output)

Exponential smoothing trades lag for jitter at one fixed rate: a time
constant that calms a hold delays every movement by about as much.  The
1-euro filter (Casiez, Roussel and Vogel, "1 Euro Filter: A Simple Speed-based
Low-pass Filter for Noisy Input in Interactive Systems", CHI 2012,
doi:10.1145/2207676.2208639) lowers its cut-off while the input is still and
raises it with the input's speed, so holds are smoothed and movements are
followed with little lag.  Per finger, as in the paper::

    v += a(f_d) * ((c - s) / dt - v)         speed of the input, smoothed at f_d
    f  = f_min + beta * |v|                  cut-off, Hz; beta in Hz per (full range per second)
    s += a(f) * (c - s)                      a(f) = 1 / (1 + 1 / (2 pi f dt))

Unlike the paper's filter, which starts at its first input, ``s`` starts at the
hand position with ``v = 0``, as the exponential smoothing does (below).

Calibrating and clamping first means smoothing and slew limiting work in hand
units (fraction of the full range, per second), so the settings mean the same
for every patient.  Smoothing and slew limiting are separate states: the slew
limiter follows the smoothed value, so a large step is both smoothed and
bounded in speed.

The state starts at (and :meth:`reset` moves it to) a hand position, so the
first command after start-up or after a safe posture moves away from where
the hand actually is at no more than the slew rate.
"""
import numpy as np


class PostProcessor(object):
    """Calibration, smoothing, slew limit and clamping for ``n_outputs`` fingers.

    Parameters
    ----------
    n_outputs : int
        Number of decoder outputs (fingers).
    lo, hi : sequence of float, length n_outputs
        Decoder outputs mapped to hand positions 0 and 1 (hi < lo inverts).
    smoothing_tau_s : sequence of float, length n_outputs
        Exponential smoothing time constant in seconds; 0 = no smoothing.
    max_slew_per_s : sequence of float, length n_outputs, or None
        Largest change of a position per second (positions are 0..1); None = no limit.
    initial_position : sequence of float or None
        Where the state starts; None = all zeros (open hand).
    one_euro : (min_cutoff_hz, beta, d_cutoff_hz) or None
        The 1-euro filter instead of exponential smoothing (then every time
        constant must be 0), each a sequence of float, length n_outputs:
        cut-off while still (> 0, Hz), its rise per unit of speed (>= 0, Hz per
        full range per second), cut-off of the speed estimate (> 0, Hz).
    """

    def __init__(self, n_outputs, lo, hi, smoothing_tau_s, max_slew_per_s=None, initial_position=None,
                 one_euro=None):
        self.n_outputs = int(n_outputs)
        self._lo = self._vector(lo, "lo")
        span = self._vector(hi, "hi") - self._lo
        if np.any(span == 0):
            raise ValueError("calibration range is empty for output(s) {}".format(
                np.flatnonzero(span == 0).tolist()))
        self._inverse_span = 1.0 / span
        self._tau = self._vector(smoothing_tau_s, "smoothing_tau_s")
        if np.any(self._tau < 0):
            raise ValueError("smoothing time constants must be >= 0")
        self._slew = None if max_slew_per_s is None else self._vector(max_slew_per_s, "max_slew_per_s")
        self._one_euro = one_euro is not None
        if self._one_euro:
            if np.any(self._tau > 0):
                raise ValueError("the 1-euro filter replaces exponential smoothing: its time constants must be 0")
            if len(one_euro) != 3:
                raise ValueError("one_euro must be (min_cutoff_hz, beta, d_cutoff_hz)")
            self._min_cutoff = self._vector(one_euro[0], "min_cutoff_hz")
            self._beta = self._vector(one_euro[1], "beta")
            self._d_cutoff = self._vector(one_euro[2], "d_cutoff_hz")
            if not (np.all(self._min_cutoff > 0) and np.all(self._d_cutoff > 0) and np.all(self._beta >= 0)):
                raise ValueError("1-euro cut-offs must be > 0 and beta >= 0")
        # Buffers allocated once; process() works in place.
        self._calibrated = np.zeros(self.n_outputs)
        self._smoothed = np.zeros(self.n_outputs)
        self._position = np.zeros(self.n_outputs)
        self._step = np.zeros(self.n_outputs)
        self._alpha = np.ones(self.n_outputs)
        self._limit = np.zeros(self.n_outputs)
        self._negative_limit = np.zeros(self.n_outputs)
        # 1-euro state and work space (unused with exponential smoothing).
        self._speed = np.zeros(self.n_outputs)
        self._speed_alpha = np.ones(self.n_outputs)
        self._work = np.zeros(self.n_outputs)
        self._step_dt = None
        self.reset(np.zeros(self.n_outputs) if initial_position is None else initial_position)

    @classmethod
    def from_config(cls, config, n_outputs, initial_position=None):
        """Build from a :class:`~neurohand.deploy.runtime.config.RuntimeConfig`."""
        config.check_outputs(n_outputs)
        slew = config.per_finger("max_slew_per_s", n_outputs)
        one_euro = None
        if config.smoothing == "one_euro":
            one_euro = tuple(config.per_finger(name, n_outputs) for name in
                             ("one_euro_min_cutoff_hz", "one_euro_beta", "one_euro_d_cutoff_hz"))
        return cls(n_outputs,
                   lo=config.per_finger("calibration_lo", n_outputs),
                   hi=config.per_finger("calibration_hi", n_outputs),
                   smoothing_tau_s=[t / 1000.0 for t in config.per_finger("smoothing_tau_ms", n_outputs)],
                   max_slew_per_s=slew,
                   initial_position=initial_position,
                   one_euro=one_euro)

    def _vector(self, value, name):
        array = np.array(value, dtype=np.float64).reshape(-1)
        if array.shape != (self.n_outputs,):
            raise ValueError("{} must have {} values, got {}".format(name, self.n_outputs, array.size))
        return array

    def _set_step(self, dt_s):
        # Recomputed only when the step changes (first window, after a skip or
        # a gap); tau = 0 means no smoothing (alpha = 1).
        smoothing = self._tau > 0
        self._alpha[:] = 1.0
        self._alpha[smoothing] = 1.0 - np.exp(-dt_s / self._tau[smoothing])
        if self._one_euro:
            self._speed_alpha[:] = _one_euro_alpha(self._d_cutoff, dt_s)
        if self._slew is not None:
            np.multiply(self._slew, dt_s, out=self._limit)
            np.negative(self._limit, out=self._negative_limit)
        self._step_dt = dt_s

    def _one_euro_factors(self, change, dt_s):
        """Set the smoothing factors of this step from the input's ``change`` (c - s) over ``dt_s``."""
        speed, work, alpha = self._speed, self._work, self._alpha
        # v += a(f_d) * (change / dt - v)
        np.multiply(change, 1.0 / dt_s, out=work)
        np.subtract(work, speed, out=work)
        np.multiply(work, self._speed_alpha, out=work)
        np.add(speed, work, out=speed)
        # f = f_min + beta |v|;  a = r / (r + 1) with r = 2 pi f dt, i.e. 1 / (1 + 1 / (2 pi f dt))
        np.absolute(speed, out=work)
        np.multiply(work, self._beta, out=work)
        np.add(work, self._min_cutoff, out=work)
        np.multiply(work, 2.0 * np.pi * dt_s, out=alpha)
        np.add(alpha, 1.0, out=work)
        np.divide(alpha, work, out=alpha)

    def reset(self, position):
        """Restart smoothing and slew limiting from hand ``position`` (n_outputs,), 0..1."""
        self._position[:] = position
        np.clip(self._position, 0.0, 1.0, out=self._position)
        self._smoothed[:] = self._position
        self._speed[:] = 0.0

    @property
    def position(self):
        """Current output, a read-only view, shape (n_outputs,)."""
        view = self._position.view()
        view.flags.writeable = False
        return view

    def process(self, outputs, dt_s):
        """Turn decoder ``outputs`` into hand positions.

        Parameters
        ----------
        outputs : ndarray, shape (n_outputs,)
            Decoder outputs (finite; the caller checks).
        dt_s : float
            Seconds since the previous processed window (the stride, or a
            multiple of it after skipped windows).

        Returns
        -------
        ndarray, shape (n_outputs,), float64, in 0..1
            A new array (safe to hand to another thread).
        """
        calibrated = self._calibrated
        np.subtract(outputs, self._lo, out=calibrated)
        np.multiply(calibrated, self._inverse_span, out=calibrated)
        # minimum/maximum with out=: np.clip costs several times more per call.
        np.maximum(calibrated, 0.0, out=calibrated)
        np.minimum(calibrated, 1.0, out=calibrated)
        if dt_s != self._step_dt:
            self._set_step(dt_s)
        smoothed = self._smoothed
        step = self._step
        np.subtract(calibrated, smoothed, out=step)
        if self._one_euro:
            self._one_euro_factors(step, dt_s)
        np.multiply(step, self._alpha, out=step)
        np.add(smoothed, step, out=smoothed)
        position = self._position
        np.subtract(smoothed, position, out=step)
        if self._slew is not None:
            np.minimum(step, self._limit, out=step)
            np.maximum(step, self._negative_limit, out=step)
        np.add(position, step, out=position)
        np.maximum(position, 0.0, out=position)
        np.minimum(position, 1.0, out=position)
        return position.copy()


def _one_euro_alpha(cutoff_hz, dt_s):
    """Smoothing factor of a first-order low-pass at ``cutoff_hz`` over ``dt_s``, as in the 1-euro paper."""
    rate = 2.0 * np.pi * np.asarray(cutoff_hz, dtype=np.float64) * dt_s
    return rate / (rate + 1.0)
