"""Movement classes on the device: the class of each decoder step, the usual accuracy measures.

Pure numpy, no torch: ``neurohand replay`` scores a bundle's class head with
these on the device, and ``neurohand evaluate`` (train/classes.py, which
re-exports them) scores a run the same way, so the two figures compare.

**Classes.**  A recording's ``movement`` events (NinaPro: ``restimulus``, 0 =
rest, 1..12 the movements of exercise 1; train/importers.py) give the
movement in force at every sample.  A decoder step's class is the movement in
force at its window's last sample, the causal rule of the labels
(train/dataset.py): for a window ending before sample ``e``, the value at
sample ``e - 1``.  Rest (0) is a class like the others.

**Per-step measures** (Atzori et al., Sci Data 1, 140053, 2014, score NinaPro
classifiers per window): accuracy, balanced accuracy (the mean over the true
classes of each class's recall, so rest, about half of the steps, weighs as
much as one movement), per-class recall and precision, and the confusion
matrix (rows: true class, columns: decided class, counts of steps).

**Per-trial measure** ("the decided class of a movement").  A *trial* is a
maximal run of steps of one true class within one segment.  The decision for
it is the majority vote (Englehart & Hudgins, IEEE Trans Biomed Eng 50(7),
848-854, 2003) over the decided classes of its steps from ``delay_s`` after
its onset to its end (or to ``delay_s + vote_s``); a tie goes to the lowest
class id, so to rest where rest is among the tied.  The delay, 0.3 s by
default, is the controller delay Englehart and Hudgins keep within: a decision
the user waits for no longer than that, and which leaves out the onset where
the muscles are still changing state.  A trial shorter than the delay cannot
be decided and is counted apart (``trials_undecided``).  ``trial_accuracy``
is over the movement trials (rest excluded), ``rest_trial_accuracy`` over the
rest trials.
"""
import numpy as np

#: Decision delay of the per-trial measure (see the module docstring).
DEFAULT_DELAY_S = 0.3
REST = 0


# --- labels -------------------------------------------------------------------------

def movement_at(events, samples, kind="movement"):
    """Value of the ``kind`` events in force at each sample index, int64 array like ``samples``.

    events : objects with ``sample``, ``kind`` and ``value`` (recording events),
        or ``(sample, kind, value)`` tuples; before the first event the value is 0 (rest).
    samples : int array, sample indices on the recording's axis."""
    changes = sorted((int(_field(e, "sample", 0)), int(_field(e, "value", 2)))
                     for e in events if _field(e, "kind", 1) == kind)
    samples = np.asarray(samples, dtype=np.int64)
    if not changes:
        return np.zeros(samples.shape, dtype=np.int64)
    at = np.array([s for s, _ in changes], dtype=np.int64)
    values = np.array([v for _, v in changes], dtype=np.int64)
    # Several events at one sample: the last one listed wins, as a stream of changes reads.
    index = np.searchsorted(at, samples, side="right") - 1
    return np.where(index >= 0, values[np.maximum(index, 0)], REST)


def _field(event, name, position):
    return getattr(event, name) if hasattr(event, name) else event[position]


def has_movement(events, kind="movement"):
    """Whether ``events`` hold any ``kind`` event (a recording that can score a class head)."""
    return any(_field(e, "kind", 1) == kind for e in events)


def step_classes(events, ends, kind="movement"):
    """Class of each decoder step: the movement in force at its window's last sample.

    ends : int array (n_steps,), sample index after each window's last sample
    (``Sequence.ends``, absolute on the recording's axis).  Returns int64 (n_steps,)."""
    return movement_at(events, np.asarray(ends, dtype=np.int64) - 1, kind)


def class_names(classes):
    """Display names: "rest" for 0, "m<k>" for movement k."""
    return ["rest" if int(c) == REST else "m{}".format(int(c)) for c in classes]


# --- per-step measures --------------------------------------------------------------

def confusion_matrix(truth, decided, classes):
    """Counts, int64 (n_classes, n_classes): row = true class, column = decided class.

    A decided class outside ``classes`` raises ValueError (it would silently vanish)."""
    truth = np.asarray(truth, dtype=np.int64).reshape(-1)
    decided = np.asarray(decided, dtype=np.int64).reshape(-1)
    classes = np.asarray(classes, dtype=np.int64)
    if truth.shape != decided.shape:
        raise ValueError("truth {} and decided {} differ in length".format(truth.shape, decided.shape))
    unknown = np.setdiff1d(np.union1d(truth, decided), classes)
    if unknown.size:
        raise ValueError("classes {} are not among {}".format(unknown.tolist(), classes.tolist()))
    order = np.argsort(classes, kind="stable")
    rows = order[np.searchsorted(classes, truth, sorter=order)]
    columns = order[np.searchsorted(classes, decided, sorter=order)]
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (rows, columns), 1)
    return matrix


