"""Classic linear decoders to compare the RNN against: Wiener and Kalman filters.

Both are fitted on the same features and split as the RNN and decode causally
(each output uses features up to its own step only).  numpy only, so they are
light enough to refit on every ``neurohand evaluate``.

A *segment* here is a pair ``(features, labels)``: arrays of shape
``(n_steps, n_features)`` and ``(n_steps, n_outputs)``, consecutive feature
windows of one contiguous stretch of recording.  Lags and filter state never
cross from one segment into the next.
"""
import numpy as np

from neurohand.train import metrics

# Ridge strengths relative to the mean feature energy (see WienerFilter.fit).
DEFAULT_ALPHAS = tuple(10.0 ** p for p in range(-7, 2))


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


class WienerFilter:
    """Ridge regression of the labels on lagged features (a discrete Wiener filter).

    The ridge strength is chosen on the validation segments (highest mean R²)
    among ``alphas``; the fit itself uses the training segments only."""

    def __init__(self, lags=10, lag_step=1, alphas=DEFAULT_ALPHAS):
        self.lags = int(lags)
        self.lag_step = int(lag_step)
        self.alphas = tuple(float(a) for a in alphas)

    def fit(self, train_segments, validation_segments):
        x, y = _stack(train_segments, self.lags, self.lag_step)
        self.x_mean_ = x.mean(axis=0)
        self.y_mean_ = y.mean(axis=0)
        xc = x - self.x_mean_
        gram = xc.T @ xc
        cross = xc.T @ (y - self.y_mean_)
        # alpha is relative to the mean feature energy, so one grid suits any
        # feature scale; one eigendecomposition serves every alpha.
        scale = np.trace(gram) / gram.shape[0]
        eigenvalues, eigenvectors = np.linalg.eigh(gram)
        projected = eigenvectors.T @ cross
        best = None
        self.validation_r2_ = {}
        for alpha in self.alphas:
            self.coef_ = eigenvectors @ (projected / (eigenvalues + alpha * scale)[:, None])
            r2 = metrics.nanmean(metrics.r2_score(*self._truth_and_prediction(validation_segments)))
            self.validation_r2_[alpha] = r2
            if best is None or r2 > best[0]:
                best = (r2, alpha, self.coef_)
        _, self.alpha_, self.coef_ = best
        return self

    def _truth_and_prediction(self, segments):
        truth = np.concatenate([l for _, l in segments], axis=0)
        prediction = np.concatenate([self.predict(f) for f, _ in segments], axis=0)
        return truth, prediction

    def predict(self, features):
        """Decode one segment: features (n_steps, n_features) -> (n_steps, n_outputs)."""
        return (lagged(features, self.lags, self.lag_step) - self.x_mean_) @ self.coef_ + self.y_mean_


class KalmanFilter:
    """Kalman filter with the label vector as state (Wu et al., Neural Computation 2006).

    State model   x_t = A x_{t-1} + w,  w ~ N(0, W)   (x: labels minus their mean)
    Observation   z_t = H x_t + q,      q ~ N(0, Q)   (z: features minus their mean)

    A, W, H and Q are least-squares fits on the training segments (consecutive
    pairs within a segment for A).  Decoding is the standard predict/update
    recursion, started at the training mean with covariance W; the gain is
    computed once per step count until it converges, then held (it depends
    only on the model, never on the data)."""

    def __init__(self, ridge=1e-3, max_gain_steps=2000, tolerance=1e-10):
        self.ridge = float(ridge)
        self.max_gain_steps = int(max_gain_steps)
        self.tolerance = float(tolerance)

    def fit(self, train_segments, validation_segments=None):
        z_all = np.concatenate([np.asarray(f, dtype=np.float64) for f, _ in train_segments], axis=0)
        x_all = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in train_segments], axis=0)
        self.z_mean_ = z_all.mean(axis=0)
        self.x_mean_ = x_all.mean(axis=0)
        n_state = x_all.shape[1]
        eye_state = np.eye(n_state)
        previous = np.concatenate([np.asarray(l, dtype=np.float64)[:-1] for _, l in train_segments]) - self.x_mean_
        following = np.concatenate([np.asarray(l, dtype=np.float64)[1:] for _, l in train_segments]) - self.x_mean_
        gram = previous.T @ previous
        regulariser = self.ridge * np.trace(gram) / n_state * eye_state
        self.A_ = np.linalg.solve(gram + regulariser, previous.T @ following).T
        residual = following - previous @ self.A_.T
        self.W_ = residual.T @ residual / max(len(residual) - 1, 1) + 1e-9 * eye_state
        xc = x_all - self.x_mean_
        zc = z_all - self.z_mean_
        gram = xc.T @ xc
        regulariser = self.ridge * np.trace(gram) / n_state * eye_state
        self.H_ = np.linalg.solve(gram + regulariser, xc.T @ zc).T
        residual = zc - xc @ self.H_.T
        q = residual.T @ residual / max(len(residual) - 1, 1)
        # A small diagonal load keeps Q invertible when features are collinear.
        q += self.ridge * np.trace(q) / q.shape[0] * np.eye(q.shape[0])
        self.Q_ = q
        self._gains = self._gain_sequence()
        return self

    def _gain_sequence(self):
        """Kalman gains K_t for t = 0, 1, ... until they stop changing (information form)."""
        ht_qinv = np.linalg.solve(self.Q_, self.H_).T          # H' Q^-1, (n_state, n_features)
        ht_qinv_h = ht_qinv @ self.H_                           # H' Q^-1 H, (n_state, n_state)
        covariance = self.W_.copy()                             # P_{-1}: uncertainty of the start
        gains = []
        for _ in range(self.max_gain_steps):
            prior = self.A_ @ covariance @ self.A_.T + self.W_
            posterior = np.linalg.inv(np.linalg.inv(prior) + ht_qinv_h)
            posterior = 0.5 * (posterior + posterior.T)
            gain = posterior @ ht_qinv
            converged = len(gains) > 0 and np.max(np.abs(gain - gains[-1])) < self.tolerance
            gains.append(gain)
            covariance = posterior
            if converged:
                break
        return gains

    def predict(self, features):
        """Decode one segment causally: features (n_steps, n_features) -> (n_steps, n_outputs)."""
        z = np.asarray(features, dtype=np.float64) - self.z_mean_
        n_steps = z.shape[0]
        state = np.zeros(self.A_.shape[0])
        out = np.empty((n_steps, self.A_.shape[0]))
        for t in range(n_steps):
            gain = self._gains[min(t, len(self._gains) - 1)]
            prior = self.A_ @ state
            state = prior + gain @ (z[t] - self.H_ @ prior)
            out[t] = state
        return out + self.x_mean_


# Explicit registry: baseline name -> class, in the order reports list them.
BASELINES = {"wiener": WienerFilter, "kalman": KalmanFilter}


def fit_and_score(train_segments, validation_segments, test_segments, settings=None):
    """Fit every baseline and score it on the test segments.

    ``settings`` maps a baseline name to keyword arguments of its class.
    Returns {name: score dict (see metrics.score) plus the fitted hyper-parameters}."""
    settings = settings or {}
    truth = np.concatenate([l for _, l in test_segments], axis=0)
    results = {}
    for name, cls in BASELINES.items():
        decoder = cls(**settings.get(name, {})).fit(train_segments, validation_segments)
        prediction = np.concatenate([decoder.predict(f) for f, _ in test_segments], axis=0)
        result = metrics.score(truth, prediction)
        if name == "wiener":
            result["alpha"] = decoder.alpha_
            result["lags"] = decoder.lags
        results[name] = result
    return results
