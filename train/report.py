"""report.png: how well a trained decoder does, at a glance (matplotlib, Agg backend, no display).

Two bands, top to bottom:
- predicted against true trajectories per output over the first
  ``max_seconds`` of the test split (one small panel per output, up to
  :data:`MAX_COLUMNS` to a row, no empty cells but the last row's);
- side by side: R² per output on the test split as bars, and the learning
  curves (training and validation loss, validation mean R², per epoch).

The layout is matplotlib's constrained layout, so the title, panel titles,
tick labels and legends never overlap a panel whatever the number of outputs
(tests/workstation/test_classes.py checks the text extents).  R² bars below
:data:`R2_FLOOR` are drawn to the floor and labelled with their value, so one
output far below zero does not flatten the others.
"""
import math

import numpy as np

#: Most trajectory panels in one row (22 glove joints: 4 rows of 6).
MAX_COLUMNS = 6
#: Lowest R² the bar axis shows; lower bars stop there with their value written on them.
R2_FLOOR = -1.0


def _finite(values):
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def draw_report(truth, prediction, steps_per_s, label_names, r2, history, title="", max_seconds=60.0):
    """The report as a matplotlib Figure (see :func:`write_report` for the arguments)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    n_outputs = truth.shape[1]
    r2 = _finite(r2)
    columns = min(MAX_COLUMNS, n_outputs)
    rows = int(math.ceil(n_outputs / float(columns)))
    figure = plt.figure(figsize=(max(10.0, 2.6 * columns), 1.55 * rows + 3.6), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.55 * rows, 3.3])

    shown = min(len(truth), int(max_seconds * steps_per_s))
    seconds = np.arange(shown) / float(steps_per_s)
    axes = top.subplots(rows, columns, squeeze=False, sharex=True)
    for k in range(rows * columns):
        axis = axes[k // columns, k % columns]
        if k >= n_outputs:
            axis.remove()
            continue
        axis.plot(seconds, truth[:shown, k], color="black", linewidth=0.8, label="true")
        axis.plot(seconds, prediction[:shown, k], color="tab:red", linewidth=0.8, label="decoded")
        axis.set_title("{} (R2 {:.2f})".format(label_names[k], r2[k]), fontsize=8)
        axis.tick_params(labelsize=7)
        # The last panel of each column carries the time axis (sharex hides the others' labels).
        if k + columns >= n_outputs:
            axis.set_xlabel("test split, s", fontsize=7)
            axis.tick_params(labelbottom=True)
    axes[0, 0].legend(fontsize=6, loc="upper right")

    bars, curves = bottom.subplots(1, 2, width_ratios=[max(3.0, 0.25 * n_outputs), 3.0])
    values = np.where(np.isfinite(r2), r2, 0.0)
    clipped = np.maximum(values, R2_FLOOR)
    positions = np.arange(n_outputs)
    bars.bar(positions, clipped, color=np.where(values < R2_FLOOR, "tab:gray", "tab:blue"))
    for k in np.flatnonzero(values < R2_FLOOR):
        bars.text(k, R2_FLOOR, "{:.1f}".format(values[k]), rotation=90, ha="center", va="bottom", fontsize=6,
                  color="white")
    bars.set_ylim(min(0.0, clipped.min()) - 0.05, 1.0)
    bars.set_xticks(positions)
    bars.set_xticklabels(label_names, rotation=60 if n_outputs > 8 else 0, ha="right" if n_outputs > 8 else "center",
                         fontsize=7)
    bars.set_ylabel("test R2", fontsize=8)
    bars.tick_params(axis="y", labelsize=7)
    bars.axhline(0.0, color="black", linewidth=0.5)
    finite = r2[np.isfinite(r2)]
    if finite.size:
        mean = float(finite.mean())
        bars.axhline(max(mean, R2_FLOOR), color="tab:red", linestyle="--", linewidth=1, label="mean {:.3f}".format(mean))
        bars.legend(fontsize=7, loc="best")
    bars.set_title("test R2 per output" + (" (bars below {:g} cut, value written)".format(R2_FLOOR)
                                          if np.any(values < R2_FLOOR) else ""), fontsize=8)

    epochs = list(history.get("epoch", []))
    if epochs:
        curves.plot(epochs, _finite(history["train_loss"]), marker=".", label="train loss")
        curves.plot(epochs, _finite(history["validation_loss"]), marker=".", label="validation loss")
        curves.set_xlabel("epoch", fontsize=8)
        curves.set_ylabel("MSE (scaled labels)", fontsize=8)
        if len(epochs) <= 10:
            curves.set_xticks(epochs)
        else:
            curves.xaxis.set_major_locator(MaxNLocator(integer=True))
        curves.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        curves.tick_params(labelsize=7)
        r2_axis = curves.twinx()
        r2_axis.plot(epochs, _finite(history["validation_r2"]), color="tab:green", marker=".",
                     label="validation mean R2")
        r2_axis.set_ylabel("validation mean R2", fontsize=8)
        r2_axis.tick_params(labelsize=7)
        # One legend for both axes, above the panel: inside, "best" placement sees only one axis's lines.
        lines = curves.get_lines() + r2_axis.get_lines()
        curves.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="lower center",
                      bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, title="learning curves",
                      title_fontsize=8)
    else:
        curves.set_title("learning curves", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def write_report(path, truth, prediction, steps_per_s, label_names, r2, history, title="", max_seconds=60.0):
    """Draw the report into ``path`` (PNG).

    truth, prediction : ndarray (n_steps, n_outputs), test split, consecutive segments joined
    steps_per_s : float, decoder steps per second (for the time axis)
    label_names : list of str, one per output
    r2 : list of float (nan or None allowed), per output
    history : dict of lists with epoch, train_loss, validation_loss, validation_r2
    """
    figure = draw_report(truth, prediction, steps_per_s, label_names, r2, history, title, max_seconds)
    from matplotlib import pyplot as plt   # after draw_report chose the Agg backend

    figure.savefig(path, dpi=90)
    plt.close(figure)
