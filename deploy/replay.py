"""``neurohand replay``: a recording through the decoder, scored against its labels (docs/replay.md).

Two modes, one decoding:

* realtime: a virtual chip (pseudo-terminal) streams the recording at its
  true rate; :func:`neurohand.deploy.session.run_on_chip` -- exactly what
  ``neurohand run`` does -- decodes it and drives a neurohand-protocol hand
  driver into a virtual hand (pseudo-terminal), which timestamps every
  command it receives.  The two devices run in processes of their own, as
  hardware would (``devices="process"``), or as threads of this process
  (``"thread"``), where they compete with the runtime for the interpreter lock.
* fast: the same stage objects in this thread on a virtual clock
  (``run_fast_replay``), half-second items; with ``jobs=2`` a child process
  computes the features one item ahead (runtime/feature_worker.py).

Scoring (identical rules for both modes).  Each command is placed on the
sample axis of the replay (0 = the first replayed sample):

* fast: the decoded window's end sample (``DecodedCommand.sample``);
* realtime: ``(t - t0) * rate`` where ``t`` is when the virtual hand received
  it and ``t0`` when the virtual chip started streaming (``time.monotonic``:
  one clock for every process of the machine), so the decoding and link
  latency count against it (the frame's own wait does not: see
  :class:`StampedVirtualChip`).

The truth is the recording's label stream (``bundle.config["labels"]``:
stream, names) scaled as in training (``labels.scaling``), at the label row
in force at that sample (the rule training uses for window ends).  Scored
are the commands from the end of the warm-up -- :data:`WARMUP_S` of signal,
or the runtime's ``ready`` event (``recovery_windows`` good windows) if that
comes later -- to the end, leaving out the safe posture sent at shutdown
(the last command the hand receives) and repeats: a command equal on every
output (at the hand link's 16-bit resolution) to the one before it, as a
keep-alive is, moves nothing and is not scored again.  R² per output is
``1 - SS_res / SS_tot`` over the scored commands (``nan`` -> null for an
output whose truth is constant), the same definition as ``evaluate``.

The intent-to-command lag (``lag_ms``, decoder/lag.py, docs/latency.md) is
measured over the same span, from the end of the warm-up: every command held
until the next, as the hand holds it, against the label stream on a 1 ms grid.

Movement classes.  When the bundle's model has a class head and the recording
has ``movement`` events, the class decided with each command (the runtime's
ClassDecider, runtime/classes.py) is scored against the movement in force at
the command's sample, with the measures ``neurohand evaluate`` uses
(decoder/classes.py): per-step accuracy, balanced accuracy, the confusion
matrix and the per-trial accuracy after the decision delay (``classes`` in the
summary).  The steps are the commands from the end of the warm-up (fast: every
decoded window; realtime: the scored commands, so keep-alives do not count
twice).  A step that decided no class (the safe posture, low confidence)
counts as rest; a true class the head does not have is left out and counted.
"""
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from neurohand.decoder import classes as class_measures
from neurohand.decoder import lag as lag_metric
from neurohand.firmware_bridge.shared.checks import check_number, check_option
from neurohand.firmware_bridge.shared.errors import ConfigError, NeurohandError, RecordingError, UsageError
from neurohand.firmware_bridge.virtual.chip import VirtualChip
from neurohand.firmware_bridge.virtual.hand import ReceivedCommand

#: Signal (seconds) left out of scoring at the start: the filters settle and the
#: runtime holds the hand open until ``recovery_windows`` good windows.
WARMUP_S = 1.0
#: Recording kept beyond a realtime replay's end, so the chip is still streaming
#: when the run stops (otherwise the end of the data would be a data timeout).
REALTIME_MARGIN_S = 0.5
#: Default length of a realtime replay when --seconds is not given.
REALTIME_DEFAULT_MAX_S = 600.0
#: How long to wait for the virtual hand to have read every command sent.
HAND_DRAIN_S = 2.0
MODES = ("fast", "realtime")
#: Where replay_realtime runs the virtual chip and hand: processes of their own, or threads of the runtime's.
DEVICES = ("process", "thread")
#: Largest scaled label scored: hand positions are 0..1, so a truth a million
#: times that is damage, and its square would overflow far sooner than R2 says so.
MAX_SCALED_LABEL = 1e6
#: Longest --start / --seconds accepted (about 11.6 days of recording): far beyond any
#: recording, and far below where sample arithmetic overflows.
MAX_SECONDS = 1e6


# --- labels and scores ---------------------------------------------------------

