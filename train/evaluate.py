"""``neurohand evaluate``: score a trained run on a recording's test split, the way the device decodes.

Decoding is causal and step by step through the device's own code: the
feature pipeline rebuilt from config.json (``FeaturePipeline.from_config``)
streams each test segment block by block, and the numpy backend runs
model.onnx one feature vector at a time.  The split is planned again from the
recording with the settings stored in config.json, so it is the training
split when the recording is one the run was trained on.

Classic decoders (train/baselines.py) are fitted on the same split and the
same normalised features, and scored on the same steps.

The intent-to-command lag (``lag_ms``, decoder/lag.py, docs/latency.md) is
measured per test segment on a 1 ms grid: each decoded step held from its
window's end until the next, against the label stream scaled as in training.
A test segment can start at its movement (a NinaPro test repetition does),
where a decoder started afresh has no output yet; so for the lag, and only
for it, each segment is decoded again from up to :data:`LAG_PREROLL_S`
earlier, as the device decodes without a break.  That signal is rest
belonging to the repetition before; its labels are used only for the
movement's rest level.

Several recordings (``neurohand evaluate RUN REC [REC ...]``) are scored one
by one, each on its own test split, and summarised in the terms of FALCON
(Karpowicz et al. 2024, "Few-shot algorithms for consistent neural decoding"):
**held-in** sessions are those the run trained on (or the run it was
initialised from with ``--init-from``), recognised by the SHA-256 of the
recording file that config.json keeps (by path for runs made before it kept
them); **held-out** sessions are the others.  Per session: R² mean and its
spread over the outputs; per group: the mean over sessions and their spread.
"""
import json
import os
import time

import numpy as np

from neurohand.decoder import lag as lag_metric
from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.digest import sha256_of
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError
from neurohand.train import baselines, dataset, metrics, splits

RUN_FORMAT = "neurohand-run"
#: Signal decoded before each test segment for the lag: the rest before a movement the segment starts
#: with, so the decoder is running, and the rest level known, when the movement begins.
LAG_PREROLL_S = 3.0


def load_run(run_dir):
    """config.json of a run directory (validated) and the path of its model.onnx."""
    run_dir = checks.check_dir_exists("RUN_DIR", run_dir)
    path = os.path.join(run_dir, "config.json")
    onnx_path = os.path.join(run_dir, "model.onnx")
    for required in (path, onnx_path):
        if not os.path.isfile(required):
            raise UsageError("{!r} is not a finished training run: {} is missing".format(
                run_dir, os.path.basename(required)))
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except ValueError as exc:
        raise ConfigError("{}: not valid JSON: {}".format(path, exc)) from exc
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise ConfigError("{} is not a neurohand run config".format(path))
    for key in ("pipeline", "labels", "split", "settings"):
        if key not in config:
            raise ConfigError("{} lacks {!r}".format(path, key))
    return config, onnx_path


def prepare(config, recording_path):
    """Pipeline, recording, split plan and offline sequences of ``recording_path`` for a run's config."""
    from neurohand.decoder.pipeline import FeaturePipeline

    pipeline = FeaturePipeline.from_config(config["pipeline"], where="config.json pipeline")
    recording = dataset.load_recording(checks.check_file_exists("recording", recording_path),
                                       config["labels"]["stream"])
    if recording.signal_rate != pipeline.signal_rate or len(recording.channel_names) != pipeline.n_channels:
        raise UsageError("{}: {} channels at {} Hz, but the run was trained on {} channels at {} Hz".format(
            recording_path, len(recording.channel_names), recording.signal_rate, pipeline.n_channels,
            pipeline.signal_rate))
    if list(recording.labels.names) != list(config["labels"]["names"]):
        raise UsageError("{}: label stream {!r} has columns {}, but the run decodes {}".format(
            recording_path, recording.labels.name, recording.labels.names, config["labels"]["names"]))
    split = config["split"]
    plan = splits.plan_split(recording.n_samples, recording.events, split["settings"], split["guard_samples"],
                             source=recording_path)
    scaling = dataset.LabelScaling.from_config(config["labels"]["scaling"])
    sequences, _ = dataset.build_sequences(pipeline, [recording], [plan], fit=False, label_scaling=scaling)
    return pipeline, recording, plan, sequences


