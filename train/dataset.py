"""Recordings -> feature sequences with causally aligned labels, per split.

Stages::

    recording (signals µV, label stream, events)
      -> split into Segments (train/splits.py)
      -> per segment: FeaturePipeline.transform -> features (n_windows, n_features), ends
      -> labels sampled at each window's end time  (n_windows, n_outputs)
      -> normalisation fitted on training features, label scaling fitted on training labels
      -> Sequence(features, labels, ...) per segment and split

Each segment is transformed on its own, starting with the filter at rest, the
way ``neurohand evaluate`` streams it; so a window never holds samples of two
splits and the training features are exactly what the stream produces.

Label alignment is causal: a window ending at sample ``e`` (exclusive) ends
at time ``(e - 1) / signal_rate``; its label is the label stream's latest row
at or before that time, ``floor(t * label_rate)``.  For a label stream at the
signal rate that is row ``e - 1``.
"""
import collections
import warnings

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError
from neurohand.train import splits

Sequence = collections.namedtuple("Sequence", ["features", "labels", "ends", "recording", "split"])
Sequence.__doc__ = """Consecutive feature windows of one segment.

features : float32 (n_windows, n_features), normalised
labels : float32 (n_windows, n_outputs), scaled to the model's 0..1 range
ends : int64 (n_windows,), sample index after each window's last sample (on the recording's axis)
recording : int, index into the list of recordings
split : "train", "validation" or "test"
"""

# Label stream picked when the config names none, in this order of preference.
PREFERRED_STREAMS = ("fingers", "glove")
SCALINGS = ("auto", "minmax", "none")


class RecordingData(object):
    """What training needs of one recording, loaded into memory.

    Attributes: path, signal_rate (Hz), channel_names, signals (n_samples, n_channels)
    float64 µV, labels (LabelStream), events (list), metadata (dict)."""

    def __init__(self, path, signal_rate, channel_names, signals, labels, events, metadata):
        self.path = path
        self.signal_rate = signal_rate
        self.channel_names = channel_names
        self.signals = signals
        self.labels = labels
        self.events = events
        self.metadata = metadata

    @property
    def n_samples(self):
        return self.signals.shape[0]


def choose_label_stream(streams, requested, source):
    """Name of the label stream to train on: ``requested``, or the preferred/only one."""
    names = list(streams)
    if not names:
        raise UsageError("{}: the recording has no label stream to train on".format(source))
    if requested is not None:
        checks.check_option("{}: label stream".format(source), requested, names)
        return requested
    for name in PREFERRED_STREAMS:
        if name in streams:
            return name
    if len(names) == 1:
        return names[0]
    raise UsageError("{}: the recording has label streams {}; choose one with \"labels\": {{\"stream\": ...}} "
                     "in the config".format(source, ", ".join(names)))


def load_recording(path, label_stream=None):
    """Open ``path`` and load its signals (µV, float64), chosen label stream, events and metadata."""
    from neurohand.firmware_bridge.recording.file_format import open_recording

    with open_recording(path) as rec:
        name = choose_label_stream(rec.label_streams, label_stream, path)
        return RecordingData(path, float(rec.signal_rate), list(rec.channel_names),
                             rec.read_signals(microvolts=True), rec.label_streams[name], list(rec.events),
                             dict(rec.metadata))


def check_compatible(recordings):
    """All recordings must share rate, channels and label names (one model serves them all)."""
    first = recordings[0]
    for other in recordings[1:]:
        for what, a, b in (("signal rate", first.signal_rate, other.signal_rate),
                           ("channels", first.channel_names, other.channel_names),
                           ("label stream", first.labels.name, other.labels.name),
                           ("label names", first.labels.names, other.labels.names)):
            if a != b:
                raise UsageError("{} and {} differ in {}: {} vs {}".format(first.path, other.path, what, a, b))


