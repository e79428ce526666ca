"""Movement classes (train/classes.py) on hand-made cases with known answers, the LDA, and report.png's layout
(with and without a class head's confusion panel)."""
import collections

import numpy as np
import pytest

from neurohand.train import classes

Event = collections.namedtuple("Event", ["sample", "kind", "value"])


def test_step_class_is_the_movement_at_the_window_s_last_sample():
    events = [Event(0, "movement", 0), Event(0, "repetition", 1), Event(100, "movement", 3),
              Event(180, "repetition", 0), Event(250, "movement", 0)]
    # A window ending before sample e ends at sample e - 1 (the labels' causal rule).
    ends = [50, 100, 101, 250, 251, 400]
    np.testing.assert_array_equal(classes.step_classes(events, ends), [0, 0, 3, 3, 0, 0])
    # Tuples as the importer writes them, and no event at 0: rest before the first.
    np.testing.assert_array_equal(classes.movement_at([(10, "movement", 7)], [5, 10, 11]), [0, 7, 7])
    np.testing.assert_array_equal(classes.movement_at(events, [179, 180], kind="repetition"), [1, 0])


def test_accuracy_balanced_accuracy_and_confusion_by_hand():
    truth = [0, 0, 0, 0, 0, 0, 1, 1]
    decided = [0, 0, 0, 0, 0, 0, 0, 1]
    confusion = classes.confusion_matrix(truth, decided, [0, 1, 2])
    np.testing.assert_array_equal(confusion, [[6, 0, 0], [1, 1, 0], [0, 0, 0]])
    assert classes.accuracy(confusion) == pytest.approx(7 / 8)
    # Rest recall 1, class 1 recall 0.5; class 2 never occurs, so it does not count.
    assert classes.balanced_accuracy(confusion) == pytest.approx(0.75)
    np.testing.assert_allclose(classes.precision(confusion)[:2], [6 / 7, 1.0])
    assert np.isnan(classes.recall(confusion)[2])
    with pytest.raises(ValueError, match=r"\[5\]"):
        classes.confusion_matrix([0, 5], [0, 0], [0, 1])


def test_majority_breaks_ties_toward_the_lowest_class():
    assert classes.majority([2, 1]) == 1
    assert classes.majority([3, 0, 3, 0]) == 0
    assert classes.majority([4, 4, 1]) == 4


def test_per_trial_decision_after_the_delay():
    # 10 steps per second, delay 0.3 s = 3 steps.
    truth = [0] * 5 + [2] * 8 + [0] * 5
    decided = [0] * 5 + [0, 0, 0, 0, 2, 2, 2, 1] + [0, 0, 3, 3, 0]
    decisions = classes.trial_decisions(truth, decided, 10.0, delay_s=0.3)
    # The movement: after the delay [0, 2, 2, 2, 1] -> 2; counted from the onset 0 would win 4 to 3.
    assert decisions == [(0, 5, 0, 0), (5, 13, 2, 2), (13, 18, 0, 0)]
    assert classes.trial_decisions(truth, decided, 10.0, delay_s=0.0)[1][3] == 0
    # Rest after the movement: [3, 0] after its delay, a tie that goes to rest; a vote of 0.1 s sees the 3 only.
    assert classes.trial_decisions(truth, decided, 10.0, delay_s=0.3, vote_s=0.1)[2][3] == 3


def test_score_classes_counts_movement_and_rest_trials_and_undecided_ones():
    segments_truth = [np.array([0] * 5 + [2] * 8 + [0] * 5), np.array([0] * 4 + [1] * 2 + [0] * 4)]
    segments_decided = [np.array([0] * 5 + [0, 0, 0, 0, 2, 2, 2, 1] + [0] * 5), np.array([0] * 10)]
    result = classes.score_classes(segments_truth, segments_decided, 10.0, classes=[0, 1, 2], delay_s=0.3)
    # The second segment's movement lasts 0.2 s, shorter than the delay: it cannot be decided.
    assert result["trials"] == 1 and result["trial_accuracy"] == 1.0 and result["trials_undecided"] == 1
    assert result["rest_trials"] == 4 and result["rest_trial_accuracy"] == 1.0
    assert result["n_steps"] == 28 and result["class_names"] == ["rest", "m1", "m2"]
    assert result["confusion"] == [[18, 0, 0], [2, 0, 0], [4, 1, 3]]
    assert result["accuracy"] == pytest.approx(21 / 28)
    assert result["balanced_accuracy"] == pytest.approx((1.0 + 0.0 + 3 / 8) / 3)
    assert np.trace(np.array(result["trial_confusion"])) == 5