def stream_decode_outputs(pipeline, onnx_path, recording, segments, block_samples):
    """:func:`stream_decode` with the whole output: a class head's scores after the positions."""
    return _stream_decode(pipeline, onnx_path, recording, segments, block_samples, True)


def stream_decode(pipeline, onnx_path, recording, segments, block_samples, class_scores=False):
    """Decode ``segments`` causally as the device does: stream features, step the numpy backend.

    Each segment starts a fresh stream (filter at rest) and a zero RNN state,
    as in training.  Returns a list per segment with at least one window of
    (outputs (n_windows, n_positions) float64, ends (n_windows,) absolute sample indices);
    ``class_scores``: the outputs hold a class head's scores after the positions (the whole output)."""
    return _stream_decode(pipeline, onnx_path, recording, segments, block_samples, class_scores)


def _stream_decode(pipeline, onnx_path, recording, segments, block_samples, class_scores):
    from neurohand.decoder.backends import create_backend

    backend = create_backend("numpy", onnx_path)
    width = backend.n_outputs if class_scores else backend.n_positions
    decoded = []
    try:
        for segment in segments:
            stream = pipeline.stream()
            state = backend.initial_state()
            outputs, ends = [], []
            for start in range(segment.start, segment.stop, block_samples):
                block = recording.signals[start:min(start + block_samples, segment.stop)]
                features, block_ends = stream.push(block)
                for row in features:
                    positions, state = backend.step(row.astype(np.float32), state)
                    outputs.append(np.array(positions, dtype=np.float64)[:width])
                ends.extend(int(e) + segment.start for e in block_ends)
            if outputs:
                decoded.append((np.array(outputs), np.array(ends, dtype=np.int64)))
    finally:
        backend.close()
    return decoded


def truth_on_grid(recording, scaling, positions):
    """Scaled labels in force at sample positions (a position ``e`` means just after sample e - 1,
    the rule for window ends in training), shape (len(positions), n_outputs)."""
    labels = recording.labels
    rows = np.floor((np.asarray(positions, dtype=np.float64) - 1.0) / recording.signal_rate * float(labels.rate)
                    + 1e-9).astype(np.int64)
    return scaling.apply(np.asarray(labels.data, dtype=np.float64)[np.clip(rows, 0, len(labels.data) - 1)])


def lag_segments(recording, test_segments):
    """The test segments, each begun up to LAG_PREROLL_S earlier (see the module's docstring)."""
    preroll = int(round(LAG_PREROLL_S * recording.signal_rate))
    return [splits.Segment(max(0, s.start - preroll), s.stop, s.split) for s in test_segments]