def scale_labels(labels, scaling):
    """Labels mapped into the model's 0..1 range as training did (train/dataset.py LabelScaling).

    labels : array (n, n_outputs), label units; scaling : config dict
    ``{"kind": "none"}`` or ``{"kind": "minmax", "minimum": [...], "maximum": [...]}``.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if not isinstance(scaling, dict) or scaling.get("kind") not in ("none", "minmax"):
        raise ConfigError("label scaling must be {{'kind': 'none'}} or {{'kind': 'minmax', ...}}, "
                          "but got {!r}".format(scaling))
    if scaling["kind"] == "none":
        return labels.copy()
    minimum = np.asarray(scaling.get("minimum"), dtype=np.float64)
    maximum = np.asarray(scaling.get("maximum"), dtype=np.float64)
    if minimum.shape != (labels.shape[1],) or maximum.shape != minimum.shape:
        raise ConfigError("label scaling has {} minima and {} maxima for {} outputs".format(
            minimum.size, maximum.size, labels.shape[1]))
    return (labels - minimum) / (maximum - minimum)


def r2_scores(truth, prediction):
    """R² per output, shape (n_outputs,): 1 - SS_res / SS_tot; nan where the truth is constant.

    truth, prediction : arrays (n_steps, n_outputs) in the same units.
    """
    truth = np.asarray(truth, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64)
    if truth.shape != prediction.shape or truth.ndim != 2:
        raise ValueError("truth {} and prediction {} must have the same 2-D shape".format(
            truth.shape, prediction.shape))
    if truth.shape[0] < 2:
        return np.full(truth.shape[1], np.nan)
    residual = np.sum((truth - prediction) ** 2, axis=0)
    total = np.sum((truth - truth.mean(axis=0)) ** 2, axis=0)
    safe_total = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 1.0 - residual / safe_total, np.nan)


def _finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None


class LabelTruth(object):
    """The recording's label stream, scaled as in training, looked up by sample position.

    Raises UsageError when the recording lacks the bundle's label stream or its
    columns differ from the outputs the bundle decodes.
    """

    def __init__(self, recording, labels_config, source="recording"):
        if not isinstance(labels_config, dict) or "stream" not in labels_config:
            raise ConfigError("the bundle's config.json has no labels section (stream, names, scaling)")
        name = labels_config["stream"]
        if name not in recording.label_streams:
            raise UsageError("{} has no label stream {!r} to score against (it has: {})".format(
                source, name, ", ".join(sorted(recording.label_streams)) or "none"))
        stream = recording.label_streams[name]
        names = list(labels_config.get("names") or [])
        if list(stream.names) != names:
            raise UsageError("{}: label stream {!r} has columns {}, but the bundle decodes {}".format(
                source, name, list(stream.names), names))
        if len(stream.data) == 0:
            raise UsageError("{}: label stream {!r} is empty".format(source, name))
        self.names = names
        self.rate = float(stream.rate)
        self.signal_rate = float(recording.signal_rate)
        with np.errstate(all="ignore"):     # judged below, with a message a user can act on
            values = scale_labels(stream.data, labels_config.get("scaling", {"kind": "none"}))
        bad = ~np.isfinite(values) | (np.abs(values) > MAX_SCALED_LABEL)
        if np.any(bad):
            raise UsageError("{}: label stream {!r} has {} values that are not finite or out of range "
                             "(beyond +-{:g} once scaled as in training, first at row {}); they cannot be "
                             "scored".format(source, name, int(np.count_nonzero(bad)), MAX_SCALED_LABEL,
                                             int(np.flatnonzero(bad.any(axis=1))[0])))
        self.values = values

    def at(self, end_samples):
        """Scaled labels (n, n_outputs) in force at each position (samples on the recording's axis).

        A position ``e`` means "just after sample e - 1" (a window end), as in
        training: the label row is ``floor((e - 1) / signal_rate * label_rate)``.
        """
        ends = np.asarray(end_samples, dtype=np.float64)
        rows = np.floor((ends - 1.0) / self.signal_rate * self.rate + 1e-9).astype(np.int64)
        return self.values[np.clip(rows, 0, len(self.values) - 1)]


def ready_sample(document):
    """Sample (since the replay started) of the runtime's first ``ready`` event, or None."""
    for event in document["safety_events"]["events"]:
        if event["kind"] == "ready":
            return int(event["sample"])
    return None


def repeated_commands(wire_positions):
    """Mask of commands equal, on every output, to the command before them (keep-alives), shape (n,).

    wire_positions : int array (n, n_outputs), positions as the hand link
    carries them (neurohand protocol: 16-bit, ``quantise``).  A keep-alive
    re-sends the held position and moves nothing, so it is not a new sample
    of the decoder; how many the writer sends depends on thread timing.
    """
    wire_positions = np.asarray(wire_positions)
    repeated = np.zeros(len(wire_positions), dtype=bool)
    if len(wire_positions) > 1:
        repeated[1:] = np.all(wire_positions[1:] == wire_positions[:-1], axis=1)
    return repeated


def wire_positions(positions):
    """Positions (n, n_outputs) 0..1 as the neurohand hand protocol quantises them (int64)."""
    from neurohand.firmware_bridge.hands.neurohand_protocol import quantise
    positions = np.asarray(positions, dtype=np.float64)
    return np.array([quantise(row) for row in positions], dtype=np.int64).reshape(positions.shape)


def score_commands(truth, start_sample, samples, positions, wire, score_from):
    """Scores of commands at ``samples`` (since the replay start): those from ``score_from`` on
    that are not repeats of the command before (see :func:`repeated_commands`).

    Returns (r2 array per output, mask of scored commands, mask of repeats).
    """
    samples = np.asarray(samples, dtype=np.float64)
    repeated = repeated_commands(wire)
    scored = (samples >= score_from) & ~repeated
    if not np.any(scored):
        return np.full(len(truth.names), np.nan), scored, repeated
    expected = truth.at(start_sample + samples[scored])
    return r2_scores(expected, np.asarray(positions, dtype=np.float64)[scored]), scored, repeated


# --- the replay -----------------------------------------------------------------

class ReplayRange(object):
    """Which samples to replay: ``start`` and ``stop`` (exclusive) on the recording's axis."""

    def __init__(self, recording, start_s, seconds, mode):
        rate = float(recording.signal_rate)
        start_s = check_number("--start", start_s, minimum=0.0, maximum=MAX_SECONDS)
        self.start = int(round(start_s * rate))
        margin = int(round(REALTIME_MARGIN_S * rate)) if mode == "realtime" else 0
        available = recording.n_samples - self.start - margin
        if available < int(round(2 * WARMUP_S * rate)):
            raise UsageError("{}: only {:.1f} s of recording after --start {:g} s{}; at least {:g} s are "
                             "needed".format(recording.path, max(available, 0) / rate, start_s,
                                             " (less {:g} s kept in reserve at the end in real time)".format(
                                                 REALTIME_MARGIN_S) if margin else "", 2 * WARMUP_S))
        if seconds is None:
            wanted = available if mode == "fast" else min(available, int(round(REALTIME_DEFAULT_MAX_S * rate)))
        else:
            seconds = check_number("--seconds", seconds, minimum=2 * WARMUP_S, maximum=MAX_SECONDS)
            wanted = int(round(seconds * rate))
            if wanted > available:
                raise UsageError("--seconds {:g}: {} has only {:.1f} s after --start {:g} s{}".format(
                    seconds, recording.path, available / rate, start_s,
                    " (less {:g} s kept in reserve at the end in real time)".format(REALTIME_MARGIN_S)
                    if margin else ""))
        self.stop = self.start + wanted
        self.rate = rate

    @property
    def seconds(self):
        return (self.stop - self.start) / self.rate


class ReplayOutcome(object):
    """What a replay produced.

    summary : dict, JSON-ready (the ``--json`` document)
    samples : float64 (n_commands,), position of each command since the replay start, samples
    positions : float64 (n_commands, n_outputs), hand positions 0..1
    truth : float64 (n_commands, n_outputs), scaled labels at those positions
    scored : bool (n_commands,)
    document : dict, the runtime's stats document
    """

    def __init__(self, summary, samples, positions, truth, scored, document):
        self.summary = summary
        self.samples = samples
        self.positions = positions
        self.truth = truth
        self.scored = scored
        self.document = document


def check_fits(decoder, recording):
    """UsageError unless the recording has the bundle's channels and rate."""
    pipeline = decoder.pipeline
    if abs(float(recording.signal_rate) - pipeline.signal_rate) > 1e-6 * pipeline.signal_rate \
            or recording.n_channels != pipeline.n_channels:
        raise UsageError("{}: {} channels at {:g} Hz, but the bundle decodes {} channels at {:g} Hz".format(
            recording.path, recording.n_channels, float(recording.signal_rate), pipeline.n_channels,
            pipeline.signal_rate))


def _prepare(decoder, recording):
    """Check the recording fits the bundle; return its LabelTruth (the decoder is closed on failure)."""
    try:
        check_fits(decoder, recording)
        return LabelTruth(recording, decoder.bundle.config.get("labels"), recording.path)
    except BaseException:
        decoder.close()
        raise


# Seconds of signal per item in fast replay: long enough to vectorise the
# features over ~25 windows, short enough to keep memory small.
FAST_BLOCK_S = 0.5


def replay_fast(decoder, recording, replay_range, config, record_path=None, stats_path=None, jobs=None):
    """Decode ``replay_range`` of ``recording`` with no ports, as fast as possible; return a ReplayOutcome.

    Items are blocks of FAST_BLOCK_S (a whole number of strides): the DSP and
    features run vectorised over many windows at once, and the decoded
    windows do not depend on the block size.  run_fast hands each window to
    the writer at its own end time, so the watchdog sees the real timeline.
    ``jobs`` 2: a child process reads the recording and computes the features
    one block ahead while this one decodes (runtime/feature_worker.py; same
    numbers); 1: all in this process; None: 2 where two CPUs and fork exist.
    """
    from neurohand.deploy.runtime import run_fast_replay
    from neurohand.deploy.runtime.feature_worker import FeatureWorker, default_jobs
    from neurohand.deploy.runtime.replay_source import recording_items
    from neurohand.firmware_bridge.recording.file_format import open_recording

    truth = _prepare(decoder, recording)
    jobs = default_jobs() if jobs is None else jobs
    samples, positions, decided = [], [], []

    def on_command(command):
        samples.append(command.sample)
        positions.append(command.positions.copy())
        decided.append(command.decided)

    pipeline = decoder.pipeline
    stride = pipeline.stride_samples
    block = stride * max(1, int(round(FAST_BLOCK_S * recording.signal_rate / stride)))
    start, stop = replay_range.start, replay_range.stop

    def run(items, stream=None):
        return run_fast_replay(pipeline, decoder.backend, items, recording.scale_uv, recording.channel_names,
                               config, record_path=record_path, stats_path=stats_path,
                               metadata=decoder.metadata(), on_command=on_command, stream=stream)

    started = time.perf_counter()
    worker_dsp_s = None
    if jobs >= 2:
        path = recording.path
        worker = FeatureWorker(pipeline.stream(), lambda: recording_items(open_recording(path), block, start, stop),
                               recording.scale_uv)
        try:
            with worker:
                document = run(worker.items(), worker.stream)
        except BaseException:
            decoder.close()
            raise
        worker_dsp_s = worker.dsp_s
    else:
        document = run(recording_items(recording, block, start, stop))
    wall_s = time.perf_counter() - started
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, len(truth.names))
    extra = {"speed_x": document.get("speed_x"), "block_samples": block, "jobs": jobs,
             "feature_worker_dsp_s": None if worker_dsp_s is None else round(worker_dsp_s, 3)}
    return _outcome("fast", decoder, recording, replay_range, truth, np.asarray(samples, dtype=np.float64),
                    positions, wire_positions(positions), document, wall_s, extra, decided)


