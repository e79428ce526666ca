"""report.png: how well a trained decoder does, at a glance (matplotlib, Agg backend, no display).

Three parts, top to bottom:
- predicted against true trajectories per output over the first
  ``max_seconds`` of the test split (one small panel per output);
- R² per output on the test split as bars;
- learning curves: training and validation loss, validation mean R², per epoch.
"""
import math

import numpy as np


def write_report(path, truth, prediction, steps_per_s, label_names, r2, history, title="", max_seconds=60.0):
    """Draw the report into ``path`` (PNG).

    truth, prediction : ndarray (n_steps, n_outputs), test split, consecutive segments joined
    steps_per_s : float, decoder steps per second (for the time axis)
    label_names : list of str, one per output
    r2 : list of float (nan allowed), per output
    history : dict of lists with epoch, train_loss, validation_loss, validation_r2
    """
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from matplotlib.gridspec import GridSpec

    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    n_outputs = truth.shape[1]
    columns = min(4, n_outputs)
    rows = int(math.ceil(n_outputs / float(columns)))
    figure = plt.figure(figsize=(4.0 * columns, 1.6 * rows + 6.5))
    grid = GridSpec(rows + 2, columns, figure=figure, height_ratios=[1.0] * rows + [2.2, 2.2], hspace=0.9)
    shown = min(len(truth), int(max_seconds * steps_per_s))
    seconds = np.arange(shown) / float(steps_per_s)
    for k in range(n_outputs):
        axis = figure.add_subplot(grid[k // columns, k % columns])
        axis.plot(seconds, truth[:shown, k], color="black", linewidth=0.8, label="true")
        axis.plot(seconds, prediction[:shown, k], color="tab:red", linewidth=0.8, label="decoded")
        value = r2[k] if r2[k] is not None else float("nan")
        axis.set_title("{} (R2 {:.2f})".format(label_names[k], value), fontsize=8)
        axis.tick_params(labelsize=6)
        if k // columns == rows - 1:
            axis.set_xlabel("test split, s", fontsize=7)
        if k == 0:
            axis.legend(fontsize=6, loc="upper right")
    bars = figure.add_subplot(grid[rows, :])
    values = [v if v is not None and np.isfinite(v) else 0.0 for v in r2]
    bars.bar(np.arange(n_outputs), values, color="tab:blue")
    bars.set_xticks(np.arange(n_outputs))
    bars.set_xticklabels(label_names, rotation=45, ha="right", fontsize=7)
    bars.set_ylabel("test R2")
    bars.axhline(0.0, color="black", linewidth=0.5)
    finite = [v for v in r2 if v is not None and np.isfinite(v)]
    if finite:
        bars.axhline(float(np.mean(finite)), color="tab:red", linestyle="--", linewidth=1,
                     label="mean {:.3f}".format(float(np.mean(finite))))
        bars.legend(fontsize=7)
    curves = figure.add_subplot(grid[rows + 1, :])
    epochs = history.get("epoch", [])
    if epochs:
        curves.plot(epochs, history["train_loss"], marker=".", label="train loss")
        curves.plot(epochs, history["validation_loss"], marker=".", label="validation loss")
        curves.set_xlabel("epoch")
        curves.set_ylabel("MSE (scaled labels)")
        curves.legend(loc="upper left", fontsize=7)
        r2_axis = curves.twinx()
        r2_axis.plot(epochs, history["validation_r2"], color="tab:green", marker=".", label="validation mean R2")
        r2_axis.set_ylabel("validation mean R2")
        r2_axis.legend(loc="upper right", fontsize=7)
    figure.suptitle(title)
    figure.subplots_adjust(top=0.95, bottom=0.05)
    figure.savefig(path, dpi=80)
    plt.close(figure)
