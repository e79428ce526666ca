"""Decoders to compare the RNN against: Wiener and Kalman filters, and on request a TCN.

All are fitted on the same features and split as the RNN and decode causally
(each output uses features up to its own step only).  The filters are numpy
only, light enough to refit on every ``neurohand evaluate``.  The temporal
convolutional network (train/tcn.py, torch) trains for minutes, so it is
fitted only when named (:data:`ON_REQUEST`).

A *segment* here is a pair ``(features, labels)``: arrays of shape
``(n_steps, n_features)`` and ``(n_steps, n_outputs)``, consecutive feature
windows of one contiguous stretch of recording.  Lags and filter state never
cross from one segment into the next.
"""
import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.train import metrics

# Ridge strengths relative to the mean feature energy (see WienerFilter.fit).
DEFAULT_ALPHAS = tuple(10.0 ** p for p in range(-7, 2))
# Wiener histories tried on validation: every (lags, lag_step) pair, up to 3.8 s at 50 steps per second.
DEFAULT_WIENER_LAGS = (1, 3, 5, 10, 20)
DEFAULT_WIENER_LAG_STEPS = (1, 2, 5, 10)
#: Widest history searched (lags x features): its cost grows with the cube of the width
#: (an eigendecomposition per history), and beyond this a ridge fit on a few minutes of
#: data has more columns than it can use.  NinaPro's 20 features keep every history.
MAX_WIENER_COLUMNS = 512
# Kalman set-ups tried on validation (see KalmanFilter): feature-to-state lag and
# observation spacing in steps, and the scale of the fitted observation noise.
DEFAULT_KALMAN_LAGS = (0, 5)
DEFAULT_KALMAN_BINS = (1, 2, 5, 10)
DEFAULT_KALMAN_NOISE_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0)


def lagged(features, lags, lag_step=1):
    """Stack ``features`` with ``lags`` delayed copies of itself, causally.

    Parameters
    ----------
    features : ndarray, shape (n_steps, n_features)
    lags : int >= 1, number of copies (lag 0 included)
    lag_step : int >= 1, steps between copies

    Returns
    -------
    ndarray, shape (n_steps, n_features * lags): row t holds
    [x_t, x_{t-step}, ..., x_{t-(lags-1)*step}]; steps before the segment's
    start repeat its first row (no future sample is ever used).
    """
    features = np.asarray(features, dtype=np.float64)
    n = features.shape[0]
    columns = []
    for lag in range(lags):
        delay = lag * lag_step
        index = np.maximum(np.arange(n) - delay, 0)
        columns.append(features[index])
    return np.concatenate(columns, axis=1)


def _stack(segments, lags, lag_step):
    x = np.concatenate([lagged(f, lags, lag_step) for f, _ in segments], axis=0)
    y = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in segments], axis=0)
    return x, y


def _candidates(value, what):
    """An int or a sequence of ints (each >= 1 or >= 0) as a sorted tuple of candidates."""
    values = (value,) if np.ndim(value) == 0 else tuple(value)
    if not values:
        raise ValueError("{}: give at least one value".format(what))
    return tuple(sorted({int(v) for v in values}))


def _validation_r2(decoder, segments):
    truth = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in segments], axis=0)
    prediction = np.concatenate([decoder.predict(f) for f, _ in segments], axis=0)
    return metrics.nanmean(metrics.r2_score(truth, prediction))