def accuracy(confusion):
    """Share of steps decided right (nan with no step)."""
    confusion = np.asarray(confusion)
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def recall(confusion):
    """Per true class: share of its steps decided right; nan for a class with no step."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.where(support > 0, support, 1.0), np.nan)


def precision(confusion):
    """Per decided class: share of the steps decided as it that truly are it; nan where never decided."""
    confusion = np.asarray(confusion, dtype=np.float64)
    decided = confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(decided > 0, np.diag(confusion) / np.where(decided > 0, decided, 1.0), np.nan)


def balanced_accuracy(confusion):
    """Mean recall over the classes that occur in the truth (scikit-learn's balanced_accuracy_score)."""
    values = recall(confusion)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


# --- per-trial measure --------------------------------------------------------------

def trials(truth):
    """Maximal runs of one class in one segment's step classes: list of (start, stop, class)."""
    truth = np.asarray(truth, dtype=np.int64).reshape(-1)
    if truth.size == 0:
        return []
    cuts = np.concatenate([[0], np.flatnonzero(truth[1:] != truth[:-1]) + 1, [truth.size]])
    return [(int(a), int(b), int(truth[a])) for a, b in zip(cuts[:-1], cuts[1:])]


def majority(decided):
    """The most frequent class in ``decided``; a tie goes to the lowest class id."""
    values, counts = np.unique(np.asarray(decided, dtype=np.int64), return_counts=True)
    return int(values[np.argmax(counts)])


def trial_decisions(truth, decided, steps_per_s, delay_s=DEFAULT_DELAY_S, vote_s=None):
    """The decision for every trial of one segment.

    truth, decided : int arrays (n_steps,), true and decided class per step
    steps_per_s : decoder steps per second
    delay_s : the vote starts this long after the trial's onset
    vote_s : the vote covers this long (None: to the trial's end)

    Returns a list of (start, stop, true class, decided class or None where
    the trial is shorter than the delay)."""
    decided = np.asarray(decided, dtype=np.int64).reshape(-1)
    delay = int(round(delay_s * steps_per_s))
    span = None if vote_s is None else max(1, int(round(vote_s * steps_per_s)))
    out = []
    for start, stop, cls in trials(truth):
        first = start + delay
        last = stop if span is None else min(stop, first + span)
        out.append((start, stop, cls, majority(decided[first:last]) if first < last else None))
    return out


def score_classes(truth_segments, decided_segments, steps_per_s, classes=None, delay_s=DEFAULT_DELAY_S,
                  vote_s=None):
    """Every measure of decided classes against the true ones, as a JSON-ready dict.

    truth_segments, decided_segments : lists (one per segment) of int arrays (n_steps,)
    classes : the class ids in report order (default: every id in the truth and the decisions)

    Keys: classes, class_names, accuracy, balanced_accuracy, recall and
    precision (per class), support (steps per true class), confusion (list of
    rows, true x decided), n_steps; trial_accuracy (movement trials),
    rest_trial_accuracy, trials (decided movement trials), trials_undecided,
    trial_confusion (movement and rest trials, true x decided), delay_s, vote_s."""
    if len(truth_segments) != len(decided_segments):
        raise ValueError("{} truth segments but {} decided".format(len(truth_segments), len(decided_segments)))
    truth = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in truth_segments])
    decided = np.concatenate([np.asarray(d, dtype=np.int64).reshape(-1) for d in decided_segments])
    if classes is None:
        classes = np.union1d(truth, decided)
    classes = np.asarray(classes, dtype=np.int64)
    confusion = confusion_matrix(truth, decided, classes)
    decisions = []
    for t, d in zip(truth_segments, decided_segments):
        if len(t) != len(d):
            raise ValueError("a segment has {} true and {} decided steps".format(len(t), len(d)))
        decisions.extend(trial_decisions(t, d, steps_per_s, delay_s, vote_s))
    decided_trials = [(cls, got) for _, _, cls, got in decisions if got is not None]
    moves = [(cls, got) for cls, got in decided_trials if cls != REST]
    rests = [(cls, got) for cls, got in decided_trials if cls == REST]
    trial_confusion = confusion_matrix([c for c, _ in decided_trials], [g for _, g in decided_trials], classes) \
        if decided_trials else np.zeros((len(classes), len(classes)), dtype=np.int64)
    return {
        "classes": classes.tolist(), "class_names": class_names(classes),
        "accuracy": accuracy(confusion), "balanced_accuracy": balanced_accuracy(confusion),
        "recall": recall(confusion).tolist(), "precision": precision(confusion).tolist(),
        "support": confusion.sum(axis=1).tolist(), "confusion": confusion.tolist(), "n_steps": int(truth.size),
        "trial_accuracy": _share(moves), "rest_trial_accuracy": _share(rests), "trials": len(moves),
        "rest_trials": len(rests), "trials_undecided": sum(1 for d in decisions if d[3] is None),
        "trial_confusion": trial_confusion.tolist(), "delay_s": float(delay_s),
        "vote_s": None if vote_s is None else float(vote_s),
    }


def _share(pairs):
    return float(np.mean([cls == got for cls, got in pairs])) if pairs else float("nan")
