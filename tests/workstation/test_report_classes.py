"""report.png's movement-class panel (train/report.py): the class head's test confusion matrix, row-normalised,
with the class names and the balanced accuracy, drawn by the one confusion drawing the confusion PNGs use too.

The last two tests need the trainer to hand its test confusion to the report (train/trainer.py) and
classes.plot_confusion to draw through report.draw_confusion (train/classes.py)."""
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib import pyplot as plt  # noqa: E402

from neurohand.train import classes, report  # noqa: E402

# Rest recall 6/6, "fist" 1/2, "point" never occurs (left out of the balanced accuracy): 0.75; accuracy 7/8.
HAND = [[6, 0, 0], [1, 1, 0], [0, 0, 0]]
NAMES = ["rest", "fist", "point"]
HISTORY = {"epoch": [1, 2], "train_loss": [0.1, 0.05], "validation_loss": [0.09, 0.06], "validation_r2": [0.1, 0.4]}


def draw(scores):
    truth = np.random.default_rng(0).uniform(size=(200, 3))
    return report.draw_report(truth, truth, 50.0, ["a", "b", "c"], [0.5, 0.6, 0.7], HISTORY, title="t",
                              classes=scores)


def test_the_class_panel_is_the_row_normalised_confusion_with_names_and_balanced_accuracy():
    figure = draw({"confusion": HAND, "class_names": NAMES, "balanced_accuracy": 0.1})
    try:
        panels = [axis for axis in figure.get_axes() if axis.images]
        assert len(panels) == 1
        panel = panels[0]
        np.testing.assert_allclose(panel.images[0].get_array(), [[1, 0, 0], [0.5, 0.5, 0], [0, 0, 0]])
        assert [t.get_text() for t in panel.get_xticklabels()] == NAMES
        assert [t.get_text() for t in panel.get_yticklabels()] == ["rest (6)", "fist (2)", "point (0)"]
        # Measured from the matrix drawn (train/classes.py), not taken from the caller's figures.
        assert "balanced accuracy 0.750 (accuracy 0.875)" in panel.get_title()
    finally:
        plt.close(figure)


def test_no_class_head_no_panel():
    for scores in (None, {}):
        figure = draw(scores)
        try:
            assert not any(axis.images for axis in figure.get_axes())
        finally:
            plt.close(figure)


def spy_on_the_drawing(monkeypatch):
    drawn = []
    real = report.draw_confusion

    def spy(axis, confusion, names, **keywords):
        drawn.append({"confusion": np.asarray(confusion).tolist(), "names": list(names),
                      "title": keywords.get("title", "")})
        return real(axis, confusion, names, **keywords)
    monkeypatch.setattr(report, "draw_confusion", spy)
    return drawn


def test_the_confusion_png_is_drawn_by_the_report_s_drawing(tmp_path, monkeypatch):
    drawn = spy_on_the_drawing(monkeypatch)
    path = str(tmp_path / "confusion.png")
    classes.plot_confusion(path, HAND, NAMES, title="LDA, test")
    assert drawn == [{"confusion": HAND, "names": NAMES, "title": "LDA, test"}]
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_draws_the_test_confusion_it_writes_to_metrics(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from neurohand.train import trainer
    from test_train_data import TINY_CONFIG, make_recording

    drawn = spy_on_the_drawing(monkeypatch)
    recording = str(make_recording(tmp_path / "moves.nhr", seconds=60.0, seed=5, movements=True))
    run_dir = str(tmp_path / "run")
    summary = trainer.train_run([recording], run_dir, TINY_CONFIG, seed=1, progress=False)
    test = summary["scores"]["test"]["classes"]
    assert np.sum(test["confusion"]) == test["n_steps"] > 0
    assert classes.balanced_accuracy(test["confusion"]) == pytest.approx(test["balanced_accuracy"])
    assert [(d["confusion"], d["names"]) for d in drawn] == [(test["confusion"], summary["class_names"])]
    assert "balanced accuracy {:.3f}".format(test["balanced_accuracy"]) in drawn[0]["title"]
    assert os.path.getsize(os.path.join(run_dir, "report.png")) > 0
