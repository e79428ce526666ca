"""Movement classes on the workstation: the LDA baseline, Hudgins' features and the confusion plot (numpy).

The class of each decoder step and the accuracy measures (per step and per
movement trial) live in decoder/classes.py, which the device's replay uses
too; they are re-exported here, so evaluate and replay score alike.

**LDA baseline.**  Linear discriminant analysis with one covariance shared by
all classes, shrunk toward a multiple of the identity (Ledoit-Wolf form
``(1 - s) S + s tr(S)/d I``), the shrinkage chosen on the validation split
by balanced accuracy; with ``s = 0`` and empirical priors it is the
classifier LibEMG's ``EMGClassifier("LDA")`` trains (scikit-learn's
``LinearDiscriminantAnalysis()``).  In the myoelectric literature LDA runs
on Hudgins' time-domain set (MAV, ZC, SSC, WL; Hudgins et al., IEEE Trans
Biomed Eng 40(1), 82-94, 1993).  On envelopes such as NinaPro DB1's (an RMS
output, positive throughout) ZC counts nothing and SSC counts ripples of the
envelope rather than of the EMG, so there the set reduces to MAV, WL and
envelope SSC; docs/training.md reports LDA on both that set and the RNN's
own features.
"""
import numpy as np

# The labels and the measures live in decoder/classes.py, so that ``neurohand replay`` scores a class
# head on the device exactly as ``evaluate`` does here; re-exported for the importers of this module.
from neurohand.decoder.classes import (
    DEFAULT_DELAY_S, REST, accuracy, balanced_accuracy, class_names, confusion_matrix, majority,
    movement_at, precision, recall, score_classes, step_classes, trial_decisions, trials)

__all__ = ["DEFAULT_DELAY_S", "REST", "accuracy", "balanced_accuracy", "class_names", "confusion_matrix",
           "majority", "movement_at", "precision", "recall", "score_classes", "step_classes",
           "trial_decisions", "trials", "DEFAULT_SHRINKAGES", "LDAClassifier", "lda_baseline",
           "HUDGINS_FEATURES", "hudgins_pipeline", "class_segments", "has_classes", "lda_baselines",
           "plot_confusion"]

#: Shrinkage candidates of the LDA, chosen on validation; 0 is the textbook (and LibEMG's) LDA.
DEFAULT_SHRINKAGES = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.6)


# --- LDA ----------------------------------------------------------------------------