def gaussian_classes(seed, n_per_class, n_classes=4, n_features=5, spread=3.0):
    rng = np.random.default_rng(seed)
    means = spread * rng.normal(size=(n_classes, n_features))
    mixing = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features) + np.eye(n_features)
    covariance = mixing @ mixing.T
    x, y = [], []
    for c in range(n_classes):
        x.append(rng.multivariate_normal(means[c], covariance, size=n_per_class))
        y.append(np.full(n_per_class, c))
    order = rng.permutation(n_classes * n_per_class)
    return np.concatenate(x)[order], np.concatenate(y)[order], means, covariance


def test_lda_separates_gaussian_classes_as_the_bayes_rule_does():
    from scipy.stats import multivariate_normal

    x, y, means, covariance = gaussian_classes(0, 400)
    constant = np.ones((len(x), 1))    # ZC on a positive envelope: a feature that never changes
    features = np.hstack([x, constant])
    lda = classes.LDAClassifier(shrinkages=0.0).fit([(features[:1200], y[:1200])])
    decided = lda.predict(features[1200:])
    truth = y[1200:]
    # The optimal rule with the true means and covariance (equal priors), computed independently.
    bayes = np.argmax(np.stack([multivariate_normal(m, covariance).logpdf(x[1200:]) for m in means], axis=1), axis=1)
    assert np.mean(decided == truth) > 0.9
    assert np.mean(decided == bayes) > 0.97
    # The scores are the Gaussian log-densities with the fitted parameters, up to one constant per step.
    fitted = lda.means_[:, :5]
    pooled = np.cov((x[:1200] - fitted[y[:1200]]).T, bias=True)
    logpdf = np.stack([multivariate_normal(m, pooled).logpdf(x[1200:1210]) for m in fitted], axis=1) \
        + np.log(lda.priors_)
    gap = lda.decision_function(features[1200:1210]) - logpdf
    np.testing.assert_allclose(gap - gap[:, :1], 0.0, atol=1e-8)


def test_lda_shrinkage_is_chosen_on_validation():
    # 60 training steps of 40 features, spherical classes: the unshrunk covariance is poor, shrinkage helps.
    rng = np.random.default_rng(1)
    means = 0.3 * rng.normal(size=(3, 40))

    def draw(n):
        y = rng.integers(0, 3, n)
        return means[y] + rng.normal(size=(n, 40)), y
    lda = classes.LDAClassifier().fit([draw(60)], [draw(600)])
    scores = lda.validation_balanced_accuracy_
    assert sorted(scores) == sorted(classes.DEFAULT_SHRINKAGES)
    assert scores[lda.shrinkage_] == max(scores.values())
    assert lda.shrinkage_ > 0 and scores[lda.shrinkage_] > scores[0.0] + 0.05


