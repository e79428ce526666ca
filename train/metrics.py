"""Scores of a decoded trajectory against the true one, per output.

All functions take ``truth`` and ``prediction`` as arrays of shape
``(n_steps, n_outputs)`` in the same units and return one value per output.
An output whose true trajectory is constant has no defined R² or Pearson r:
it scores ``nan`` there, and the means skip it (``json_ready`` turns ``nan``
into ``null`` so the JSON stays valid).
"""
import math

import numpy as np


def _check_pair(truth, prediction):
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if truth.ndim == 1:
        truth = truth[:, None]
    if prediction.ndim == 1:
        prediction = prediction[:, None]
    if truth.shape != prediction.shape:
        raise ValueError("truth {} and prediction {} differ in shape".format(truth.shape, prediction.shape))
    if truth.shape[0] < 2:
        raise ValueError("need at least 2 steps to score, got {}".format(truth.shape[0]))
    return truth, prediction


def r2_score(truth, prediction):
    """Coefficient of determination per output, shape ``(n_outputs,)``.

    1 - sum((y - yhat)^2) / sum((y - mean(y))^2), the mean taken over the scored
    steps (so predicting the test mean scores 0, and worse scores below 0)."""
    truth, prediction = _check_pair(truth, prediction)
    residual = np.sum((truth - prediction) ** 2, axis=0)
    total = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)


def pearson_r(truth, prediction):
    """Pearson correlation per output, shape ``(n_outputs,)``; nan where either is constant."""
    truth, prediction = _check_pair(truth, prediction)
    t = truth - truth.mean(axis=0)
    p = prediction - prediction.mean(axis=0)
    denominator = np.sqrt(np.sum(t * t, axis=0) * np.sum(p * p, axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, np.sum(t * p, axis=0) / np.where(denominator > 0, denominator, 1.0),
                        np.nan)


def rmse(truth, prediction):
    """Root-mean-square error per output, shape ``(n_outputs,)``, in the units of the inputs."""
    truth, prediction = _check_pair(truth, prediction)
    return np.sqrt(np.mean((truth - prediction) ** 2, axis=0))


def nanmean(values):
    """Mean of the finite values (nan where there are none), as a float."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def score(truth, prediction):
    """All scores of one decode as a plain dict (lists per output and their means)."""
    r2 = r2_score(truth, prediction)
    r = pearson_r(truth, prediction)
    error = rmse(truth, prediction)
    return {
        "r2": [float(v) for v in r2], "mean_r2": nanmean(r2),
        "pearson_r": [float(v) for v in r], "mean_pearson_r": nanmean(r),
        "rmse": [float(v) for v in error], "mean_rmse": nanmean(error),
        "n_steps": int(np.asarray(truth).shape[0]),
    }


def json_ready(value):
    """``value`` with every non-finite float replaced by None, recursively (JSON has no nan)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