def replay_realtime(decoder, recording, replay_range, config, faults=None, disconnect_after_s=None,
                    record_path=None, stats_path=None, quiet=True, install_signals=True, devices="thread",
                    outlets=None):
    """Replay through a virtual chip and a virtual hand on pseudo-terminals, in real time.

    ``faults`` (a FaultInjector or None) and ``disconnect_after_s`` are given
    to the virtual chip.  ``devices``: where the virtual chip and hand run --
    "process": each in a process of its own (a fresh interpreter), as hardware,
    so that they do not compete with the runtime for this interpreter's lock;
    "thread": threads of this process (tests look inside them).  The latency
    is measured the same way in both (inside the runtime, chip bytes in ->
    hand command written); the summary's ``devices`` says which it was.
    ``outlets``: opened LslOutlets the run also publishes to (``--lsl-outlet``),
    or None; the caller closes them.
    Returns a ReplayOutcome whose commands are what the virtual hand received.
    """
    from neurohand.deploy.session import run_on_chip
    try:
        check_option("devices", devices, DEVICES)
    except UsageError:
        decoder.close()
        raise
    truth = _prepare(decoder, recording)
    # The run opens the chip through a symlink, as a udev name on the device: after a simulated
    # unplug the chip comes back on a new pseudo-terminal and the link follows it.
    port_dir = tempfile.mkdtemp(prefix="neurohand-replay-")
    chip_path = os.path.join(port_dir, "chip")
    rig_class = ProcessDevices if devices == "process" else ThreadDevices
    rig = rig_class(recording, replay_range.start, faults, disconnect_after_s, chip_path)
    try:
        rig.start()
    except BaseException:
        rig.stop()
        shutil.rmtree(port_dir, ignore_errors=True)
        decoder.close()
        raise
    started = time.perf_counter()
    sent_classes = [] if getattr(decoder, "class_names", ()) else None
    try:
        document = run_on_chip(decoder, chip_path, "neurohand:" + rig.hand_port, config,
                               record_path=record_path, stats_path=stats_path, duration_s=replay_range.seconds,
                               quiet=quiet, install_signals=install_signals, outlets=outlets,
                               sent_classes=sent_classes,
                               metadata={"replay_of": recording.path, "replay_start_sample": replay_range.start})
        wall_s = time.perf_counter() - started
        rig.wait_for_hand(document["commands_sent"], HAND_DRAIN_S)
    finally:
        rig.stop()
        shutil.rmtree(port_dir, ignore_errors=True)
    if rig.chip_failure is not None:
        failure = rig.chip_failure
        if isinstance(failure, NeurohandError):
            raise failure
        raise RecordingError("the virtual chip stopped streaming {!r}: {}".format(recording.path, failure))
    if rig.received is None:
        raise RuntimeError(rig.hand_failure or "the virtual hand reported nothing")
    everything = rig.received
    if rig.stream_started_s is None:
        raise RuntimeError("the run returned but the virtual chip never started streaming")
    # The last command is the safe posture of the shutdown, sent after the run stopped.
    received = everything[:-1]
    samples = np.array([(c.t_monotonic - rig.stream_started_s) * replay_range.rate for c in received],
                       dtype=np.float64)
    n_positions = len(truth.names)
    positions = np.array([c.positions for c in received], dtype=np.float64).reshape(-1, n_positions)
    wire = np.array([c.raw for c in received], dtype=np.int64).reshape(-1, n_positions)
    # The hand received the commands in the order the writer sent them, each with its class.
    decided = None if sent_classes is None else (sent_classes + [None] * len(received))[:len(received)]
    # chip: what the chip sent, and the faults it injected (if any).
    extra = {"devices": devices, "hand": rig.hand_counters, "hand_received": len(everything),
             "commands_sent": document["commands_sent"], "chip": rig.chip_summary}
    return _outcome("realtime", decoder, recording, replay_range, truth, samples, positions, wire, document, wall_s,
                    extra, decided)