class WienerFilter:
    """Ridge regression of the labels on lagged features (a discrete Wiener filter).

    The history (``lags`` copies, ``lag_step`` steps apart; each an int or a
    sequence of candidates) and the ridge strength are chosen together on the
    validation segments (highest mean R²); the fit itself uses the training
    segments only.  Without validation segments the first candidate of each
    is used with the middle ridge strength."""

    def __init__(self, lags=DEFAULT_WIENER_LAGS, lag_step=DEFAULT_WIENER_LAG_STEPS, alphas=DEFAULT_ALPHAS):
        self.lag_candidates = _candidates(lags, "lags")
        self.lag_step_candidates = _candidates(lag_step, "lag_step")
        if self.lag_candidates[0] < 1 or self.lag_step_candidates[0] < 1:
            raise ValueError("lags and lag_step must be >= 1")
        self.alphas = tuple(float(a) for a in alphas)

    def fit(self, train_segments, validation_segments=None):
        n_features = np.shape(train_segments[0][0])[1]
        lag_candidates, step_candidates = self.lag_candidates, self.lag_step_candidates
        if len(lag_candidates) > 1:
            affordable = tuple(lags for lags in lag_candidates if lags * n_features <= MAX_WIENER_COLUMNS)
            lag_candidates = affordable or lag_candidates[:1]
        alphas = self.alphas
        if not validation_segments:
            lag_candidates, step_candidates = lag_candidates[:1], step_candidates[:1]
            alphas = (alphas[len(alphas) // 2],)
        else:
            truth = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in validation_segments], axis=0)
        y = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in train_segments], axis=0)
        y_mean = y.mean(axis=0)
        yc = y - y_mean
        best = None
        self.validation_r2_ = {}
        tried = set()
        for step in step_candidates:
            # lagged() orders its columns by lag, so every shorter history with this
            # step is a leading block of the longest one: one product serves them all.
            most = max(lag_candidates)
            x = _stack(train_segments, most, step)[0]
            x_mean_all = x.mean(axis=0)
            x -= x_mean_all
            gram_all = x.T @ x
            cross_all = x.T @ yc
            del x
            if validation_segments:
                x_validation = np.concatenate([lagged(f, most, step) for f, _ in validation_segments], axis=0)
            for lags in lag_candidates:
                history = (lags, step if lags > 1 else 1)
                if history in tried:
                    continue
                tried.add(history)
                width = lags * n_features
                gram, cross, x_mean = gram_all[:width, :width], cross_all[:width], x_mean_all[:width]
                # alpha is relative to the mean feature energy, so one grid suits any
                # feature scale; one eigendecomposition serves every alpha.
                scale = np.trace(gram) / width
                eigenvalues, eigenvectors = np.linalg.eigh(gram)
                projected = eigenvectors.T @ cross
                for alpha in alphas:
                    coef = eigenvectors @ (projected / (eigenvalues + alpha * scale)[:, None])
                    r2 = np.nan
                    if validation_segments:
                        prediction = (x_validation[:, :width] - x_mean) @ coef + y_mean
                        r2 = metrics.nanmean(metrics.r2_score(truth, prediction))
                    self.validation_r2_[history + (alpha,)] = r2
                    if best is None or r2 > best[0]:
                        best = (r2, history, alpha, x_mean, coef)
        _, (self.lags, self.lag_step), self.alpha_, self.x_mean_, self.coef_ = best
        self.y_mean_ = y_mean
        return self

    @property
    def history_steps(self):
        """Steps between the oldest and the newest feature vector the filter reads."""
        return (self.lags - 1) * self.lag_step

    def predict(self, features):
        """Decode one segment: features (n_steps, n_features) -> (n_steps, n_outputs)."""
        return (lagged(features, self.lags, self.lag_step) - self.x_mean_) @ self.coef_ + self.y_mean_