def test_lda_baseline_scores_test_segments_and_the_confusion_png(tmp_path):
    x, y, _, _ = gaussian_classes(2, 300, n_classes=3)
    segments = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 900, 100)]
    decoders = {}
    result = classes.lda_baseline(segments[:6], segments[6:7], segments[7:], 50.0, decoders=decoders)
    assert result["balanced_accuracy"] > 0.8 and result["deterministic"] is True
    assert result["classes"] == [0, 1, 2] and "shrinkage" in result and "lda" in decoders
    path = tmp_path / "confusion.png"
    classes.plot_confusion(str(path), result["confusion"], result["class_names"], title="LDA, test")
    with open(str(path), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_bench_decoding_keeps_class_scores_apart_from_r2():
    from neurohand.deploy.bench import decoding

    def r2_scores(value):
        return {"mean_r2": value, "mean_pearson_r": value, "mean_rmse": 0.1, "r2": [value]}
    lda = {"accuracy": 0.8, "balanced_accuracy": 0.6, "trial_accuracy": 0.9, "rest_trial_accuracy": 1.0,
           "delay_s": 0.3, "confusion": [[1]]}
    evaluation = dict(r2_scores(0.7), n_steps=10, label_names=["a"], decode={"us_per_step": 1.0},
                      split={"test_seconds": 1.0, "method": "repetition"},
                      baselines={"wiener": r2_scores(0.3), "tcn": dict(r2_scores(0.5), seed=2), "lda": lda})
    train = {"scores": {}, "epochs_run": 1, "best_epoch": 1, "stopped": "epochs", "train_seconds": 1.0,
             "device": "cpu"}
    entry = decoding.summarise(train, evaluation, 2.0, "1 epoch")
    assert sorted(entry["scores"]) == ["rnn", "tcn", "wiener"] and entry["scores"]["tcn"]["seed"] == 2
    assert entry["classes"] == {"lda": {k: lda[k] for k in decoding.CLASS_KEYS}}


# --- report.png (train/report.py) --------------------------------------------------------

def _layout_problems(figure):
    """Text that overlaps a panel it does not belong to, and the share of the page the panels cover."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    axes = [a for a in figure.get_axes() if a.get_visible()]
    boxes = [a.get_window_extent(renderer) for a in axes]
    problems = []
    texts = [(figure._suptitle, None)] if figure._suptitle is not None else []
    for sub in getattr(figure, "subfigs", []):
        if sub._suptitle is not None:
            texts.append((sub._suptitle, None))
    for owner in axes:
        labels = [owner.title, owner.xaxis.label, owner.yaxis.label]
        labels += [t for t in owner.get_xticklabels() + owner.get_yticklabels() if t.get_text()]
        legend = owner.get_legend()
        texts.extend((t, owner) for t in labels if t.get_visible() and t.get_text())
        if legend is not None:
            texts.append((legend, owner))
    for text, owner in texts:
        extent = text.get_window_extent(renderer)
        for axis, box in zip(axes, boxes):
            # A twin axis shares its owner's box; the owner's own text may sit inside it (a legend).
            if axis is owner or (owner is not None and box.bounds == owner.get_window_extent(renderer).bounds):
                continue
            if extent.overlaps(box):
                problems.append("{!r} overlaps a panel".format(getattr(text, "get_text", lambda: "legend")()))
    # The page title must also keep clear of the panels' own titles (the old layout wrote over one).
    for title, _ in texts[:1]:
        for axis in axes:
            if axis.title.get_text() and title.get_window_extent(renderer).overlaps(
                    axis.title.get_window_extent(renderer)):
                problems.append("the title overlaps {!r}".format(axis.title.get_text()))
    width, height = figure.canvas.get_width_height()
    covered = sum(b.width * b.height for b in {b.bounds: b for b in boxes}.values()) / float(width * height)
    return problems, covered


@pytest.mark.parametrize("n_outputs, n_classes", [(5, 0), (22, 0), (5, 9), (22, 13)])
def test_report_text_overlaps_no_panel_and_panels_fill_the_page(n_outputs, n_classes):
    from matplotlib import pyplot as plt
    from neurohand.train import report

    rng = np.random.default_rng(0)
    scores = None
    if n_classes:
        # NinaPro's 12 movements + rest, the simulator's 8 + rest: rest holds most of the steps.
        confusion = rng.integers(0, 30, size=(n_classes, n_classes)) + np.diag(rng.integers(100, 400, n_classes))
        confusion[0, 0] = 5000
        scores = {"confusion": confusion.tolist(),
                  "class_names": ["rest"] + ["movement_{}".format(k) for k in range(1, n_classes)]}
    truth = rng.uniform(size=(600, n_outputs))
    r2 = list(rng.uniform(0.2, 0.9, n_outputs))
    r2[1] = -40.0     # one output far below zero must not flatten the others
    history = {"epoch": [1, 2, 3], "train_loss": [0.1, 0.05, 0.04], "validation_loss": [0.09, 0.06, None],
               "validation_r2": [0.1, 0.4, None]}
    names = ["output_with_a_long_name_{}".format(k) for k in range(n_outputs)]
    figure = report.draw_report(truth, truth + 0.1, 50.0, names, r2, history, title="a title - test mean R2 0.5",
                                classes=scores)
    try:
        assert any(a.images for a in figure.get_axes()) == bool(n_classes)   # the confusion panel is there
        problems, covered = _layout_problems(figure)
    finally:
        plt.close(figure)
    assert problems == []
    assert covered > 0.45, covered   # the old layout: 0.34-0.36