def label_rows(ends, signal_rate, label_rate, n_label_rows, source="recording"):
    """Row of the label stream at each window's end time (causal), int64 (n_windows,).

    ends : int array, sample index after each window's last sample
    Raises UsageError where the label stream stops more than one row early."""
    ends = np.asarray(ends, dtype=np.int64)
    times = (ends - 1) / float(signal_rate)
    # The small epsilon keeps exact multiples (e.g. 0.07 s x 100 Hz = 6.999...) on their row.
    rows = np.floor(times * float(label_rate) + 1e-9).astype(np.int64)
    if len(rows) and rows[-1] > n_label_rows:
        raise UsageError("{}: the label stream ends at row {} but a window ends at row {}".format(
            source, n_label_rows, int(rows[-1])))
    return np.clip(rows, 0, n_label_rows - 1)


class LabelScaling(object):
    """Per-output affine map of labels into the model's 0..1 range, fitted on training labels.

    kind "minmax": (y - minimum) / (maximum - minimum); kind "none": identity
    (labels already in 0..1, e.g. finger positions)."""

    def __init__(self, kind, minimum=None, maximum=None):
        self.kind = kind
        self.minimum = None if minimum is None else np.asarray(minimum, dtype=np.float64)
        self.maximum = None if maximum is None else np.asarray(maximum, dtype=np.float64)

    @classmethod
    def fit(cls, labels, kind="auto"):
        """Fit on training ``labels`` (n, n_outputs); "auto" keeps labels already in 0..1 as they are."""
        checks.check_option("labels scaling", kind, SCALINGS)
        labels = np.asarray(labels, dtype=np.float64)
        if kind == "auto":
            kind = "none" if labels.min() >= 0.0 and labels.max() <= 1.0 else "minmax"
        if kind == "none":
            return cls("none")
        minimum, maximum = labels.min(axis=0), labels.max(axis=0)
        # A channel that never moves in training maps to 0 rather than dividing by zero.
        maximum = np.where(maximum > minimum, maximum, minimum + 1.0)
        return cls("minmax", minimum, maximum)

    def apply(self, labels):
        labels = np.asarray(labels, dtype=np.float64)
        if self.kind == "none":
            return labels.copy()
        return (labels - self.minimum) / (self.maximum - self.minimum)

    def invert(self, scaled):
        """Model outputs (0..1) back to label units."""
        scaled = np.asarray(scaled, dtype=np.float64)
        if self.kind == "none":
            return scaled.copy()
        return scaled * (self.maximum - self.minimum) + self.minimum

    def to_config(self):
        if self.kind == "none":
            return {"kind": "none"}
        return {"kind": "minmax", "minimum": self.minimum.tolist(), "maximum": self.maximum.tolist()}

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict) or config.get("kind") not in ("none", "minmax"):
            raise ConfigError("label scaling must be {{'kind': 'none'}} or {{'kind': 'minmax', 'minimum': [...], "
                              "'maximum': [...]}}, but got {!r}".format(config))
        if config["kind"] == "none":
            return cls("none")
        return cls("minmax", config["minimum"], config["maximum"])


def smooth_labels(labels, width):
    """Centred moving average over ``width`` steps within one segment (edges use the available part).

    For training targets only: a glove's 8-bit steps and sensor jitter are not
    something the decoder can or should predict.  Never applied to scored labels."""
    labels = np.asarray(labels, dtype=np.float64)
    if width <= 1 or len(labels) < 2:
        return labels.copy()
    half = width // 2
    padded_sum = np.concatenate([np.zeros((1, labels.shape[1])), np.cumsum(labels, axis=0)])
    index = np.arange(len(labels))
    low = np.maximum(index - half, 0)
    high = np.minimum(index + (width - half), len(labels))
    return (padded_sum[high] - padded_sum[low]) / (high - low)[:, None]


