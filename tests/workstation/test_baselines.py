"""Wiener and Kalman baselines and the scoring functions, on problems with known answers."""
import numpy as np
import pytest

from neurohand.train import baselines, metrics


def linear_problem(seed, n_segments=6, n_steps=400, n_features=8, n_outputs=3, noise=0.1):
    """Smooth AR(1) labels in 0..1-ish, features a fixed linear map of them plus noise."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n_outputs, n_features))
    segments = []
    for _ in range(n_segments):
        x = np.zeros((n_steps, n_outputs))
        for t in range(1, n_steps):
            x[t] = 0.97 * x[t - 1] + 0.1 * rng.normal(size=n_outputs)
        z = x @ mixing + noise * rng.normal(size=(n_steps, n_features))
        segments.append((z, x + 0.5))
    return segments[:4], segments[4:5], segments[5:]


def test_scores_match_definitions():
    truth = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    prediction = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    # Output 0: residual 1, total 5 -> 0.8; output 1 is constant -> undefined (nan), skipped by the mean.
    np.testing.assert_allclose(metrics.r2_score(truth, prediction)[0], 0.8)
    assert np.isnan(metrics.r2_score(truth, prediction)[1])
    np.testing.assert_allclose(metrics.rmse(truth, prediction), [0.5, 0.0])
    np.testing.assert_allclose(metrics.pearson_r(truth, prediction)[0],
                               np.corrcoef(truth[:, 0], prediction[:, 0])[0, 1])
    result = metrics.score(truth, prediction)
    assert result["mean_r2"] == pytest.approx(0.8)
    assert metrics.json_ready(result)["r2"][1] is None


def test_predicting_the_mean_scores_zero_and_shapes_are_checked():
    truth = np.random.default_rng(0).normal(size=(50, 2))
    np.testing.assert_allclose(metrics.r2_score(truth, np.tile(truth.mean(0), (50, 1))), [0.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        metrics.r2_score(truth, truth[:, :1])


def test_lagged_is_causal():
    features = np.arange(10, dtype=float)[:, None]
    out = baselines.lagged(features, lags=3, lag_step=2)
    assert out.shape == (10, 3)
    # Row 5 holds x5, x3, x1; row 1 repeats the first row for the missing past.
    np.testing.assert_array_equal(out[5], [5, 3, 1])
    np.testing.assert_array_equal(out[1], [1, 0, 0])
    # Changing a future sample never changes an earlier row.
    changed = features.copy()
    changed[7] = 100
    np.testing.assert_array_equal(baselines.lagged(changed, 3, 2)[:7], out[:7])


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_baselines_beat_a_constant_on_an_easy_linear_problem(name):
    train, validation, test = linear_problem(seed=1)
    decoder = baselines.BASELINES[name]().fit(train, validation)
    truth = np.concatenate([l for _, l in test])
    prediction = np.concatenate([decoder.predict(f) for f, _ in test])
    r2 = metrics.r2_score(truth, prediction)
    constant = metrics.r2_score(truth, np.tile(np.concatenate([l for _, l in train]).mean(0), (len(truth), 1)))
    assert np.all(constant <= 0.0)
    assert np.all(r2 > 0.9), r2


def test_wiener_chooses_alpha_on_validation():
    train, validation, test = linear_problem(seed=2, noise=2.0)
    decoder = baselines.WienerFilter(lags=4).fit(train, validation)
    assert decoder.alpha_ in decoder.alphas
    best = max(decoder.validation_r2_.values())
    # Keyed by (lags, lag_step, alpha) since the history is chosen with the ridge strength.
    assert decoder.validation_r2_[(decoder.lags, decoder.lag_step, decoder.alpha_)] == best


def test_kalman_matches_a_textbook_recursion():
    train, validation, test = linear_problem(seed=3, n_features=4, noise=0.5)
    # The textbook set-up (no lag, every step observed, fitted noise), started as the filter now
    # is: from the labels' stationary covariance P0 (it used to start from W, which held the
    # first steps at the mean), with the prediction step from the second observation on.
    kalman = baselines.KalmanFilter(lags=0, bins=1, noise_scales=1.0).fit(train, validation)
    z = test[0][0] - kalman.z_mean_
    a, w, h, q = kalman.A_, kalman.W_, kalman.H_, kalman.Q_
    state, covariance = np.zeros(a.shape[0]), kalman.P0_.copy()
    expected = []
    for t in range(len(z)):
        prior, prior_cov = (a @ state, a @ covariance @ a.T + w) if t else (state, covariance)
        gain = prior_cov @ h.T @ np.linalg.inv(h @ prior_cov @ h.T + q)
        state = prior + gain @ (z[t] - h @ prior)
        covariance = (np.eye(len(state)) - gain @ h) @ prior_cov
        expected.append(state + kalman.x_mean_)
    np.testing.assert_allclose(kalman.predict(test[0][0]), np.array(expected), atol=1e-7)


def test_fit_and_score_reports_every_baseline():
    train, validation, test = linear_problem(seed=4)
    results = baselines.fit_and_score(train, validation, test)
    assert sorted(results) == sorted(baselines.BASELINES)
    for result in results.values():
        assert len(result["r2"]) == 3 and result["mean_r2"] > 0.9