def score_class_head(class_names, events, end_samples, decided, steps_per_s, delay_s=class_measures.DEFAULT_DELAY_S,
                     values=None):
    """The class head's decisions scored against the ``movement`` events (module docstring), JSON-ready.

    class_names : the head's classes ("rest" first)
    values : the movement event value of each class, in head order (the run's config.json "classes"
        "values", which training wrote); None: a movement event's value k is the class named "rest" for 0,
        else "k" or "m<k>" (decoder/classes.class_names)
    end_samples : int array (n_steps,), the sample (recording axis) after each step's window
    decided : sequence (n_steps,) of class index or None
    Returns None where the events hold no movement (nothing to score against)."""
    if not class_measures.has_movement(events):
        return None
    names = list(class_names)
    ids = class_measures.step_classes(events, end_samples)
    if values is not None and len(values) == len(names):
        index_of = {int(value): i for i, value in enumerate(values)}
        truth = np.array([index_of.get(int(k), -1) for k in ids], dtype=np.int64)
    else:
        index_of = {name: i for i, name in enumerate(names)}
        truth = np.array([index_of.get(name, index_of.get(str(int(k)), -1))
                          for k, name in zip(ids, class_measures.class_names(ids))], dtype=np.int64)
    got = np.array([0 if d is None else int(d) for d in decided], dtype=np.int64)
    known = truth >= 0
    # Runs of steps whose true class the head has: a trial never spans a step left out.
    runs = [(a, b) for a, b, inside in class_measures.trials(known.astype(np.int64)) if inside]
    scores = class_measures.score_classes([truth[a:b] for a, b in runs] or [truth[:0]],
                                          [got[a:b] for a, b in runs] or [got[:0]], steps_per_s,
                                          classes=range(len(names)), delay_s=delay_s)
    scores["class_names"] = names
    scores["steps_no_class"] = int(sum(1 for d, k in zip(decided, known) if d is None and k))
    scores["steps_unknown_class"] = int(np.count_nonzero(~known))
    return _json_ready(scores)