def lead_labels(labels, steps):
    """Labels moved ``steps`` decoder steps earlier: row t holds row t + steps (the last row repeats).

    For training targets only: the nerve fires before the finger moves, so a decoder
    trained toward where the finger will be can cancel part of its window's delay.
    Scored labels are never shifted."""
    labels = np.asarray(labels, dtype=np.float64)
    if steps <= 0 or len(labels) < 2:
        return labels.copy()
    index = np.minimum(np.arange(len(labels)) + int(steps), len(labels) - 1)
    return labels[index]


def segment_windows(pipeline, recording, segment):
    """Raw features and absolute window ends of one segment, shape (n_windows, n_features), (n_windows,)."""
    if segment.stop - segment.start < pipeline.window_samples:
        return None
    features, ends = pipeline.transform(recording.signals[segment.start:segment.stop])
    return features, ends + segment.start


def split_recordings(recordings, split_settings, guard_samples):
    """Segments of every recording: list (per recording) of (method, [Segment])."""
    return [splits.plan_split(rec.n_samples, rec.events, split_settings, guard_samples, source=rec.path)
            for rec in recordings]


def build_sequences(pipeline, recordings, plans, scaling_kind="auto", fit=True, label_scaling=None):
    """Features and aligned labels for every segment, normalised with training statistics.

    Parameters
    ----------
    pipeline : FeaturePipeline; with ``fit`` its normalisation is fitted on the training windows
    recordings : list of RecordingData
    plans : list of (method, segments) per recording (see :func:`split_recordings`)
    scaling_kind : "auto", "minmax" or "none" (used when fitting)
    fit : bool, fit normalisation and label scaling here (training) or use the stored ones (evaluation)
    label_scaling : LabelScaling, required when not ``fit``

    Returns
    -------
    (sequences, label_scaling) : dict split -> list of Sequence, and the scaling used
    """
    check_finite_signals(recordings)
    warn_negative_envelopes(pipeline, recordings)
    raw = []
    for index, (rec, (_, segments)) in enumerate(zip(recordings, plans)):
        for segment in segments:
            # An overflow here is refused just below with its cause, so numpy's own warning would only
            # add a line with less in it.
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                windows = segment_windows(pipeline, rec, segment)
            if windows is None or len(windows[1]) == 0:
                continue
            features, ends = windows
            rows = label_rows(ends, rec.signal_rate, rec.labels.rate, len(rec.labels.data), rec.path)
            raw.append((features, rec.labels.data[rows].astype(np.float64), ends, index, segment.split))
    check_finite_features(pipeline, recordings, [r[0] for r in raw])
    by_split = {name: [r for r in raw if r[4] == name] for name in splits.SPLIT_NAMES}
    for name in splits.SPLIT_NAMES:
        if not by_split[name]:
            raise UsageError("the {} split holds no complete feature window; use longer recordings or a shorter "
                             "window".format(name))
    if fit:
        pipeline.fit_normalisation(np.concatenate([r[0] for r in by_split["train"]]))
        label_scaling = LabelScaling.fit(np.concatenate([r[1] for r in by_split["train"]]), scaling_kind)
    elif label_scaling is None:
        raise ConfigError("build_sequences(fit=False) needs the stored label scaling")
    sequences = {}
    for name in splits.SPLIT_NAMES:
        sequences[name] = [Sequence(pipeline.normalise(f).astype(np.float32),
                                    label_scaling.apply(l).astype(np.float32), e, i, s)
                           for f, l, e, i, s in by_split[name]]
    return sequences, label_scaling


def check_finite_signals(recordings):
    """Refuse NaN or infinite samples in one line naming the recording, channels and first sample."""
    for rec in recordings:
        bad = ~np.isfinite(rec.signals)
        if bad.any():
            counts = np.count_nonzero(bad, axis=0)
            raise UsageError("{}: channel(s) {} hold NaN or infinite samples (first at sample {}); repair or cut "
                             "them before training".format(
                                 rec.path, ", ".join("{} ({} samples)".format(rec.channel_names[c], int(counts[c]))
                                                     for c in np.flatnonzero(counts)),
                                 int(np.flatnonzero(bad.any(axis=1))[0])))