class LDAClassifier(object):
    """Linear discriminant analysis, one shared covariance, shrinkage chosen on validation (numpy).

    Segments are ``(features, classes)`` pairs: (n_steps, n_features) and
    (n_steps,) int.  ``shrinkages`` are the candidates (a number fixes it);
    ``priors`` "empirical" (class frequencies in training, as scikit-learn and
    LibEMG) or "equal".  Decisions are per step, from that step's features only."""

    def __init__(self, shrinkages=DEFAULT_SHRINKAGES, priors="empirical"):
        self.shrinkages = tuple(float(s) for s in np.atleast_1d(shrinkages))
        if not self.shrinkages or min(self.shrinkages) < 0 or max(self.shrinkages) > 1:
            raise ValueError("shrinkages must lie in [0, 1]")
        if priors not in ("empirical", "equal"):
            raise ValueError("priors must be 'empirical' or 'equal', but got {!r}".format(priors))
        self.priors = priors

    def fit(self, train_segments, validation_segments=None):
        x = np.concatenate([np.asarray(f, dtype=np.float64) for f, _ in train_segments], axis=0)
        y = np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for _, c in train_segments])
        self.classes_ = np.unique(y)
        n_features = x.shape[1]
        self.means_ = np.array([x[y == c].mean(axis=0) for c in self.classes_])
        counts = np.array([np.count_nonzero(y == c) for c in self.classes_], dtype=np.float64)
        self.priors_ = counts / counts.sum() if self.priors == "empirical" else np.full(len(counts), 1.0 / len(counts))
        # Pooled within-class covariance (maximum likelihood, as scikit-learn's LDA).
        centred = x - self.means_[np.searchsorted(self.classes_, y)]
        covariance = centred.T @ centred / len(x)
        scale = np.trace(covariance) / n_features
        candidates = self.shrinkages if validation_segments else self.shrinkages[:1]
        best = None
        self.validation_balanced_accuracy_ = {}
        for shrinkage in candidates:
            self._set_covariance((1.0 - shrinkage) * covariance + shrinkage * scale * np.eye(n_features))
            score = np.nan
            if validation_segments:
                truth = np.concatenate([np.asarray(c, dtype=np.int64).reshape(-1) for _, c in validation_segments])
                decided = np.concatenate([self.predict(f) for f, _ in validation_segments])
                classes = np.union1d(self.classes_, truth)
                score = balanced_accuracy(confusion_matrix(truth, decided, classes))
            self.validation_balanced_accuracy_[shrinkage] = score
            if best is None or score > best[0]:
                best = (score, shrinkage, self.coef_, self.intercept_)
        _, self.shrinkage_, self.coef_, self.intercept_ = best
        return self

    def _set_covariance(self, covariance):
        # A pseudo-inverse: without shrinkage a constant feature (ZC on a positive envelope) makes S singular,
        # and scikit-learn's default (SVD) solver ignores such directions the same way.
        precision_matrix = np.linalg.pinv(covariance, hermitian=True)
        self.coef_ = self.means_ @ precision_matrix
        self.intercept_ = -0.5 * np.sum(self.coef_ * self.means_, axis=1) + np.log(self.priors_)

    def decision_function(self, features):
        """Linear scores per class, (n_steps, n_classes): the log-posterior up to a per-step constant."""
        return np.asarray(features, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict(self, features):
        """Decided class per step, int64 (n_steps,)."""
        return self.classes_[np.argmax(self.decision_function(features), axis=1)]

    def settings(self):
        return {"shrinkage": self.shrinkage_, "priors": self.priors}


def lda_baseline(train_segments, validation_segments, test_segments, steps_per_s, classes=None,
                 delay_s=DEFAULT_DELAY_S, settings=None, decoders=None):
    """Fit the LDA on ``(features, classes)`` segments and score it on the test segments.

    Returns :func:`score_classes`' dict plus the LDA's settings; ``decoders``
    (a dict), when given, receives the fitted classifier under "lda"."""
    lda = LDAClassifier(**(settings or {})).fit(train_segments, validation_segments)
    if decoders is not None:
        decoders["lda"] = lda
    truth = [np.asarray(c, dtype=np.int64) for _, c in test_segments]
    decided = [lda.predict(f) for f, _ in test_segments]
    if classes is None:
        classes = np.union1d(lda.classes_, np.concatenate(truth))
    result = score_classes(truth, decided, steps_per_s, classes, delay_s)
    result.update(lda.settings())
    # Closed form on a fixed split, like the Wiener and Kalman filters.
    result["deterministic"] = True
    return result


# --- features and segments ------------------------------------------------------------

#: Hudgins et al.'s time-domain set, LibEMG's "HTD" group, in its order.
HUDGINS_FEATURES = ("mav", "zc", "ssc", "wl")


def hudgins_pipeline(pipeline_settings, signal_rate, n_channels):
    """A FeaturePipeline with a run's windows (and filter) computing Hudgins' set instead of its features.

    pipeline_settings : the run's resolved ``settings["pipeline"]`` (config.json); window, stride, mode and
    filter are kept, the features become MAV, ZC, SSC, WL without log compression (as LibEMG computes them;
    the threshold is 0 in envelope mode, the run's ``threshold_uv`` in raw mode)."""
    from neurohand.decoder.pipeline import FeaturePipeline

    settings = dict(pipeline_settings)
    settings.update({"features": list(HUDGINS_FEATURES), "log": False})
    settings.pop("bandpower_bands_hz", None)
    return FeaturePipeline.design(signal_rate, n_channels, settings)


def class_segments(sequences, events):
    """``(features, classes)`` pairs of every split from train/dataset.py Sequences and the recording's events.

    sequences : dict split -> list of Sequence (one recording's)
    Returns dict split -> list of (features (n_steps, n_features), classes (n_steps,) int64)."""
    return {name: [(s.features, step_classes(events, s.ends)) for s in segments]
            for name, segments in sequences.items()}


def has_classes(segments):
    """Whether ``(features, classes)`` segments hold more than one class in training (movement events exist)."""
    return np.unique(np.concatenate([np.asarray(c).reshape(-1) for _, c in segments])).size > 1


def lda_baselines(recording, plan, sequences, pipeline_settings, steps_per_s, delay_s=DEFAULT_DELAY_S):
    """Both LDA baselines of a run on one recording, as ``evaluate`` reports them.

    recording : train/dataset.py RecordingData (its ``events`` give the classes)
    plan : (method, segments) of the recording's split
    sequences : dict split -> Sequences of the run's own (normalised) features
    pipeline_settings : the run's ``settings["pipeline"]``

    Returns {} where the training split holds one class only (no movement
    events), else {"lda": LDA on the run's features, "lda_td": LDA on Hudgins'
    set of the same windows}, each :func:`lda_baseline`'s dict plus ``features``."""
    from neurohand.train import dataset

    own = class_segments(sequences, recording.events)
    if not has_classes(own["train"]):
        return {}
    pipeline = hudgins_pipeline(pipeline_settings, recording.signal_rate, len(recording.channel_names))
    td_sequences, _ = dataset.build_sequences(pipeline, [recording], [plan])
    td = class_segments(td_sequences, recording.events)
    result = {}
    for name, segments, what in (("lda", own, "the run's features"),
                                 ("lda_td", td, "Hudgins' time-domain set (MAV, ZC, SSC, WL) of the same windows")):
        result[name] = lda_baseline(segments["train"], segments["validation"], segments["test"], steps_per_s,
                                    delay_s=delay_s)
        result[name]["features"] = what
    return result


# --- plot ---------------------------------------------------------------------------

def plot_confusion(path, confusion, names, title="", normalise=True):
    """Write the confusion matrix as a PNG (matplotlib, Agg): rows true, columns decided.

    Drawn by train/report.py draw_confusion, as report.png's class panel is.
    normalise : colour and print each row as shares of its true class (recall
    on the diagonal), so rest's many steps do not wash out the movements; the
    row's step count is printed beside its name."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt
    from neurohand.train.report import draw_confusion

    size = max(4.5, 0.48 * len(names) + 2.0)
    figure, axis = plt.subplots(figsize=(size + 0.8, size))
    draw_confusion(axis, confusion, names, title=title, normalise=normalise)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