class KalmanFilter:
    """Kalman filter with the label vector as state, set up as Wu et al. (Neural Computation 18, 2006).

    State model   x_t = A x_{t-1} + w,      w ~ N(0, W)   (x: labels minus their mean)
    Observation   z_{t-lag} = H x_t + q,    q ~ N(0, c Q) (z: features minus their mean)

    A, W (one-step transitions within a segment), H and Q (features ``lag``
    steps before each label) are least-squares fits on the training segments.
    Decoding is the standard predict/update recursion at every step, started
    at the training mean with the labels' stationary covariance (what is known
    of a state before any observation); an observation enters every ``bin``-th
    step only.  Wu et al. choose the lag on held-out data; here the lag, the
    bin and the noise scale ``c`` are all chosen on the validation segments
    (highest mean R²).

    Why ``bin`` and ``c``: the model assumes q is white, but the features are
    windows much longer than their stride and the misfit of a linear H on
    log-envelope features persists for seconds (on NinaPro DB1 the residual's
    correlation is 0.99 one step apart).  Fed every step at face value, the
    filter counts the same evidence many times and overshoots.  Spacing the
    observations (Wu et al.'s bins are about as long as the feature windows)
    and scaling Q are the two standard remedies; with white noise the
    validation picks bin 1 and c 1, the textbook filter.  The gains depend on
    the model only, never on the data: they are computed once per update
    until they converge, then held."""

    def __init__(self, lags=DEFAULT_KALMAN_LAGS, bins=DEFAULT_KALMAN_BINS, noise_scales=DEFAULT_KALMAN_NOISE_SCALES,
                 ridge=1e-3, max_gain_steps=2000, tolerance=1e-9):
        self.lag_candidates = _candidates(lags, "lags")
        self.bin_candidates = _candidates(bins, "bins")
        self.noise_scale_candidates = tuple(sorted({float(c) for c in np.atleast_1d(noise_scales)}))
        if self.lag_candidates[0] < 0 or self.bin_candidates[0] < 1 or not self.noise_scale_candidates \
                or self.noise_scale_candidates[0] <= 0:
            raise ValueError("lags must be >= 0, bins >= 1 and noise scales > 0")
        self.ridge = float(ridge)
        self.max_gain_steps = int(max_gain_steps)
        self.tolerance = float(tolerance)

    def fit(self, train_segments, validation_segments=None):
        labels = [np.asarray(l, dtype=np.float64) for _, l in train_segments]
        x_all = np.concatenate(labels, axis=0)
        self.x_mean_ = x_all.mean(axis=0)
        n_state = x_all.shape[1]
        eye_state = np.eye(n_state)
        xc = x_all - self.x_mean_
        # What is known of the state before the first observation: its spread over the training data.
        self.P0_ = xc.T @ xc / max(len(xc) - 1, 1) + 1e-9 * eye_state
        previous = np.concatenate([l[:-1] for l in labels]) - self.x_mean_
        following = np.concatenate([l[1:] for l in labels]) - self.x_mean_
        gram = previous.T @ previous
        regulariser = self.ridge * np.trace(gram) / n_state * eye_state
        self.A_ = np.linalg.solve(gram + regulariser, previous.T @ following).T
        residual = following - previous @ self.A_.T
        self.W_ = residual.T @ residual / max(len(residual) - 1, 1) + 1e-9 * eye_state
        grid = [(lag, b, c) for lag in self.lag_candidates for b in self.bin_candidates
                for c in self.noise_scale_candidates]
        if not validation_segments:
            grid = grid[:1]
        best = None
        self.validation_r2_ = {}
        fitted_lag = None
        for lag, bin_steps, scale in grid:
            if lag != fitted_lag:
                self.lag = lag
                self._fit_observation(train_segments, lag)
                fitted_lag = lag
                q_fitted = self.Q_
            self.bin, self.noise_scale, self.Q_ = bin_steps, scale, q_fitted * scale
            self._gains = self._gain_sequence()
            r2 = _validation_r2(self, validation_segments) if validation_segments else np.nan
            self.validation_r2_[(lag, bin_steps, scale)] = r2
            if best is None or r2 > best[0]:
                best = (r2, lag, bin_steps, scale, self.z_mean_, self.H_, self.Q_, self._gains)
        _, self.lag, self.bin, self.noise_scale, self.z_mean_, self.H_, self.Q_, self._gains = best
        return self

    def _fit_observation(self, segments, lag):
        """H and Q from features ``lag`` steps before each label (pairs that would reach before a segment's start left out)."""
        features, labels = [], []
        for f, l in segments:
            f = np.asarray(f, dtype=np.float64)
            l = np.asarray(l, dtype=np.float64)
            if len(l) > lag:
                features.append(f[:len(f) - lag])
                labels.append(l[lag:])
        if not features:
            raise ValueError("every training segment is shorter than the lag {}".format(lag))
        z_all = np.concatenate(features, axis=0)
        xc = np.concatenate(labels, axis=0) - self.x_mean_
        self.z_mean_ = z_all.mean(axis=0)
        zc = z_all - self.z_mean_
        n_state = xc.shape[1]
        gram = xc.T @ xc
        regulariser = self.ridge * np.trace(gram) / n_state * np.eye(n_state)
        self.H_ = np.linalg.solve(gram + regulariser, xc.T @ zc).T
        residual = zc - xc @ self.H_.T
        q = residual.T @ residual / max(len(residual) - 1, 1)
        # A small diagonal load keeps Q invertible when features are collinear.
        q += self.ridge * np.trace(q) / q.shape[0] * np.eye(q.shape[0])
        self.Q_ = q

    def _gain_sequence(self):
        """Kalman gains of the 1st, 2nd, ... update until they stop changing (information form).

        Between updates the covariance goes through ``bin - 1`` prediction steps without observation."""
        ht_qinv = np.linalg.solve(self.Q_, self.H_).T          # H' Q^-1, (n_state, n_features)
        ht_qinv_h = ht_qinv @ self.H_                           # H' Q^-1 H, (n_state, n_state)
        prior = self.P0_.copy()
        gains = []
        for _ in range(self.max_gain_steps):
            posterior = np.linalg.inv(np.linalg.inv(prior) + ht_qinv_h)
            posterior = 0.5 * (posterior + posterior.T)
            gain = posterior @ ht_qinv
            converged = len(gains) > 0 and np.max(np.abs(gain - gains[-1])) < self.tolerance
            gains.append(gain)
            if converged:
                break
            prior = posterior
            for _ in range(self.bin):
                prior = self.A_ @ prior @ self.A_.T + self.W_
        return gains

    def predict(self, features):
        """Decode one segment causally: features (n_steps, n_features) -> (n_steps, n_outputs)."""
        z = np.asarray(features, dtype=np.float64)
        z = z[np.maximum(np.arange(len(z)) - self.lag, 0)] - self.z_mean_
        n_steps = z.shape[0]
        state = np.zeros(self.A_.shape[0])
        out = np.empty((n_steps, self.A_.shape[0]))
        last = len(self._gains) - 1
        for t in range(n_steps):
            if t:
                state = self.A_ @ state
            if t % self.bin == 0:
                gain = self._gains[min(t // self.bin, last)]
                state = state + gain @ (z[t] - self.H_ @ state)
            out[t] = state
        return out + self.x_mean_

    def settings(self):
        """The chosen hyper-parameters, for reports."""
        return {"lag": self.lag, "bin": self.bin, "noise_scale": self.noise_scale}


def _tcn_class():
    # torch is imported only when the TCN is asked for: the linear filters stay numpy-only.
    from neurohand.train.tcn import TCNDecoder
    return TCNDecoder


# Explicit registry: baseline name -> class, in the order reports list them; fitted by default.
BASELINES = {"wiener": WienerFilter, "kalman": KalmanFilter}
#: Fitted only when named (``fit_and_score(..., names=...)``): name -> function returning the class.
#: The TCN trains with torch for minutes (NinaPro DB1 S2E1: about as long as the RNN).
ON_REQUEST = {"tcn": _tcn_class}
#: Every name ``fit_and_score`` accepts, in report order.
ALL_BASELINES = tuple(BASELINES) + tuple(ON_REQUEST)


def baseline_class(name):
    """The class of baseline ``name`` (one of :data:`ALL_BASELINES`)."""
    checks.check_option("baseline", name, ALL_BASELINES)
    return BASELINES[name] if name in BASELINES else ON_REQUEST[name]()


def fit_and_score(train_segments, validation_segments, test_segments, settings=None, decoders=None, names=None):
    """Fit baselines and score them on the test segments.

    ``names`` chooses them (default: :data:`BASELINES`, the linear filters;
    add ``"tcn"`` for the convolutional network); ``settings`` maps a baseline
    name to keyword arguments of its class (the TCN's ``seed`` among them); a
    ``decoders`` dict, when given, receives each fitted decoder by name (so a
    caller that needs their predictions elsewhere does not fit them again).
    Returns {name: score dict (see metrics.score) plus the fitted hyper-parameters,
    ``deterministic`` and, for the TCN, ``seed``}."""
    settings = settings or {}
    names = tuple(BASELINES) if names is None else tuple(names)
    chosen = [(name, baseline_class(name)) for name in names]
    truth = np.concatenate([l for _, l in test_segments], axis=0)
    results = {}
    for name, cls in chosen:
        decoder = cls(**settings.get(name, {})).fit(train_segments, validation_segments)
        if decoders is not None:
            decoders[name] = decoder
        prediction = np.concatenate([decoder.predict(f) for f, _ in test_segments], axis=0)
        result = metrics.score(truth, prediction)
        if name == "wiener":
            result.update({"alpha": decoder.alpha_, "lags": decoder.lags, "lag_step": decoder.lag_step})
        else:
            result.update(decoder.settings())
        # The linear filters are fitted in closed form on a fixed split: no seed changes their figures.
        # The TCN's initial weights, pieces and noise come from its seed.
        result["deterministic"] = name != "tcn"
        results[name] = result
    return results