def warn_negative_envelopes(pipeline, recordings):
    """Say which channels dip below zero when log compression will treat those windows as silent.

    Filtering leaves small negative values in envelope tables; an amplitude
    feature cannot be negative, so the feature code takes log(max(value, 0) +
    log_epsilon) (decoder/features.py).  That is the right reading of a dip,
    but not of an envelope that is negative throughout (an offset): the warning
    names the channels so the user can tell which it is.
    """
    config = pipeline.to_config()
    if config.get("mode") != "envelope" or not config.get("log"):
        return
    for rec in recordings:
        negative = np.count_nonzero(rec.signals < 0, axis=0)
        if not negative.any():
            continue
        lowest = np.min(rec.signals, axis=0)
        warnings.warn("{}: channel(s) {} go below zero; log compression counts a window whose mean is below zero "
                      "as silent (log of log_epsilon {:g}); if the channel has an offset, remove it before "
                      "importing".format(rec.path, ", ".join(
                          "{} ({} samples, min {:.3g})".format(rec.channel_names[c], int(negative[c]),
                                                               float(lowest[c]))
                          for c in np.flatnonzero(negative)), config["log_epsilon"]), UserWarning)


def check_finite_features(pipeline, recordings, features):
    """Refuse NaN or infinite features in one line naming the channels and the cause.

    Checked in every split (a NaN test window would only show as a NaN score).
    Signals are finite by then (:func:`check_finite_signals`) and negative
    envelopes are floored before the log, so what is left is overflow.

    features : list of raw (not normalised) feature arrays (n_windows, n_features)"""
    bad = np.zeros(pipeline.n_features, dtype=bool)
    for block in features:
        bad |= ~np.isfinite(block).all(axis=0)
    if not bad.any():
        return
    names = pipeline.feature_names
    columns = [names[i].rsplit("_ch", 1) for i in np.flatnonzero(bad)]
    kinds = sorted({kind for kind, _ in columns})
    channels = sorted({int(channel) for _, channel in columns})
    channel_names = recordings[0].channel_names
    signals = [rec.signals[:, channels] for rec in recordings]
    what = "feature(s) {} of channel(s) {} are NaN or infinite".format(
        ", ".join(kinds), ", ".join(channel_names[c] for c in channels))
    raise UsageError("{}: the signals are finite (at most {:.3g} in size), so a feature overflowed; scale the "
                     "signals down (import --scale-uv)".format(
                         what, float(max(np.max(np.abs(x)) for x in signals))))


def guard_samples(pipeline):
    """Guard gap between time blocks: one feature window, in samples."""
    return int(pipeline.window_samples)


def steps_per_second(pipeline):
    return pipeline.signal_rate / float(pipeline.stride_samples)



# --- movement classes ---------------------------------------------------------------

#: Events whose values are the movement classes (train/classes.py; NinaPro's restimulus).
CLASS_EVENT_KIND = "movement"
#: Longest class name kept from a recording's metadata (the device prints it on a status line).
MAX_CLASS_NAME = 16
#: Class target of a step that counts in no class loss (padding, or a value the head does not know).
NO_CLASS = -1


