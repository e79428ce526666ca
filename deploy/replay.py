"""``neurohand replay``: a recording through the decoder, scored against its labels (docs/replay.md).

Two modes, one decoding:

* realtime: a virtual chip (thread, pseudo-terminal) streams the recording at
  its true rate; :func:`neurohand.deploy.session.run_on_chip` -- exactly what
  ``neurohand run`` does -- decodes it and drives a neurohand-protocol hand
  driver into a virtual hand (pseudo-terminal), which timestamps every
  command it receives.
* fast: the same stage objects in this thread on a virtual clock
  (``run_fast_replay``), half-second items; with ``jobs=2`` a child process
  computes the features one item ahead (runtime/feature_worker.py).

Scoring (identical rules for both modes).  Each command is placed on the
sample axis of the replay (0 = the first replayed sample):

* fast: the decoded window's end sample (``DecodedCommand.sample``);
* realtime: ``(t - t0) * rate`` where ``t`` is when the virtual hand received
  it and ``t0`` when the virtual chip started streaming (same process, same
  monotonic clock), so the decoding and link latency count against it (the
  frame's own wait does not: see :class:`StampedVirtualChip`).

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
"""
import os
import shutil
import tempfile
import threading
import time

import numpy as np

from neurohand.decoder import lag as lag_metric
from neurohand.firmware_bridge.shared.checks import check_number
from neurohand.firmware_bridge.shared.errors import ConfigError, NeurohandError, RecordingError, UsageError
from neurohand.firmware_bridge.virtual.chip import VirtualChip

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
    samples, positions = [], []

    def on_command(command):
        samples.append(command.sample)
        positions.append(command.positions.copy())

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
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, decoder.backend.n_outputs)
    extra = {"speed_x": document.get("speed_x"), "block_samples": block, "jobs": jobs,
             "feature_worker_dsp_s": None if worker_dsp_s is None else round(worker_dsp_s, 3)}
    return _outcome("fast", decoder, recording, replay_range, truth, np.asarray(samples, dtype=np.float64),
                    positions, wire_positions(positions), document, wall_s, extra)


def replay_realtime(decoder, recording, replay_range, config, faults=None, disconnect_after_s=None,
                    record_path=None, stats_path=None, quiet=True, install_signals=True):
    """Replay through a virtual chip and a virtual hand on pseudo-terminals, in real time.

    ``faults`` (a FaultInjector or None) and ``disconnect_after_s`` are given
    to the virtual chip.  Returns a ReplayOutcome whose commands are what the
    virtual hand received.
    """
    from neurohand.deploy.session import run_on_chip
    from neurohand.firmware_bridge.virtual.chip import RecordingSource
    from neurohand.firmware_bridge.virtual.hand import VirtualHand

    truth = _prepare(decoder, recording)
    # The run opens the chip through a symlink, as a udev name on the device: after a simulated
    # unplug the chip comes back on a new pseudo-terminal and the link follows it.
    port_dir = tempfile.mkdtemp(prefix="neurohand-replay-")
    chip_path = os.path.join(port_dir, "chip")
    chip = StampedVirtualChip(RecordingSource(recording, start_sample=replay_range.start),
                              start_sample=replay_range.start, faults=faults, disconnect_after_s=disconnect_after_s,
                              link_path=chip_path)
    stop = threading.Event()
    chip_failure = []

    def serve():
        # The chip reads the recording as it streams: a read error (a failing SD card) ends its thread,
        # and the run then only sees the data stop.  Kept, to be the command's error afterwards.
        try:
            chip.serve(stop)
        except Exception as exc:
            chip_failure.append(exc)

    serving = threading.Thread(target=serve, name="virtual-chip", daemon=True)
    hand_side = VirtualHand("neurohand")
    try:
        chip.open()
        serving.start()
        hand_side.start()
    except BaseException:
        chip.close()
        shutil.rmtree(port_dir, ignore_errors=True)
        decoder.close()
        raise
    started = time.perf_counter()
    try:
        document = run_on_chip(decoder, chip_path, "neurohand:" + hand_side.slave_path, config,
                               record_path=record_path, stats_path=stats_path, duration_s=replay_range.seconds,
                               quiet=quiet, install_signals=install_signals,
                               metadata={"replay_of": recording.path, "replay_start_sample": replay_range.start})
        wall_s = time.perf_counter() - started
        hand_side.wait_for(document["commands_sent"], HAND_DRAIN_S)
    finally:
        stop.set()
        if serving.is_alive():
            serving.join(5.0)
        chip.close()
        hand_side.stop()
        shutil.rmtree(port_dir, ignore_errors=True)
    if chip_failure:
        failure = chip_failure[0]
        if isinstance(failure, NeurohandError):
            raise failure
        raise RecordingError("the virtual chip stopped streaming {!r}: {}".format(recording.path, failure))
    everything = hand_side.received()
    if chip.stream_started_s is None:
        raise RuntimeError("the run returned but the virtual chip never started streaming")
    # The last command is the safe posture of the shutdown, sent after the run stopped.
    received = everything[:-1]
    samples = np.array([(c.t_monotonic - chip.stream_started_s) * replay_range.rate for c in received],
                       dtype=np.float64)
    positions = np.array([c.positions for c in received], dtype=np.float64).reshape(-1, decoder.backend.n_outputs)
    wire = np.array([c.raw for c in received], dtype=np.int64).reshape(-1, decoder.backend.n_outputs)
    # chip.summary(): what the chip sent, and the faults it injected (if any).
    extra = {"hand": dict(hand_side.counters), "hand_received": len(everything),
             "commands_sent": document["commands_sent"], "chip": chip.summary()}
    return _outcome("realtime", decoder, recording, replay_range, truth, samples, positions, wire, document, wall_s,
                    extra)


def _outcome(mode, decoder, recording, replay_range, truth, samples, positions, wire, document, wall_s, extra):
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
    if summary["mode"] == "fast" and summary.get("speed_x") is not None:
        lines.append("speed          {:g} x real time ({})".format(
            summary["speed_x"], "features in a second process" if summary.get("jobs", 1) >= 2 else "one process"))
    return "\n".join(lines)


# --- the virtual chip with a known stream start -----------------------------------

class StampedVirtualChip(VirtualChip):
    """A VirtualChip that remembers when its stream started: ``stream_started_s`` (its clock, time.monotonic).

    The virtual chip sends frame k at ``t0 + k * frame_period_s`` (firmware_bridge/virtual/chip.py),
    one frame period before a real chip could (it sends a frame once its last sample is measured), so
    realtime commands on this axis, and their lag, look one frame period early (docs/latency.md).
    """

    stream_started_s = None

    def _start_stream(self):
        VirtualChip._start_stream(self)
        # The pacing scheduler took its t0 from the same clock an instant before (microseconds).
        self.stream_started_s = self._clock()