def lag_of(recording, scaling, segments, decoded, step_ms=lag_metric.GRID_MS):
    """``lag_ms`` of decoded segments: ``decoded`` a list of (outputs, ends) per segment of
    ``segments`` that holds windows (as from :func:`stream_decode`)."""
    step = recording.signal_rate * step_ms / 1000.0
    pieces = []
    for outputs, ends in decoded:
        segment = next(s for s in segments if s.start < ends[0] <= s.stop)
        grid = segment.start + step * np.arange(int((segment.stop - segment.start) // step))
        movements = lag_metric.movements_from_events(recording.events, segment.start, step)
        pieces.append((truth_on_grid(recording, scaling, grid), lag_metric.hold(ends, outputs, grid), movements))
    return lag_metric.lag_summary(pieces, step_ms)


def baseline_lags(pipeline, recording, scaling, segments, decoders):
    """``lag_ms`` of each fitted baseline (the decoders ``baselines.fit_and_score`` scored) on ``segments``."""
    from neurohand.train.dataset import segment_windows

    windows = [w for w in (segment_windows(pipeline, recording, s) for s in segments) if w is not None and len(w[1])]
    result = {}
    for name, decoder in decoders.items():
        decoded = [(decoder.predict(pipeline.normalise(f).astype(np.float32)), ends) for f, ends in windows]
        result[name] = lag_of(recording, scaling, segments, decoded)
    return result


def evaluate_run(run_dir, recording_path, block_s=0.05, with_baselines=True, with_tcn=False, threads=1):
    """Score a run on ``recording_path``'s test split; returns a JSON-ready dict.

    Keys: mean_r2, r2, mean_pearson_r, pearson_r, mean_rmse, rmse (per output,
    in 0..1 scaled label units), n_steps, label_names, classes (a run with a class head:
    :func:`score_class_head`), baselines -> {wiener, kalman, and tcn when
    ``with_tcn``} -> the same scores, and {lda, lda_td} -> movement-class scores (accuracy,
    balanced_accuracy, confusion, per-trial accuracy; train/classes.py) where the recording has
    movement events, decode (backend, block size, timing), split, held_in (see :func:`held_in`)."""
    config, onnx_path = load_run(run_dir)
    block_s = checks.check_number("--block-s", block_s, minimum=0.0, exclusive_minimum=True)
    pipeline, recording, (method, segments), sequences = prepare(config, recording_path)
    block_samples = max(1, int(round(block_s * pipeline.signal_rate)))
    test_segments = [s for s in segments if s.split == "test"]
    started = time.perf_counter()
    class_head = class_head_of(config)
    if class_head is None:
        decoded = stream_decode(pipeline, onnx_path, recording, test_segments, block_samples)
    else:
        decoded = stream_decode_outputs(pipeline, onnx_path, recording, test_segments, block_samples)
    seconds = time.perf_counter() - started
    test = sequences["test"]
    if len(decoded) != len(test) or any(not np.array_equal(e, s.ends) for (_, e), s in zip(decoded, test)):
        # The stream and the offline transform must cut identical windows; anything else is a bug.
        raise RuntimeError("streaming windows differ from the offline windows of the same segments")
    n_positions = len(config["labels"]["names"])
    truth = np.concatenate([s.labels for s in test]).astype(np.float64)
    prediction = np.concatenate([o[:, :n_positions] for o, _ in decoded])
    result = metrics.score(truth, prediction)
    scaling = dataset.LabelScaling.from_config(config["labels"]["scaling"])
    extended = lag_segments(recording, test_segments)
    result["lag_ms"] = lag_of(recording, scaling, extended,
                              stream_decode(pipeline, onnx_path, recording, extended, block_samples))
    if class_head is not None:
        result["classes"] = score_class_head(class_head, recording, decoded, n_positions,
                                             dataset.steps_per_second(pipeline))
    n_steps = len(prediction)
    result.update({
        "run_dir": os.path.abspath(run_dir), "recording": os.path.abspath(recording_path),
        "held_in": held_in(config, recording_path),
        "label_names": list(config["labels"]["names"]),
        "decode": {"backend": "numpy", "causal": True, "block_samples": block_samples,
                   "seconds": seconds, "us_per_step": 1e6 * seconds / max(n_steps, 1)},
        "split": {"method": method, "test_segments": len(test),
                  "test_seconds": sum(s.stop - s.start for s in test_segments) / pipeline.signal_rate},
        "units": "labels scaled to 0..1 as in training (config.json labels.scaling); R2 and r are unaffected",
    })
    if with_baselines:
        from neurohand.train import classes
        pairs = {name: [(s.features, s.labels) for s in sequences[name]] for name in splits.SPLIT_NAMES}
        fitted = {}
        settings = dict(config["settings"].get("baselines") or {})
        names = tuple(baselines.BASELINES)
        if with_tcn:
            # The TCN trains for minutes on the run's own budget and recipe: only when asked for.
            from neurohand.train import tcn
            names = baselines.ALL_BASELINES
            settings["tcn"] = dict(tcn.settings_from_run(config["settings"], config.get("seed", 0),
                                                         dataset.steps_per_second(pipeline), threads),
                                   **settings.get("tcn", {}))
        result["baselines"] = baselines.fit_and_score(pairs["train"], pairs["validation"], pairs["test"],
                                                      settings, decoders=fitted, names=names)
        for name, lag in baseline_lags(pipeline, recording, scaling, extended, fitted).items():
            result["baselines"][name]["lag_ms"] = lag
        # Movement classes from the recording's movement events (rest counts), on the same windows.
        result["baselines"].update(classes.lda_baselines(recording, (method, segments), sequences,
                                                         config["settings"]["pipeline"],
                                                         dataset.steps_per_second(pipeline)))
    return metrics.json_ready(result)


def class_head_of(config):
    """The run's dataset.ClassHead (config.json "classes"), None for a run without one (or from before)."""
    classes = config.get("classes")
    if not classes:
        return None
    head = dataset.ClassHead.from_config(classes)
    if list(config.get("model", {}).get("class_names") or []) != head.names:
        raise ConfigError("config.json: classes names {} differ from the model's class_names {}".format(
            head.names, config.get("model", {}).get("class_names")))
    return head


def score_class_head(head, recording, decoded, n_positions, steps_per_s, delay_s=None):
    """The class head's measures on the decoded test segments (train/classes.py score_classes).

    decoded : [(outputs (n_steps, n_positions + n_classes), ends)] per segment, as stream_decode gives
    them; the decided class is the argmax of the class scores, the true one the movement in force at the
    window's last sample.  Steps of a movement the head does not know stay in the measures (as a true class
    it can never decide).  Adds "recall_by_class" (name -> recall) and "class_names" in the head's names."""
    from neurohand.train import classes

    values = np.asarray(head.values, dtype=np.int64)
    truth = [dataset.step_values(recording, ends) for _, ends in decoded]
    decided = [values[np.argmax(outputs[:, n_positions:], axis=1)] for outputs, _ in decoded]
    unknown = sorted(set(np.concatenate(truth).tolist()) - set(head.values)) if truth else []
    order = list(head.values) + unknown
    result = classes.score_classes(truth, decided, steps_per_s, np.asarray(order, dtype=np.int64),
                                   classes.DEFAULT_DELAY_S if delay_s is None else delay_s)
    result["class_names"] = list(head.names) + classes.class_names(unknown)
    result["recall_by_class"] = dict(zip(result["class_names"], result["recall"]))
    result["unknown_classes"] = unknown
    return result


def write_confusion_png(result, path, title=""):
    """The class head's confusion matrix as a PNG at ``path`` (train/classes.py plot_confusion);
    returns the path, or None where matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    from neurohand.train import classes

    scores = result["classes"]
    classes.plot_confusion(path, scores["confusion"], scores["class_names"], title=title or (
        "class head, test: accuracy {:.3f}, balanced accuracy {:.3f}".format(
            scores["accuracy"], scores["balanced_accuracy"])))
    return path


def evaluate_command(args):
    """One recording: :func:`evaluate_run`'s dict (as before); several: :func:`evaluate_sessions`'s."""
    recordings = list(args.recordings)
    if getattr(args, "tcn", False) and len(recordings) > 1:
        raise UsageError("--tcn trains a baseline for minutes per recording: give one recording with it")
    confusion_png = getattr(args, "confusion_png", None)
    if confusion_png is not None:
        if len(recordings) > 1:
            raise UsageError("--confusion-png plots one recording's test split: give one recording with it")
        from neurohand.firmware_bridge.shared.outputs import check_output_path
        config, onnx_path = load_run(args.run_dir)
        if class_head_of(config) is None:
            raise UsageError("--confusion-png: the run {!r} has no class head (training class_head)".format(
                args.run_dir))
        # Replacing an earlier plot is this option's job; an input (the run's files, the recording) never.
        inputs = [os.path.join(args.run_dir, name) for name in os.listdir(args.run_dir)] + recordings
        confusion_png = check_output_path("--confusion-png", confusion_png, inputs=inputs, force=True)
    if len(recordings) == 1:
        result = evaluate_run(args.run_dir, recordings[0], block_s=args.block_s,
                              with_baselines=not args.no_baselines, with_tcn=getattr(args, "tcn", False))
        if confusion_png is not None:
            written = write_confusion_png(result, confusion_png)
            result["confusion_png"] = written
            if written is None:
                result["confusion_png_reason"] = "matplotlib is not installed"
        return result
    return evaluate_sessions(args.run_dir, recordings, block_s=args.block_s, with_baselines=not args.no_baselines)


def held_in(config, recording_path):
    """Whether the run (or the run it was fine-tuned from) trained on ``recording_path``.

    By the SHA-256 of the file where config.json keeps them, else (older runs) by the real path."""
    digests = list(config.get("recordings_sha256") or []) + list(
        (config.get("init_from") or {}).get("recordings_sha256") or [])
    if config.get("recordings_sha256") is not None:
        return sha256_of(recording_path) in digests
    return os.path.realpath(recording_path) in [os.path.realpath(p) for p in config.get("recordings") or []]


def _spread(values):
    """Population SD of the finite values, None where there are none."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(np.std(values)) if values.size else None


def session_summary(results):
    """The FALCON-style summary of per-recording results (each with ``held_in``)."""
    rows = []
    for result in results:
        rows.append({"recording": result["recording"], "held_in": result["held_in"], "mean_r2": result["mean_r2"],
                     "r2_sd_over_outputs": _spread(result["r2"]), "mean_pearson_r": result["mean_pearson_r"],
                     "n_steps": result["n_steps"]})
    summary = {"sessions": rows}
    for group, flag in (("held_in", True), ("held_out", False)):
        mine = [row for row in rows if row["held_in"] is flag]
        values = [row["mean_r2"] for row in mine if row["mean_r2"] is not None]
        summary[group] = {"n_sessions": len(mine),
                          "mean_r2": float(np.mean(values)) if values else None,
                          "r2_sd_over_sessions": _spread(values),
                          "mean_r2_sd_over_outputs": (float(np.mean([r["r2_sd_over_outputs"] for r in mine
                                                                      if r["r2_sd_over_outputs"] is not None]))
                                                      if any(r["r2_sd_over_outputs"] is not None for r in mine)
                                                      else None)}
    return metrics.json_ready(summary)


def evaluate_sessions(run_dir, recording_paths, block_s=0.05, with_baselines=True):
    """Score a run on several recordings (sessions), each on its own test split.

    Returns {"recordings": [evaluate_run's dict + "held_in", one per recording], "sessions":
    :func:`session_summary`}."""
    load_run(run_dir)
    for path in recording_paths:
        checks.check_file_exists("recording", path)
    results = [evaluate_run(run_dir, path, block_s=block_s, with_baselines=with_baselines) for path in recording_paths]
    return {"recordings": results, "sessions": session_summary(results)}


def format_sessions_table(result):
    """Human-readable summary of :func:`evaluate_sessions`: one line per session, then held-in and held-out."""
    def fmt(value):
        return "  n/a" if value is None else "{:6.3f}".format(value)

    sessions = result["sessions"]
    width = max([len("recording")] + [len(os.path.basename(r["recording"])) for r in sessions["sessions"]])
    lines = ["{:<{w}} {:<9} {:>8} {:>10} {:>8} {:>7}".format("recording", "session", "mean R2", "R2 sd out",
                                                               "mean r", "steps", w=width)]
    for row in sessions["sessions"]:
        lines.append("{:<{w}} {:<9} {:>8} {:>10} {:>8} {:>7}".format(
            os.path.basename(row["recording"]), "held-in" if row["held_in"] else "held-out", fmt(row["mean_r2"]),
            fmt(row["r2_sd_over_outputs"]), fmt(row["mean_pearson_r"]), row["n_steps"], w=width))
    lines.append("")
    for group, name in (("held_in", "held-in"), ("held_out", "held-out")):
        summary = sessions[group]
        if not summary["n_sessions"]:
            lines.append("{}: no session".format(name))
            continue
        lines.append("{}: {} session{}, mean R2 {} (sd {} over sessions, mean sd {} over outputs)".format(
            name, summary["n_sessions"], "" if summary["n_sessions"] == 1 else "s", fmt(summary["mean_r2"]).strip(),
            fmt(summary["r2_sd_over_sessions"]).strip(), fmt(summary["mean_r2_sd_over_outputs"]).strip()))
    lines.append("each recording scored on its test split (the run's split settings), decoded causally with the "
                 "numpy backend; R2 per output and the baselines: --json")
    return "\n".join(lines)


def format_table(result):
    """Human-readable summary: one line per decoder, then R² per output."""
    def fmt(value):
        return "  n/a" if value is None else "{:6.3f}".format(value)

    def ms(lag, key):
        value = (lag or {}).get(key)
        return "n/a" if value is None else "{:+.0f}".format(value)

    lines = ["{:<10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}".format(
        "decoder", "mean R2", "mean r", "RMSE", "onset ms", "p90 ms", "release", "xcorr")]
    rows = [("rnn", result)] + sorted((name, scores) for name, scores in (result.get("baselines") or {}).items()
                                      if "mean_r2" in scores)
    for name, scores in rows:
        lag = scores.get("lag_ms")
        lines.append("{:<10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}".format(
            name, fmt(scores["mean_r2"]), fmt(scores["mean_pearson_r"]), fmt(scores["mean_rmse"]),
            ms(lag, "onset_p50"), ms(lag, "onset_p90"), ms(lag, "release_p50"), ms(lag, "xcorr")))
    lines.append("")
    lines.append("R2 per output (rnn): " + ", ".join(
        "{} {}".format(name, fmt(value).strip()) for name, value in zip(result["label_names"], result["r2"])))
    lines.append("{} test steps decoded causally with the numpy backend, {:.1f} us per step".format(
        result["n_steps"], result["decode"]["us_per_step"]))
    class_rows = ([("rnn", result["classes"])] if result.get("classes") else []) + sorted(
        (name, scores) for name, scores in (result.get("baselines") or {}).items() if "balanced_accuracy" in scores)
    for name, scores in class_rows:
        if "balanced_accuracy" in scores:
            lines.append("movement classes, {} ({} classes): accuracy {:.3f}, balanced accuracy {:.3f}, "
                         "{} movement trials right {}".format(
                             name, len(scores["classes"]), scores["accuracy"], scores["balanced_accuracy"],
                             scores["trials"], fmt(scores["trial_accuracy"]).strip()))
    lag = result.get("lag_ms")
    if lag is not None:
        lines.append("lag (rnn, ms, + = late, at {:g} of each movement): {} onsets ({} missed, {} not measured), "
                     "{} releases ({} missed){}".format(
                         lag["threshold"], lag["onsets"], lag["onsets_missed"], lag["onsets_not_measured"],
                         lag["releases"], lag["releases_missed"],
                         "; " + lag["reason"] if lag.get("reason") else ""))
        if lag.get("jitter") is not None:
            lines.append("hold jitter (rnn): {:.2f} thousandths of the range (RMS second difference while the true "
                         "trajectory is still; docs/latency.md)".format(1000.0 * lag["jitter"]))
    return "\n".join(lines)
