"""The temporal convolutional network baseline (train/tcn.py): causal, learns, reported by fit_and_score."""
import numpy as np
import pytest

pytest.importorskip("torch")

from neurohand.firmware_bridge.shared.errors import UsageError  # noqa: E402
from neurohand.train import baselines, metrics, tcn  # noqa: E402

# Small enough to train in a second or two on one thread.
TINY = {"channels": 12, "levels": 3, "kernel": 3, "piece_steps": 50, "batch_size": 8, "dropout": 0.0,
        "input_noise": 0.0, "learning_rate": 1e-2}


def delayed_sum_problem(seed, n_segments=8, n_steps=300, n_features=4):
    """Labels in 0..1 that need history: a squashed sum of feature 0 over the last 8 steps, 4 steps late.

    A decoder reading only the current features cannot do it (the target depends on steps t-11..t-4)."""
    rng = np.random.default_rng(seed)
    segments = []
    for _ in range(n_segments):
        x = rng.normal(size=(n_steps, n_features)).astype(np.float32)
        window = np.convolve(x[:, 0], np.ones(8), mode="full")[:n_steps]
        delayed = np.concatenate([np.zeros(4), window[:-4]])
        y = 1.0 / (1.0 + np.exp(-0.5 * delayed))
        segments.append((x, np.stack([y, 1.0 - y], axis=1).astype(np.float32)))
    return segments[:6], segments[6:7], segments[7:]


def test_receptive_field_formula():
    # Bai et al.: two convolutions per level, dilation 2**level.
    assert tcn.receptive_field(levels=6, kernel=3) == 253
    assert tcn.TemporalConvNet(3, 2, channels=4, levels=2, kernel=3).history == 2 * 2 * (1 + 2)


def test_output_at_t_ignores_every_later_input():
    train, validation, test = delayed_sum_problem(0)
    decoder = tcn.TCNDecoder(epochs=1, **TINY).fit(train, validation)
    features = test[0][0].copy()
    before = decoder.predict(features)
    t = 150
    changed = features.copy()
    changed[t + 1:] = np.random.default_rng(1).normal(scale=5.0, size=changed[t + 1:].shape)
    after = decoder.predict(changed)
    np.testing.assert_array_equal(after[:t + 1], before[:t + 1])
    assert np.max(np.abs(after[t + 1:] - before[t + 1:])) > 1e-3   # the change is seen from t + 1 on
    # And nothing older than the receptive field reaches step t.
    history = decoder.model_.history
    old = features.copy()
    old[t - history - 1] += 10.0
    np.testing.assert_array_equal(decoder.predict(old)[t], before[t])
    assert before.shape == (len(features), 2) and before.dtype == np.float64


def test_learns_a_problem_that_needs_history_and_reports_through_fit_and_score():
    train, validation, test = delayed_sum_problem(2)
    settings = {"tcn": dict(TINY, epochs=15, seed=3)}
    fitted = {}
    results = baselines.fit_and_score(train, validation, test, settings=settings, decoders=fitted,
                                      names=("wiener", "tcn"))
    assert sorted(results) == ["tcn", "wiener"]
    score = results["tcn"]
    # Predicting the mean scores 0; the target is a smooth function of 8 past steps.
    assert score["mean_r2"] > 0.8, score["mean_r2"]
    assert len(score["r2"]) == 2 and score["deterministic"] is False and score["seed"] == 3
    assert score["receptive_field_steps"] == fitted["tcn"].model_.history + 1
    assert 1 <= score["best_epoch"] <= score["epochs_run"] <= 15
    truth = np.concatenate([l for _, l in test])
    prediction = np.concatenate([fitted["tcn"].predict(f) for f, _ in test])
    assert metrics.score(truth, prediction)["mean_r2"] == pytest.approx(score["mean_r2"])


def test_same_seed_same_weights_other_seed_other_weights():
    train, validation, _ = delayed_sum_problem(4, n_segments=7)
    first = tcn.TCNDecoder(epochs=2, seed=5, **TINY).fit(train, validation)
    again = tcn.TCNDecoder(epochs=2, seed=5, **TINY).fit(train, validation)
    other = tcn.TCNDecoder(epochs=2, seed=6, **TINY).fit(train, validation)
    features = validation[0][0]
    np.testing.assert_array_equal(first.predict(features), again.predict(features))
    assert not np.array_equal(first.predict(features), other.predict(features))


def test_refuses_unknown_settings_and_baselines():
    with pytest.raises(ValueError, match="unknown TCN setting"):
        tcn.TCNDecoder(epoch=3)
    with pytest.raises(UsageError, match="did you mean 'tcn'"):
        baselines.fit_and_score([], [], [], names=("tnc",))
    # The default set stays the closed-form filters: the TCN is fitted only when named.
    assert "tcn" not in baselines.BASELINES and "tcn" in baselines.ALL_BASELINES


def test_settings_from_run_carry_the_run_s_budget_and_recipe():
    run = {"training": {"epochs": 7, "learning_rate": 1e-3, "weight_decay": 0.0, "batch_size": 4, "grad_clip": 0.5,
                        "patience": 2, "min_delta": 0.01, "lr_patience": 1, "lr_factor": 0.25, "input_noise": 0.1,
                        "max_minutes": 3.0, "sequence_s": 2.0, "tbptt_steps": 50, "label_smoothing_s": 0.0},
           "model": {"dropout": 0.3, "hidden_size": 64}}
    keywords = tcn.settings_from_run(run, seed=4, steps_per_s=50.0)
    decoder = tcn.TCNDecoder(**keywords)
    assert decoder.seed == 4 and decoder.training["piece_steps"] == 100 and decoder.training["dropout"] == 0.3
    assert {k: decoder.training[k] for k in ("epochs", "max_minutes", "lr_factor", "input_noise")} == {
        "epochs": 7, "max_minutes": 3.0, "lr_factor": 0.25, "input_noise": 0.1}
