"""Train / validation / test splits of one recording, without leakage.

A split is a list of :class:`Segment` (sample ranges of the recording, each
tagged "train", "validation" or "test").  Feature windows are later computed
inside each segment on its own, so no window of one split can contain a sample
of another, and non-causal label smoothing cannot reach across a boundary.

Two methods:

- ``"repetition"`` (recordings with repetition events, e.g. NinaPro): every
  sample belongs to the repetition in progress; rest between repetitions
  belongs to the repetition it follows (the return to rest is part of the
  movement), rest before the first repetition to the first.  NinaPro's
  standard split tests on repetitions 2, 5 and 7; validation is one of the
  others (``validation_repetitions``); the rest is training.
- ``"time"``: contiguous blocks, training first, then validation
  (``validation_fraction``), then test (``test_fraction``, the end of the
  recording), with a guard gap of ``guard_samples`` (one feature window) at
  the start of each later block so no window straddles two blocks' edges.

``"auto"`` picks ``"repetition"`` where the recording has repetition events
and holds at least one of the test and one of the validation repetitions
(and some left for training), else ``"time"`` (e.g. a short simulator
recording of three repetitions).
"""
import collections

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

SPLIT_NAMES = ("train", "validation", "test")
METHODS = ("auto", "repetition", "time")

DEFAULT_SPLIT = {
    "method": "auto",
    "test_repetitions": [2, 5, 7],
    "validation_repetitions": [4],
    "test_fraction": 0.2,
    "validation_fraction": 0.1,
}

Segment = collections.namedtuple("Segment", ["start", "stop", "split"])
Segment.__doc__ = "Samples [start, stop) of a recording that belong to split 'train', 'validation' or 'test'."


def check_split_settings(settings):
    """Return a complete, validated copy of ``settings`` (missing keys from DEFAULT_SPLIT)."""
    unknown = sorted(set(settings) - set(DEFAULT_SPLIT))
    if unknown:
        checks.check_option("split setting", unknown[0], sorted(DEFAULT_SPLIT))
    merged = dict(DEFAULT_SPLIT)
    merged.update(settings)
    checks.check_option("split method", merged["method"], METHODS)
    for key in ("test_repetitions", "validation_repetitions"):
        values = merged[key]
        if not isinstance(values, list) or not values:
            raise UsageError("split {} must be a non-empty list of repetition numbers, but got {!r}".format(
                key, values))
        merged[key] = [checks.check_int("split " + key, v, minimum=1) for v in values]
    both = sorted(set(merged["test_repetitions"]) & set(merged["validation_repetitions"]))
    if both:
        raise UsageError("repetitions {} are in both test_repetitions and validation_repetitions".format(both))
    test = checks.check_number("split test_fraction", merged["test_fraction"], minimum=0.0,
                               exclusive_minimum=True, maximum=0.9)
    validation = checks.check_number("split validation_fraction", merged["validation_fraction"], minimum=0.0,
                                     exclusive_minimum=True, maximum=0.9)
    if test + validation >= 0.9:
        raise UsageError("split test_fraction + validation_fraction must leave at least 10 % for training, "
                         "but they add up to {}".format(test + validation))
    return merged


def repetition_runs(n_samples, events):
    """Runs ``(start, stop, repetition)`` covering [0, n_samples), rest folded into repetitions.

    ``events`` are objects with ``sample``, ``kind`` and ``value``; only kind
    "repetition" counts.  Returns an empty list where no event has a non-zero value."""
    changes = sorted((int(e.sample), int(e.value)) for e in events if e.kind == "repetition")
    if not any(value > 0 for _, value in changes):
        return []
    # Piecewise-constant repetition number; 0 before the first event.
    runs = []
    current_start, current_value = 0, 0
    for sample, value in changes:
        sample = min(max(sample, 0), n_samples)
        if value == current_value:
            continue
        if sample > current_start:
            runs.append([current_start, sample, current_value])
        current_start, current_value = sample, value
    if n_samples > current_start:
        runs.append([current_start, n_samples, current_value])
    # Rest (0) belongs to the repetition before it, or the first one when at the start.
    first = next(run[2] for run in runs if run[2] > 0)
    previous = first
    for run in runs:
        if run[2] == 0:
            run[2] = previous
        else:
            previous = run[2]
    return _merge([tuple(run) for run in runs])