def _json_ready(value):
    """``value`` with every non-finite float as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


def _outcome(mode, decoder, recording, replay_range, truth, samples, positions, wire, document, wall_s, extra,
             decided=None):
    rate = replay_range.rate
    if mode == "fast" and len(samples) == 0:
        # Nothing to score is not a score: say why no window became a command.
        counts = document.get("decoder") or {}
        faults = [e for e in (document.get("safety_events") or {}).get("events", [])
                  if e["kind"] in ("decoder_error", "non_finite_output")]
        raise UsageError("{}: no command was decoded from {:g} s of it (from {:g} s): {} windows with non-finite "
                         "outputs, {} decoder errors, {} windows dropped for gaps{}; nothing to score".format(
                             recording.path, replay_range.seconds, replay_range.start / rate,
                             counts.get("non_finite_outputs", 0), counts.get("decoder_errors", 0),
                             (document.get("feature_stream") or {}).get("windows_dropped_for_gaps", 0),
                             "; first: {}".format(faults[0]["reason"]) if faults else ""))
    ready = ready_sample(document)
    score_from = max(int(round(WARMUP_S * rate)), ready if ready is not None else replay_range.stop)
    r2, scored, repeated = score_commands(truth, replay_range.start, samples, positions, wire, score_from)
    expected = truth.at(replay_range.start + samples) if len(samples) else np.zeros((0, len(truth.names)))
    # What the hand holds: every command (repeats included) until the next, from the first after warm-up.
    lag = lag_metric.replay_lag(truth.at, replay_range.start + samples, positions, replay_range.start + score_from,
                                replay_range.stop, rate, recording.events)
    latency = document.get("latency_us") or {}
    frames = document.get("frames") or {}
    safety = document.get("safety_events") or {}
    summary = {
        "mode": mode,
        "bundle": decoder.bundle.path,
        "backend": decoder.backend.name,
        "recording": recording.path,
        "start_s": replay_range.start / rate,
        "seconds": round(replay_range.seconds, 3),
        "label_names": list(truth.names),
        "r2": [_finite_or_none(v) for v in r2],
        "mean_r2": _finite_or_none(np.nanmean(r2)) if np.any(np.isfinite(r2)) else None,
        "commands": int(len(samples)),
        "scored_commands": int(np.count_nonzero(scored)),
        "repeats_not_scored": int(np.count_nonzero(repeated)),
        "scored_from_s": round(score_from / rate, 4),
        "warmup_s": WARMUP_S,
        "latency_us": {key: latency.get(key) for key in ("p50", "p90", "p99", "max", "count")},
        "lag_ms": lag,
        "frames": {key: frames.get(key) for key in ("received", "missing", "corrupt")},
        "skips": document.get("skips"),
        "safety_events": safety.get("count"),
        "safety_by_kind": {k: v for k, v in (safety.get("by_kind") or {}).items() if v},
        "stop_reason": document.get("stop_reason"),
        "wall_s": round(wall_s, 3),
    }
    summary.update(extra)
    class_names = getattr(decoder, "class_names", ())
    if class_names and decided is not None and len(samples):
        # fast: every decoded window from the warm-up on; realtime: the scored commands (no keep-alives).
        steps = (samples >= score_from) if mode == "fast" else scored
        steps_per_s = rate / decoder.pipeline.stride_samples
        ends = replay_range.start + np.round(samples[steps]).astype(np.int64)
        head = (getattr(decoder.bundle, "config", None) or {}).get("classes")
        classes = score_class_head(class_names, recording.events, ends,
                                   [d for d, keep in zip(decided, steps) if keep], steps_per_s,
                                   values=head.get("values") if isinstance(head, dict) else None)
        if classes is not None:
            summary["classes"] = classes
    return ReplayOutcome(summary, samples, positions, expected, scored, document)


def format_summary(summary):
    """Readable table of a replay summary (the non-JSON output of ``neurohand replay``)."""
    def number(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    lines = ["replay {mode}: {seconds:g} s of {recording} from {start_s:g} s (backend {backend})".format(**summary)]
    lines.append("{:<14} {:>7}".format("output", "R2"))
    for name, value in zip(summary["label_names"], summary["r2"]):
        lines.append("{:<14} {:>7}".format(name, number(value, "{:.3f}")))
    lines.append("{:<14} {:>7}   ({} of {} commands scored, from {:g} s)".format(
        "mean", number(summary["mean_r2"], "{:.3f}"), summary["scored_commands"], summary["commands"],
        summary["scored_from_s"]))
    lines.append(lag_metric.format_lag(summary.get("lag_ms")))
    latency = summary["latency_us"]
    if latency.get("count"):
        lines.append("latency        p50 {} us  p99 {} us  max {} us  (chip bytes in -> hand command written)".format(
            number(latency["p50"], "{:.0f}"), number(latency["p99"], "{:.0f}"), number(latency["max"], "{:.0f}")))
    else:
        lines.append("latency        not measured (fast replay runs on a virtual clock)")
    frames = summary["frames"]
    lines.append("frames         received {}  missing {}  corrupt {}{}".format(
        frames["received"], frames["missing"], frames["corrupt"],
        "  (fast replay: one frame = {} samples)".format(summary.get("block_samples")) if summary["mode"] == "fast" else ""))
    lines.append("skips {}   safety events {}{}".format(
        summary["skips"], summary["safety_events"],
        " ({})".format(", ".join("{} {}".format(k, v) for k, v in sorted(summary["safety_by_kind"].items())))
        if summary["safety_by_kind"] else ""))
    classes = summary.get("classes")
    if classes is not None:
        lines.append("classes        accuracy {}  balanced {}  per trial {} ({} movement trials, decided {:g} s "
                     "after onset)".format(number(classes["accuracy"], "{:.3f}"),
                                           number(classes["balanced_accuracy"], "{:.3f}"),
                                           number(classes["trial_accuracy"], "{:.3f}"), classes["trials"],
                                           classes["delay_s"]))
    if summary["mode"] == "fast" and summary.get("speed_x") is not None:
        lines.append("speed          {:g} x real time ({})".format(
            summary["speed_x"], "features in a second process" if summary.get("jobs", 1) >= 2 else "one process"))
    return "\n".join(lines)


# --- the virtual devices: threads of this process, or processes of their own ------------

class StampedVirtualChip(VirtualChip):
    """The replay's in-process virtual chip (``devices="thread"``), a class of its own so that
    tests can watch the chip a replay makes.  ``stream_started_s``: when its stream's first
    frame was due (VirtualChip.stream_started_at, time.monotonic).

    The virtual chip sends frame k at ``t0 + k * frame_period_s`` (firmware_bridge/virtual/chip.py),
    one frame period before a real chip could (it sends a frame once its last sample is measured), so
    realtime commands on this axis, and their lag, look one frame period early (docs/latency.md).
    """

    @property
    def stream_started_s(self):
        return self.stream_started_at


class ThreadDevices(object):
    """The virtual chip (a StampedVirtualChip, served by a thread) and the virtual hand (its own
    thread) in this process, sharing its interpreter lock with the runtime.

    After :meth:`stop`: ``received`` (the hand's ReceivedCommand list), ``hand_counters``,
    ``chip_summary``, ``stream_started_s``, ``chip_failure`` (an exception or None) and
    ``hand_failure`` (why ``received`` is None, or None).
    """

    def __init__(self, recording, start_sample, faults, disconnect_after_s, chip_path):
        self._options = (recording, start_sample, faults, disconnect_after_s, chip_path)
        self.chip = self.hand = None
        self._stop = threading.Event()
        self._serving = None
        self._failures = []
        self.received = self.hand_counters = self.chip_summary = self.stream_started_s = self.chip_failure = None
        self.hand_failure = None

    @property
    def hand_port(self):
        return self.hand.slave_path

    def start(self):
        from neurohand.firmware_bridge.virtual import hand as virtual_hand     # looked up now: tests replace it
        from neurohand.firmware_bridge.virtual.chip import RecordingSource
        recording, start_sample, faults, disconnect_after_s, chip_path = self._options
        self.chip = StampedVirtualChip(RecordingSource(recording, start_sample=start_sample),
                                       start_sample=start_sample, faults=faults,
                                       disconnect_after_s=disconnect_after_s, link_path=chip_path)
        self.chip.open()
        self._serving = threading.Thread(target=self._serve, name="virtual-chip", daemon=True)
        self._serving.start()
        self.hand = virtual_hand.VirtualHand("neurohand")
        self.hand.start()

    def _serve(self):
        # The chip reads the recording as it streams: a read error (a failing SD card) ends its thread,
        # and the run then only sees the data stop.  Kept, to be the command's error afterwards.
        try:
            self.chip.serve(self._stop)
        except Exception as exc:
            self._failures.append(exc)

    def wait_for_hand(self, count, timeout_s):
        return self.hand.wait_for(count, timeout_s)

    def stop(self):
        self._stop.set()
        if self._serving is not None and self._serving.is_alive():
            self._serving.join(5.0)
        if self.chip is not None:
            self.chip.close()
            self.chip_summary = self.chip.summary()
            self.stream_started_s = self.chip.stream_started_s
        if self.hand is not None:
            self.hand.stop()
            self.received = self.hand.received()
            self.hand_counters = dict(self.hand.counters)
        self.chip_failure = self._failures[0] if self._failures else None


#: How long a device process may take to start (spawn, imports; a loaded Jetson is slow) and to report.
DEVICE_START_TIMEOUT_S = 60.0
DEVICE_REPORT_TIMEOUT_S = 20.0


class ProcessDevices(object):
    """The virtual chip and the virtual hand each in a process of its own, as separate hardware:
    fresh interpreters (``sys.executable``; nothing of this process is inherited, no lock held
    by one of its threads, no copy of the decoder), driven over pipes, connected to the runtime
    by the same pseudo-terminals.  The same attributes as ThreadDevices after :meth:`stop`; the
    faults' counters, counted in the chip's process, are copied back into ``faults``.

    Their clocks are ``time.monotonic`` (CLOCK_MONOTONIC, one clock for every process of the
    machine), so the hand's receive times and the chip's stream start share the replay's axis.
    """

    def __init__(self, recording, start_sample, faults, disconnect_after_s, chip_path):
        self._faults = faults
        self._chip = _DeviceProcess("virtual chip", "chip",
                                    (recording.path, start_sample, _faults_message(faults), disconnect_after_s,
                                     chip_path))
        self._hand = _DeviceProcess("virtual hand", "hand", ())
        self.hand_port = None
        self.received = self.hand_counters = self.chip_summary = self.stream_started_s = self.chip_failure = None
        self.hand_failure = None

    def start(self):
        self._chip.start()
        self._hand.start()          # both start up at once
        self._chip.expect("ready", DEVICE_START_TIMEOUT_S)
        self.hand_port = self._hand.expect("ready", DEVICE_START_TIMEOUT_S)[1]

    def wait_for_hand(self, count, timeout_s):
        self._hand.send("wait_for", count, timeout_s)
        return self._hand.expect("waited", timeout_s + DEVICE_REPORT_TIMEOUT_S)[1]

    def stop(self):
        """Stop both and collect what they report; never raises (it runs in ``finally``): a
        device that reported nothing leaves ``chip_failure`` or ``hand_failure`` set."""
        chip = self._chip.finish(DEVICE_REPORT_TIMEOUT_S)
        hand = self._hand.finish(DEVICE_REPORT_TIMEOUT_S)
        if chip is None:
            self.chip_failure = RuntimeError(self._chip.problem)
        else:
            self.chip_summary = chip[1]
            self.chip_failure = None if chip[2] is None else _exception_from(chip[2])
            self.stream_started_s = self.chip_summary.get("stream_started_at")
            if self._faults is not None and "faults" in self.chip_summary:
                self._faults.counters.update(self.chip_summary["faults"])
        if hand is None:
            self.hand_failure = self._hand.problem
        else:
            self.received = [ReceivedCommand(t_monotonic, t_wall, seq, tuple(positions), tuple(raw))
                             for t_monotonic, t_wall, seq, positions, raw in hand[1]]
            self.hand_counters = hand[2]


#: What a device process runs: argv[1] is the replay's sys.path (JSON), so that it imports what the replay imports.
_DEVICE_PROCESS_CODE = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                        "from neurohand.deploy.replay import device_process_main; device_process_main()")


class _DeviceProcess(object):
    """One virtual device in a process of its own; ``kind`` and ``args`` are its first message."""

    def __init__(self, what, kind, args):
        self.what = what
        self._first = (kind, tuple(args))
        self._process = self._channel = None
        self.problem = None

    def start(self):
        import json
        import subprocess
        import sys
        self._process = subprocess.Popen([sys.executable, "-c", _DEVICE_PROCESS_CODE, json.dumps(sys.path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._channel = _Channel(self._process.stdout.fileno(), self._process.stdin.fileno())
        self._channel.send(*self._first)

    def send(self, *message):
        self._channel.send(*message)

    def receive(self, timeout_s):
        """The next message; a ``failed`` message raises the exception it carries."""
        if not self._channel.poll(timeout_s):
            raise RuntimeError("the {} process did not answer within {:g} s".format(self.what, timeout_s))
        try:
            message = self._channel.recv()
        except EOFError:
            raise RuntimeError("the {} process ended (exit status {}) without a word".format(
                self.what, self._exit_status())) from None
        if message[0] == "failed":
            raise _exception_from(message[1])
        return message

    def expect(self, kind, timeout_s):
        message = self.receive(timeout_s)
        if message[0] != kind:
            raise RuntimeError("the {} process said {!r} where {!r} was expected".format(
                self.what, message[0], kind))
        return message

    def _exit_status(self):
        try:
            return self._process.wait(1.0)
        except Exception:
            return None

    def finish(self, timeout_s):
        """Ask it to stop; return its ``done`` message (None: ``problem`` says why).  It is gone after."""
        if self._process is None:
            self.problem = "the {} process never started".format(self.what)
            return None
        done = None
        try:
            self.send("stop")
            deadline = time.monotonic() + timeout_s
            while done is None:
                # Skip what it said before the stop (a "ready" that a failed start did not wait for).
                message = self.receive(max(0.0, deadline - time.monotonic()))
                if message[0] == "done":
                    done = message
        except Exception as exc:
            self.problem = str(exc)
        try:
            self._process.wait(timeout_s)
        except Exception:
            self._process.kill()
            self._process.wait()
        self._process.stdin.close()
        self._process.stdout.close()
        return done


class _Channel(object):
    """JSON messages (lists), each after its length (4 bytes, big-endian), over two pipe descriptors.

    JSON, not pickle: nothing in neurohand unpickles (tests/device/test_security.py), not even from its
    own child.  What crosses is plain data: paths, numbers, counters, received commands, and an
    exception as its type's name and text (:func:`_exception_message`, :func:`_exception_from`).
    """

    def __init__(self, read_fd, write_fd):
        self._read_fd, self._write_fd = read_fd, write_fd

    def send(self, *message):
        import json
        import struct
        body = json.dumps(list(message)).encode("utf-8")
        data = memoryview(struct.pack("!I", len(body)) + body)
        while len(data):
            data = data[os.write(self._write_fd, data):]

    def poll(self, timeout_s):
        import select
        return bool(select.select([self._read_fd], [], [], timeout_s)[0])

    def recv(self):
        """The next message (a list); EOFError once the other end is gone."""
        import json
        import struct
        (size,) = struct.unpack("!I", self._read_exactly(4))
        return json.loads(self._read_exactly(size).decode("utf-8"))

    def _read_exactly(self, size):
        data = bytearray()
        while len(data) < size:
            chunk = os.read(self._read_fd, size - len(data))
            if not chunk:
                raise EOFError("the other end closed its pipe")
            data += chunk
        return bytes(data)


def _exception_message(exc):
    """An exception as plain data for the pipe: [its type's name, its text]."""
    return [type(exc).__name__, str(exc)]


def _exception_from(message):
    """The exception a device process reported: neurohand's own error types by name (so a one-line
    error stays one), anything else as a RuntimeError naming the type."""
    from neurohand.firmware_bridge.shared import errors
    name, text = message
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(text)
    return RuntimeError("{}: {}".format(name, text))


def _faults_message(faults):
    """A FaultInjector's settings as plain data (it is rebuilt, unused, in the chip's process)."""
    if faults is None:
        return None
    return {"drop_rate": faults.drop_rate, "corrupt_rate": faults.corrupt_rate,
            "garbage_probability": faults.garbage_probability, "garbage_max_bytes": faults.garbage_max_bytes,
            "seed": faults.seed, "sync": [bytes(s).hex() for s in faults.sync], "header_size": faults.header_size}


def _faults_from(message):
    if message is None:
        return None
    from neurohand.firmware_bridge.virtual.chip import FaultInjector
    settings = dict(message)
    settings["sync"] = tuple(bytes.fromhex(s) for s in settings["sync"])
    return FaultInjector(**settings)


def _tell(channel, *message):
    try:
        channel.send(*message)
    except OSError:
        pass        # the replay is gone; nobody to tell


def _stop_when_told(channel):
    """An Event set by the replay's ``stop`` (or by its end: a closed pipe)."""
    stop = threading.Event()

    def listen():
        try:
            channel.recv()
        except (EOFError, OSError):
            pass
        stop.set()

    threading.Thread(target=listen, name="stop-listener", daemon=True).start()
    return stop


def _chip_process(channel, recording_path, start_sample, faults, disconnect_after_s, link_path):
    """The virtual chip's process: ready, serve until told to stop, done."""
    faults = _faults_from(faults)
    from neurohand.firmware_bridge.recording.file_format import open_recording
    from neurohand.firmware_bridge.virtual.chip import RecordingSource
    try:
        recording = open_recording(recording_path)
    except Exception as exc:
        _tell(channel, "failed", _exception_message(exc))
        return
    with recording:
        try:
            chip = VirtualChip(RecordingSource(recording, start_sample=start_sample), start_sample=start_sample,
                               faults=faults, disconnect_after_s=disconnect_after_s, link_path=link_path)
            chip.open()
        except Exception as exc:
            _tell(channel, "failed", _exception_message(exc))
            return
        _tell(channel, "ready", chip.slave_path)
        stop = _stop_when_told(channel)
        failure = None
        try:
            chip.serve(stop)
        except Exception as exc:        # see ThreadDevices._serve
            failure = _exception_message(exc)
        stop.wait()         # as in a thread, the terminal stays until the replay is over
        chip.close()
    _tell(channel, "done", chip.summary(), failure)


def _hand_process(channel):
    """The virtual hand's process: ready, answer ``wait_for`` until told to stop, done."""
    from neurohand.firmware_bridge.virtual.hand import VirtualHand
    try:
        hand = VirtualHand("neurohand").start()
    except Exception as exc:
        _tell(channel, "failed", _exception_message(exc))
        return
    _tell(channel, "ready", hand.slave_path)
    try:
        while True:
            message = channel.recv()
            if message[0] != "wait_for":
                break
            _tell(channel, "waited", hand.wait_for(message[1], message[2]))
    except (EOFError, OSError):
        pass
    finally:
        hand.stop()
    _tell(channel, "done", hand.received(), dict(hand.counters))


#: The devices a device process can be (an explicit registry: the first message names one).
_DEVICE_MAINS = {"chip": _chip_process, "hand": _hand_process}


def device_process_main():
    """Entry point of a device process (ProcessDevices): its stdin and stdout carry the messages."""
    import signal
    # Ctrl-C reaches the whole process group; the replay decides when its devices stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel(os.dup(0), os.dup(1))
    os.dup2(2, 1)       # a stray print must not land in the channel
    kind, args = channel.recv()
    _DEVICE_MAINS[kind](channel, *args)
