"""The Kalman and Wiener baselines against problems whose best answer is known.

A linear-Gaussian state-space model with white observation noise is the
Kalman filter's own model: fitted by least squares, it must come within a hair
of the R² the true model allows, and beat a Wiener filter where the state's
dynamics carry information the features' recent past does not.  Where the
observation noise is not white (as with overlapping feature windows), the
validation must move the filter away from the textbook set-up, and the Wiener
filter must read a longer history when the labels depend on one."""
import numpy as np
import pytest

from neurohand.train import baselines, metrics


def rotation(angle, radius):
    c, s = np.cos(angle), np.sin(angle)
    return radius * np.array([[c, -s], [s, c]])


def stationary_covariance(a, w):
    """Solve S = A S A' + W by iteration (A is stable)."""
    s = w.copy()
    for _ in range(5000):
        s = a @ s @ a.T + w
    return s


def steady_posterior(a, w, h, q):
    p = w.copy()
    for _ in range(5000):
        prior = a @ p @ a.T + w
        p = prior - prior @ h.T @ np.linalg.solve(h @ prior @ h.T + q, h @ prior)
    return p


def state_space_problem(seed, a, w, h, q, n_segments=8, n_steps=1500, noise_correlation=0.0):
    """Segments drawn from the model, each started from the stationary distribution.

    ``noise_correlation`` > 0 makes the observation noise AR(1) with that
    correlation (same marginal covariance q)."""
    rng = np.random.default_rng(seed)
    n_state, n_features = h.shape[1], h.shape[0]
    start = np.linalg.cholesky(stationary_covariance(a, w))
    w_root, q_root = np.linalg.cholesky(w), np.linalg.cholesky(q)
    innovation = np.sqrt(1.0 - noise_correlation ** 2)
    segments = []
    for _ in range(n_segments):
        x = np.empty((n_steps, n_state))
        noise = np.empty((n_steps, n_features))
        x[0] = start @ rng.normal(size=n_state)
        noise[0] = q_root @ rng.normal(size=n_features)
        for t in range(1, n_steps):
            x[t] = a @ x[t - 1] + w_root @ rng.normal(size=n_state)
            noise[t] = noise_correlation * noise[t - 1] + innovation * (q_root @ rng.normal(size=n_features))
        segments.append((x @ h.T + noise + 1.0, x + 0.5))
    n_test = max(1, n_segments // 4)
    return segments[:-2 * n_test], segments[-2 * n_test:-n_test], segments[-n_test:]


def true_model_r2(a, w, h, q, segments):
    """R² of the Kalman filter that knows the model (the best any causal decoder can do on average)."""
    truth, decoded = [], []
    for z, labels in segments:
        state, covariance = np.zeros(len(a)), stationary_covariance(a, w)
        for t, observation in enumerate(z - 1.0):
            if t:
                state, covariance = a @ state, a @ covariance @ a.T + w
            gain = covariance @ h.T @ np.linalg.inv(h @ covariance @ h.T + q)
            state = state + gain @ (observation - h @ state)
            covariance = covariance - gain @ h @ covariance
            decoded.append(state + 0.5)
        truth.append(labels)
    return metrics.r2_score(np.concatenate(truth), np.array(decoded))


def decoded_r2(decoder, segments):
    truth = np.concatenate([l for _, l in segments])
    return metrics.r2_score(truth, np.concatenate([decoder.predict(f) for f, _ in segments]))


def oscillator():
    """Two lightly damped oscillators seen through 3 noisy features."""
    a = np.zeros((4, 4))
    a[:2, :2] = rotation(0.05, 0.995)
    a[2:, 2:] = rotation(0.02, 0.99)
    w = 0.01 * np.eye(4)
    h = np.random.default_rng(7).normal(size=(3, 4))
    q = 4.0 * np.eye(3)
    return a, w, h, q


def test_kalman_recovers_a_known_state_space_model_and_beats_wiener():
    a, w, h, q = oscillator()
    train, validation, test = state_space_problem(0, a, w, h, q, n_segments=12, n_steps=2000)
    # The expected R² of the true model's filter, and what it scores on these test steps.
    expected = 1.0 - np.diag(steady_posterior(a, w, h, q)) / np.diag(stationary_covariance(a, w))
    optimum = true_model_r2(a, w, h, q, test)
    np.testing.assert_allclose(np.mean(optimum), np.mean(expected), atol=0.1)
    kalman = baselines.KalmanFilter(lags=(0, 5), bins=(1, 5), noise_scales=(1.0, 10.0)).fit(train, validation)
    kalman_r2 = decoded_r2(kalman, test)
    # White noise, no delay: the validation picks the textbook filter.
    assert (kalman.lag, kalman.bin) == (0, 1)
    np.testing.assert_allclose(kalman.A_, a, atol=0.02)
    assert np.all(kalman_r2 > optimum - 0.03), (kalman_r2, optimum)
    assert np.mean(kalman_r2) > np.mean(optimum) - 0.015, (kalman_r2, optimum)
    wiener_r2 = decoded_r2(baselines.WienerFilter().fit(train, validation), test)
    assert np.mean(kalman_r2) > np.mean(wiener_r2) + 0.03, (kalman_r2, wiener_r2)


def test_correlated_observation_noise_moves_the_kalman_away_from_the_textbook_setup():
    a, w, h, q = oscillator()
    train, validation, test = state_space_problem(1, a, w, h, 0.5 * q, noise_correlation=0.98)
    textbook = baselines.KalmanFilter(lags=0, bins=1, noise_scales=1.0).fit(train, validation)
    chosen = baselines.KalmanFilter().fit(train, validation)
    assert chosen.bin > 1 or chosen.noise_scale > 1.0
    assert np.mean(decoded_r2(chosen, test)) > np.mean(decoded_r2(textbook, test)) + 0.05


def test_kalman_chooses_the_lag_between_features_and_state():
    # Fast dynamics (the state 5 steps on is nearly independent of the state now), so only
    # the features that describe the current state help.
    a, w, h, q = 0.6 * np.eye(2), 0.1 * np.eye(2), np.array([[1.0, 0.0], [0.5, 1.0], [0.0, 1.0]]), 0.1 * np.eye(3)
    train, validation, test = state_space_problem(2, a, w, h, q, n_segments=5, n_steps=800)
    # The features describe the state 5 steps later (as muscle activity leads movement).
    shift = lambda segments: [(f[5:], l[:-5]) for f, l in segments]
    train, validation, test = shift(train), shift(validation), shift(test)
    kalman = baselines.KalmanFilter(lags=(0, 5), bins=1, noise_scales=1.0).fit(train, validation)
    assert kalman.lag == 5
    assert kalman.validation_r2_[(5, 1, 1.0)] > kalman.validation_r2_[(0, 1, 1.0)]


def history_problem(seed, span, n_segments=5, n_steps=1200, n_features=3):
    """Labels a sum of the features' last ``span`` steps (span 1: the current step only)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(n_features, 2))
    segments = []
    for _ in range(n_segments):
        z = rng.normal(size=(n_steps, n_features))
        kernel = np.ones(span) / span
        smooth = np.stack([np.convolve(z[:, i], kernel)[:n_steps] for i in range(n_features)], axis=1)
        segments.append((z, smooth @ weights + 0.05 * rng.normal(size=(n_steps, 2))))
    return segments[:3], segments[3:4], segments[4:]


def test_wiener_reads_a_longer_history_when_the_labels_need_it():
    short = baselines.WienerFilter().fit(*history_problem(3, span=1)[:2])
    long = baselines.WienerFilter().fit(*history_problem(3, span=40)[:2])
    assert long.history_steps >= 15 and long.history_steps > short.history_steps
    # Both chosen together with the ridge strength, by the validation score.
    assert long.validation_r2_[(long.lags, long.lag_step, long.alpha_)] == max(long.validation_r2_.values())
    train, validation, test = history_problem(3, span=40)
    one_step = baselines.WienerFilter(lags=1).fit(train, validation)
    assert np.mean(decoded_r2(long, test)) > np.mean(decoded_r2(one_step, test)) + 0.2


def test_wiener_searches_no_history_wider_than_its_column_budget():
    # 144 features (the demo's raw-mode pipeline): 20 lags would be 2,880 columns, an eigendecomposition
    # costing tens of seconds per candidate; the search stays within MAX_WIENER_COLUMNS.
    train, validation, _ = history_problem(4, span=5, n_segments=5, n_steps=300, n_features=144)
    wiener = baselines.WienerFilter().fit(train, validation)
    widths = {lags * 144 for lags, _, _ in wiener.validation_r2_}
    assert widths and max(widths) <= baselines.MAX_WIENER_COLUMNS
    assert wiener.lags * 144 <= baselines.MAX_WIENER_COLUMNS
    # Fixed by the user, a history is used as given, whatever its width.
    assert baselines.WienerFilter(lags=5, lag_step=1).fit(train, validation).lags == 5


@pytest.mark.parametrize("kwargs", [{"lags": ()}, {"lags": 0}, {"lag_step": 0}])
def test_wiener_refuses_an_empty_or_zero_history(kwargs):
    with pytest.raises(ValueError):
        baselines.WienerFilter(**kwargs)


def test_linear_baselines_say_they_are_deterministic():
    a, w, h, q = oscillator()
    train, validation, test = state_space_problem(4, a, w, h, q, n_segments=4, n_steps=200)
    first = baselines.fit_and_score(train, validation, test)
    second = baselines.fit_and_score(train, validation, test)
    for name in baselines.BASELINES:
        assert first[name]["deterministic"] is True
        assert first[name]["mean_r2"] == second[name]["mean_r2"]
    assert {"lag", "bin", "noise_scale"} <= set(first["kalman"])
    assert {"alpha", "lags", "lag_step"} <= set(first["wiener"])