def _merge(runs):
    """Join neighbouring runs with the same tag."""
    merged = []
    for start, stop, tag in runs:
        if merged and merged[-1][2] == tag and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop, tag)
        else:
            merged.append((start, stop, tag))
    return merged


def plan_split(n_samples, events, settings, guard_samples, source="recording"):
    """Split one recording.

    Parameters
    ----------
    n_samples : int, samples in the recording.
    events : list of objects with ``sample``, ``kind``, ``value``.
    settings : dict, validated by :func:`check_split_settings`.
    guard_samples : int, gap left before each later block of a time split (one window).
    source : str, names the recording in error messages.

    Returns
    -------
    (method, segments) : the method used ("repetition" or "time") and a list of
    :class:`Segment` in time order.
    """
    method = settings["method"]
    runs = repetition_runs(n_samples, events)
    if method == "auto":
        method = "repetition" if _repetitions_suffice(runs, settings) else "time"
    if method == "repetition":
        if not runs:
            raise UsageError("{}: split method 'repetition' needs repetition events, and it has none; "
                             "use method 'time'".format(source))
        return method, _split_by_repetition(runs, settings, source)
    return method, _split_by_time(n_samples, settings, guard_samples, source)


def _repetitions_suffice(runs, settings):
    present = {run[2] for run in runs}
    test, validation = set(settings["test_repetitions"]), set(settings["validation_repetitions"])
    return bool(present & test) and bool(present & validation) and bool(present - test - validation)


def _split_by_repetition(runs, settings, source):
    test = set(settings["test_repetitions"])
    validation = set(settings["validation_repetitions"])
    present = sorted({run[2] for run in runs})
    for name, wanted in (("test", test), ("validation", validation)):
        if not wanted & set(present):
            raise UsageError("{}: none of the {} repetitions {} is in the recording (it has repetitions {})".format(
                source, name, sorted(wanted), present))
    tagged = []
    for start, stop, repetition in runs:
        split = "test" if repetition in test else "validation" if repetition in validation else "train"
        tagged.append((start, stop, split))
    segments = [Segment(*run) for run in _merge(tagged)]
    if not any(s.split == "train" for s in segments):
        raise UsageError("{}: no repetition is left for training (repetitions {})".format(source, present))
    return segments


def _split_by_time(n_samples, settings, guard_samples, source):
    guard = int(guard_samples)
    train_stop = int(round(n_samples * (1.0 - settings["test_fraction"] - settings["validation_fraction"])))
    validation_stop = int(round(n_samples * (1.0 - settings["test_fraction"])))
    segments = [Segment(0, train_stop, "train"),
                Segment(train_stop + guard, validation_stop, "validation"),
                Segment(validation_stop + guard, n_samples, "test")]
    for segment in segments:
        if segment.stop - segment.start <= guard:
            raise UsageError("{}: recording too short ({} samples) for a time split with a {}-sample guard".format(
                source, n_samples, guard))
    return segments


def describe(method, segments, signal_rate):
    """Plain-dict summary of a split for config.json: method and [start, stop] per split, in samples."""
    if signal_rate <= 0:
        raise ConfigError("signal rate must be positive")
    out = {"method": method}
    for name in SPLIT_NAMES:
        ranges = [[int(s.start), int(s.stop)] for s in segments if s.split == name]
        out[name] = {"ranges": ranges, "seconds": sum(b - a for a, b in ranges) / float(signal_rate)}
    return out
