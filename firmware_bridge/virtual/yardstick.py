"""A deliberately simple linear decoder, to measure how hard the synthetic data are.

Not the project's decoder (that is decoder/ and train/): a fixed, numpy-only
yardstick, documented in docs/simulator.md, so a change to the simulator that
makes decoding trivial or impossible is caught by a test.

Pipeline: first difference (a crude high-pass that removes drift and most of
the mains) -> per channel log RMS and log mean absolute value over 100 ms
windows every 20 ms -> the features of the last ``n_lags`` windows side by side
-> ridge regression onto the glove's five finger flexions, trained on the first
part of the recording and scored by R^2 on the rest.
"""
import numpy as np

BIN_S = 0.020        # window step
WINDOW_BINS = 5      # 100 ms windows


def window_features(signals, rate):
    """Log RMS and log MAV of the differenced signal in 100 ms windows every 20 ms.

    ``signals`` ndarray (n_samples, n_channels), any numeric dtype.  Returns
    ``(features, end_sample)``: ndarray (n_windows, 2 * n_channels) float64 and
    the signal sample (exclusive) at which each window ends, (n_windows,) int.
    """
    bin_samples = int(round(BIN_S * rate))
    n_bins = (signals.shape[0] - 1) // bin_samples
    n_ch = signals.shape[1]
    squares = np.empty((n_bins, n_ch))
    absolutes = np.empty((n_bins, n_ch))
    for c in range(n_ch):                    # one channel at a time keeps memory small
        d = np.diff(signals[:n_bins * bin_samples + 1, c].astype(np.float64))
        d = d.reshape(n_bins, bin_samples)
        squares[:, c] = (d * d).sum(axis=1)
        absolutes[:, c] = np.abs(d).sum(axis=1)
    kernel = np.ones(WINDOW_BINS)

    def windowed(x):
        return np.stack([np.convolve(x[:, c], kernel, mode="valid") for c in range(n_ch)], axis=1)
    n_per_window = WINDOW_BINS * bin_samples
    rms = np.sqrt(windowed(squares) / n_per_window)
    mav = windowed(absolutes) / n_per_window
    features = np.concatenate([np.log(rms + 1e-3), np.log(mav + 1e-3)], axis=1)
    end_sample = (np.arange(features.shape[0]) + WINDOW_BINS) * bin_samples + 1
    return features, end_sample


def lagged(features, n_lags):
    """Stack each window's features with those of the ``n_lags - 1`` windows before it.

    Returns ndarray (n_windows - n_lags + 1, n_features * n_lags).
    """
    n = features.shape[0] - n_lags + 1
    return np.concatenate([features[n_lags - 1 - lag:n_lags - 1 - lag + n] for lag in range(n_lags)], axis=1)


def r2_score(truth, prediction):
    """Coefficient of determination per column, ndarray (n_outputs,)."""
    residual = ((truth - prediction) ** 2).sum(axis=0)
    total = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    return 1.0 - residual / np.maximum(total, 1e-12)


def correlation(truth, prediction):
    """Pearson r per column (the figure published decoders of real implants report)."""
    t = truth - truth.mean(axis=0)
    p = prediction - prediction.mean(axis=0)
    return (t * p).sum(axis=0) / np.maximum(np.sqrt((t * t).sum(axis=0) * (p * p).sum(axis=0)), 1e-12)


def _design(signals, labels, rate, label_rate, n_lags):
    """Lagged features and the glove label at each window's end: ``(x, y)``."""
    features, end_sample = window_features(signals, rate)
    x = lagged(features, n_lags)
    end_sample = end_sample[n_lags - 1:]
    label_index = np.minimum((end_sample * label_rate // rate).astype(int) - 1, labels.shape[0] - 1)
    y = labels[np.maximum(label_index, 0)].astype(np.float64)
    return x, y


def _fit(x, y, ridge):
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    # Motion artefacts make a few windows extreme; clipping keeps them from
    # dominating a least-squares fit (a real pipeline would blank them).
    a = np.clip((x - mean) / std, -4.0, 4.0)
    y_mean = y.mean(axis=0)
    weights = np.linalg.solve(a.T.dot(a) + ridge * np.eye(a.shape[1]), a.T.dot(y - y_mean))
    return {"mean": mean, "std": std, "weights": weights, "y_mean": y_mean}


def _predict(model, x):
    return np.clip((x - model["mean"]) / model["std"], -4.0, 4.0).dot(model["weights"]) + model["y_mean"]


def _scores(y, prediction):
    r2, r = r2_score(y, prediction), correlation(y, prediction)
    return {"r2": [float(v) for v in r2], "mean_r2": float(r2.mean()),
            "r": [float(v) for v in r], "mean_r": float(r.mean())}


def linear_decoder_r2(signals, labels, rate, label_rate=100.0, train_fraction=0.7, n_lags=10, ridge=10.0):
    """Fit the yardstick decoder on the first ``train_fraction`` and score the rest.

    ``signals`` ndarray (n_samples, n_channels); ``labels`` ndarray (n_labels, 5)
    at ``label_rate``.  Returns a dict: ``r2`` (per finger list), ``mean_r2``,
    ``r`` and ``mean_r`` (Pearson correlation), ``n_train``, ``n_test`` (windows).
    """
    x, y = _design(signals, labels, rate, label_rate, n_lags)
    n_train = int(train_fraction * x.shape[0])
    model = _fit(x[:n_train], y[:n_train], ridge)
    result = _scores(y[n_train:], _predict(model, x[n_train:]))
    result.update(n_train=int(n_train), n_test=int(x.shape[0] - n_train))
    return result


def across_sessions(train, test, rate, label_rate=100.0, train_fraction=0.7, n_lags=10, ridge=10.0):
    """The yardstick fitted on one session and scored on another, against one
    fitted within the other: how much a decoder loses from one day to the next.

    ``train`` and ``test`` are ``(signals, labels)`` of two sessions of one
    patient (same channels).  Both decoders are scored on the last
    ``1 - train_fraction`` of ``test``; the carried-over one is fitted on the
    first ``train_fraction`` of ``train``, the within-session one on the first
    ``train_fraction`` of ``test``; "renormalised" is the carried decoder with its
    feature normalisation (mean, SD) re-fitted on that first part of ``test``, the
    cheapest recalibration.  Returns ``{"carried", "renormalised", "within"}`` scores.
    """
    x0, y0 = _design(train[0], train[1], rate, label_rate, n_lags)
    x1, y1 = _design(test[0], test[1], rate, label_rate, n_lags)
    n0, n1 = int(train_fraction * x0.shape[0]), int(train_fraction * x1.shape[0])
    carried = _fit(x0[:n0], y0[:n0], ridge)
    within = _fit(x1[:n1], y1[:n1], ridge)
    renormalised = dict(carried, mean=within["mean"], std=within["std"])
    return {"carried": _scores(y1[n1:], _predict(carried, x1[n1:])),
            "renormalised": _scores(y1[n1:], _predict(renormalised, x1[n1:])),
            "within": _scores(y1[n1:], _predict(within, x1[n1:]))}
