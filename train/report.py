"""report.png: how well a trained decoder does, at a glance (matplotlib, Agg backend, no display).

Two bands, top to bottom:
- predicted against true trajectories per output over the first
  ``max_seconds`` of the test split (one small panel per output, up to
  :data:`MAX_COLUMNS` to a row, no empty cells but the last row's);
- side by side: R² per output on the test split as bars, the learning
  curves (training and validation loss, validation mean R², per epoch) and,
  for a run with a movement-class head, its test confusion matrix.

:func:`draw_confusion` draws a confusion matrix on any axis; it is the one
drawing of it, for this report and for the stand-alone confusion PNGs
(train/classes.py ``plot_confusion``: ``evaluate --confusion-png``, the demo,
``run --confusion-png``).

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


def draw_confusion(axis, confusion, names, title="", normalise=True, label_size=None):
    """Draw ``confusion`` (rows true, columns decided) on ``axis`` with a colour bar beside it.

    normalise : colour and print each row as shares of its true class (recall
    on the diagonal), so rest's many steps do not wash out the movements; the
    row's step count is printed beside its name.
    label_size : font size of the axis and colour bar labels (None: matplotlib's default)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n = confusion.shape[0]
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        shown = confusion / np.where(support > 0, support, 1.0)[:, None] if normalise else confusion
    image = axis.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else max(1.0, shown.max()))
    for i in range(n):
        for j in range(n):
            value = shown[i, j]
            if value == 0:
                continue
            text = ("{:.0f}".format(100 * value) if 100 * value >= 0.5 else "<1") if normalise \
                else "{:.0f}".format(value)
            dark = value > (0.6 if normalise else 0.6 * shown.max())
            axis.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    axis.set_xticks(np.arange(n))
    axis.set_yticks(np.arange(n))
    axis.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axis.set_yticklabels(["{} ({:d})".format(name, int(count)) for name, count in zip(names, support)], fontsize=8)
    axis.set_xlabel("decided class", fontsize=label_size)
    axis.set_ylabel("true class (steps)", fontsize=label_size)
    colour_bar = axis.get_figure().colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    colour_bar.set_label("share of the true class's steps, %" if normalise else "steps", fontsize=label_size)
    if label_size is not None:
        colour_bar.ax.tick_params(labelsize=label_size - 1)
    if normalise:
        colour_bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0])
        colour_bar.set_ticklabels(["0", "25", "50", "75", "100"])
    if title:
        axis.set_title(title, fontsize=9)
    return colour_bar


def class_panel_title(confusion):
    """The confusion panel's title: balanced accuracy and accuracy as train/classes.py measures them."""
    from neurohand.train import classes

    return "movement classes, test: balanced accuracy {:.3f} (accuracy {:.3f})".format(
        classes.balanced_accuracy(confusion), classes.accuracy(confusion))


def draw_report(truth, prediction, steps_per_s, label_names, r2, history, title="", max_seconds=60.0,
                classes=None):
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
    confusion = None if not classes else np.asarray(classes["confusion"], dtype=np.float64)
    # The matrix wants square cells with readable numbers: the bottom band grows with the classes, and
    # the page widens by the matrix's width, so the other panels keep theirs.
    band = 3.3 if confusion is None else max(3.3, 0.32 * len(confusion) + 1.9)
    matrix_width = 0.0 if confusion is None else band + 1.2
    figure = plt.figure(figsize=(max(10.0, 2.6 * columns) + matrix_width, 1.55 * rows + band + 0.3),
                        layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.55 * rows, band])

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

    widths = [max(3.0, 0.25 * n_outputs), 3.0]
    if confusion is None:
        bars, curves = bottom.subplots(1, 2, width_ratios=widths)
    else:
        # Bars and curves share the page's former width; the matrix takes the width added for it.
        scale = max(10.0, 2.6 * columns) / sum(widths)
        bars, curves, matrix = bottom.subplots(1, 3, width_ratios=[w * scale for w in widths] + [matrix_width])
        draw_confusion(matrix, confusion, list(classes["class_names"]), title=class_panel_title(confusion),
                       label_size=8)
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


def write_report(path, truth, prediction, steps_per_s, label_names, r2, history, title="", max_seconds=60.0,
                 classes=None):
    """Draw the report into ``path`` (PNG).

    truth, prediction : ndarray (n_steps, n_outputs), test split, consecutive segments joined
    steps_per_s : float, decoder steps per second (for the time axis)
    label_names : list of str, one per output
    r2 : list of float (nan or None allowed), per output
    history : dict of lists with epoch, train_loss, validation_loss, validation_r2
    classes : None, or a class head's test scores with "confusion" (steps, rows true, columns decided)
              and "class_names": adds the confusion panel
    """
    figure = draw_report(truth, prediction, steps_per_s, label_names, r2, history, title, max_seconds, classes)
    from matplotlib import pyplot as plt   # after draw_report chose the Agg backend

    figure.savefig(path, dpi=90)
    plt.close(figure)
