"""Why the Kalman baseline trails the Wiener filter on NinaPro DB1: docs/figures/kalman_baseline.png.

    .venv/bin/neurohand import ninapro S2_A1_E1.mat --out s2e1.nh
    .venv/bin/python docs/figures/kalman_baseline.py s2e1.nh docs/figures/kalman_baseline.png

Features and split are the trainer's defaults (train/trainer.py prepare), as in
``neurohand evaluate``.  Panels: the autocorrelation of the observation model's
residual (the filter assumes it is white), validation R² per observation
spacing and noise scale, and one test stretch decoded by each filter.
"""
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from neurohand.train import baselines, metrics, splits, trainer  # noqa: E402


def main(recording, out):
    prepared = trainer.prepare([recording], None)
    pairs = {name: [(s.features.astype(np.float64), s.labels.astype(np.float64)) for s in prepared.sequences[name]]
             for name in splits.SPLIT_NAMES}
    rate = 1.0 / prepared.windows["stride_s"]
    chosen = baselines.KalmanFilter().fit(pairs["train"], pairs["validation"])
    textbook = baselines.KalmanFilter(lags=0, bins=1, noise_scales=1.0).fit(pairs["train"], pairs["validation"])
    wiener = baselines.WienerFilter().fit(pairs["train"], pairs["validation"])

    residuals = [f - textbook.z_mean_ - (l - textbook.x_mean_) @ textbook.H_.T for f, l in pairs["train"]]
    max_lag = int(2 * rate)
    lags = np.arange(0, max_lag + 1, 2)
    correlation = []
    for lag in lags:
        a = np.concatenate([r[:len(r) - lag] for r in residuals if len(r) > lag])
        b = np.concatenate([r[lag:] for r in residuals if len(r) > lag])
        a, b = a - a.mean(0), b - b.mean(0)
        correlation.append(np.mean(np.sum(a * b, 0) / np.sqrt(np.sum(a * a, 0) * np.sum(b * b, 0))))

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=80)
    axes[0].plot(lags / rate, correlation, color="k")
    axes[0].axhline(0, color="0.7", lw=0.8)
    axes[0].set(xlabel="lag (s)", ylabel="correlation", title="observation residual z - Hx (should be white)")

    for bin_steps in chosen.bin_candidates:
        values = [chosen.validation_r2_[(chosen.lag, bin_steps, c)] for c in chosen.noise_scale_candidates]
        axes[1].semilogx(chosen.noise_scale_candidates, values, marker="o",
                         label="observe every {} ms".format(int(round(1000 * bin_steps / rate))))
    axes[1].set(xlabel="observation noise scale c", ylabel="validation mean R²", ylim=(-1.0, 0.5),
                title="Kalman set-ups (lag {} steps)".format(chosen.lag))
    axes[1].legend(fontsize=7)

    features, labels = pairs["test"][0]
    joint = int(np.argmax(labels.std(0)))
    time = np.arange(len(labels)) / rate
    truth = np.concatenate([l for _, l in pairs["test"]])
    for name, decoder, style in (("Wiener", wiener, "C0"), ("Kalman, textbook", textbook, "C3"),
                                 ("Kalman, chosen", chosen, "C2")):
        r2 = metrics.nanmean(metrics.r2_score(truth, np.concatenate([decoder.predict(f) for f, _ in pairs["test"]])))
        axes[2].plot(time, decoder.predict(features)[:, joint], color=style, lw=1,
                     label="{} (test R² {:.2f})".format(name, r2))
    axes[2].plot(time, labels[:, joint], color="k", lw=1.5, label="glove")
    axes[2].set(xlabel="time (s)", ylabel="joint {} (0..1)".format(joint), title="first test segment")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