class ClassHead(object):
    """The movement classes a run's class head decides among, and how event values map to them.

    values : int event values, rest (0) first then ascending; the head's output ``k`` is ``values[k]``
    names : short distinct names, "rest" first (ModelConfig.class_names)
    weights : per-class loss weights (1/frequency in training, mean 1 over the training steps) or None"""

    def __init__(self, values, names, weights=None):
        self.values = [int(v) for v in values]
        self.names = list(names)
        self.weights = None if weights is None else [float(w) for w in weights]

    @classmethod
    def from_sequences(cls, recordings, sequences, balance=True):
        """The classes of the training steps (rest always among them), or None with fewer than 2."""
        from neurohand.train.classes import REST

        # A recording without movement events says nothing of its steps' classes (all would read rest).
        truth = [step_values(recordings[s.recording], s.ends) for s in sequences
                 if has_class_events(recordings[s.recording])]
        found = np.unique(np.concatenate(truth)) if truth else np.zeros(0, dtype=np.int64)
        values = [REST] + sorted(int(v) for v in found if v != REST)
        if len(values) < 2:
            return None
        head = cls(values, class_names_for(values, recordings[0].metadata))
        if balance:
            counts = np.bincount(np.concatenate([head.indices(t) for t in truth]), minlength=len(values))
            counts = counts.astype(np.float64)
            # Rest's many steps would otherwise pull every doubtful step to rest; the mean weight over the
            # training steps stays 1, so class_weight keeps its meaning.
            weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
            weights *= counts.sum() / float(np.sum(weights * counts))
            head.weights = weights.tolist()
        return head

    def indices(self, values):
        """Head output index of each event value, NO_CLASS for a value the head does not know."""
        values = np.asarray(values, dtype=np.int64)
        table = np.asarray(self.values, dtype=np.int64)
        order = np.argsort(table)
        position = np.clip(np.searchsorted(table, values, sorter=order), 0, len(table) - 1)
        index = order[position]
        return np.where(table[index] == values, index, NO_CLASS).astype(np.int64)

    def targets(self, recording, ends):
        """Class target (head index) of each step of a sequence: the movement in force at its window's
        last sample (train/classes.py), unshifted whatever ``target_lead_s`` is (see docs/training.md);
        NO_CLASS throughout for a recording without movement events (they would all read rest)."""
        if not has_class_events(recording):
            return np.full(len(ends), NO_CLASS, dtype=np.int64)
        return self.indices(step_values(recording, ends))

    def to_config(self):
        """config.json "classes": what evaluate needs to score the head (value -> output index)."""
        return {"event_kind": CLASS_EVENT_KIND, "values": list(self.values), "names": list(self.names),
                "weights": self.weights}

    @classmethod
    def from_config(cls, config, where="config.json classes"):
        if (not isinstance(config, dict) or not isinstance(config.get("values"), list)
                or not isinstance(config.get("names"), list) or len(config["values"]) != len(config["names"])
                or len(config["values"]) < 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in config["values"])
                or len(set(config["values"])) != len(config["values"])):
            raise ConfigError("{} must hold as many distinct integer 'values' as 'names' (at least 2), but got "
                              "{!r}".format(where, config))
        return cls(config["values"], config["names"], config.get("weights"))


def has_class_events(recording):
    """Whether the recording has any movement event (else its steps have no known class)."""
    return any(_event_kind(e) == CLASS_EVENT_KIND for e in recording.events)


def _event_kind(event):
    return event.kind if hasattr(event, "kind") else event[1]


def step_values(recording, ends):
    """Movement event value in force at each step (train/classes.py's causal rule), int64."""
    from neurohand.train.classes import step_classes

    return step_classes(recording.events, ends, CLASS_EVENT_KIND)


def class_names_for(values, metadata):
    """Names of movement ``values``: "rest" for 0; else the recording's metadata "movement_names"
    (a list indexed by value, or a mapping value -> name) where it gives a short, distinct one; else the
    value itself ("1" .. "12" for NinaPro E1)."""
    given = (metadata or {}).get("movement_names")
    names = []
    for value in values:
        name = "rest" if value == 0 else None
        if name is None and isinstance(given, dict):
            name = given.get(str(value), given.get(value))
        elif name is None and isinstance(given, list) and 0 <= value < len(given):
            name = given[value]
        name = " ".join(name.split())[:MAX_CLASS_NAME].strip() if isinstance(name, str) else ""
        names.append(name or str(value))
    if len(set(names)) != len(names):
        return ["rest" if v == 0 else str(v) for v in values]
    return names
