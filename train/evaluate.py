"""``neurohand evaluate``: score a trained run on a recording's test split, the way the device decodes.

Decoding is causal and step by step through the device's own code: the
feature pipeline rebuilt from config.json (``FeaturePipeline.from_config``)
streams each test segment block by block, and the numpy backend runs
model.onnx one feature vector at a time.  The split is planned again from the
recording with the settings stored in config.json, so it is the training
split when the recording is one the run was trained on.

Classic decoders (train/baselines.py) are fitted on the same split and the
same normalised features, and scored on the same steps.
"""
import json
import os
import time

import numpy as np

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError
from neurohand.train import baselines, dataset, metrics, splits

RUN_FORMAT = "neurohand-run"


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


def stream_decode(pipeline, onnx_path, recording, segments, block_samples):
    """Decode ``segments`` causally as the device does: stream features, step the numpy backend.

    Each segment starts a fresh stream (filter at rest) and a zero RNN state,
    as in training.  Returns a list per segment with at least one window of
    (outputs (n_windows, n_outputs) float64, ends (n_windows,) absolute sample indices)."""
    from neurohand.decoder.backends import create_backend

    backend = create_backend("numpy", onnx_path)
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
                    outputs.append(np.array(positions, dtype=np.float64))
                ends.extend(int(e) + segment.start for e in block_ends)
            if outputs:
                decoded.append((np.array(outputs), np.array(ends, dtype=np.int64)))
    finally:
        backend.close()
    return decoded


def evaluate_run(run_dir, recording_path, block_s=0.05, with_baselines=True):
    """Score a run on ``recording_path``'s test split; returns a JSON-ready dict.

    Keys: mean_r2, r2, mean_pearson_r, pearson_r, mean_rmse, rmse (per output,
    in 0..1 scaled label units), n_steps, label_names, baselines -> {wiener, kalman}
    -> the same scores, decode (backend, block size, timing), split."""
    config, onnx_path = load_run(run_dir)
    block_s = checks.check_number("--block-s", block_s, minimum=0.0, exclusive_minimum=True)
    pipeline, recording, (method, segments), sequences = prepare(config, recording_path)
    block_samples = max(1, int(round(block_s * pipeline.signal_rate)))
    test_segments = [s for s in segments if s.split == "test"]
    started = time.perf_counter()
    decoded = stream_decode(pipeline, onnx_path, recording, test_segments, block_samples)
    seconds = time.perf_counter() - started
    test = sequences["test"]
    if len(decoded) != len(test) or any(not np.array_equal(e, s.ends) for (_, e), s in zip(decoded, test)):
        # The stream and the offline transform must cut identical windows; anything else is a bug.
        raise RuntimeError("streaming windows differ from the offline windows of the same segments")
    truth = np.concatenate([s.labels for s in test]).astype(np.float64)
    prediction = np.concatenate([o for o, _ in decoded])
    result = metrics.score(truth, prediction)
    n_steps = len(prediction)
    result.update({
        "run_dir": os.path.abspath(run_dir), "recording": os.path.abspath(recording_path),
        "label_names": list(config["labels"]["names"]),
        "decode": {"backend": "numpy", "causal": True, "block_samples": block_samples,
                   "seconds": seconds, "us_per_step": 1e6 * seconds / max(n_steps, 1)},
        "split": {"method": method, "test_segments": len(test),
                  "test_seconds": sum(s.stop - s.start for s in test_segments) / pipeline.signal_rate},
        "units": "labels scaled to 0..1 as in training (config.json labels.scaling); R2 and r are unaffected",
    })
    if with_baselines:
        pairs = {name: [(s.features, s.labels) for s in sequences[name]] for name in splits.SPLIT_NAMES}
        result["baselines"] = baselines.fit_and_score(pairs["train"], pairs["validation"], pairs["test"],
                                                      config["settings"].get("baselines"))
    return metrics.json_ready(result)


def evaluate_command(args):
    return evaluate_run(args.run_dir, args.recording, block_s=args.block_s, with_baselines=not args.no_baselines)


def format_table(result):
    """Human-readable summary: one line per decoder, then R² per output."""
    def fmt(value):
        return "  n/a" if value is None else "{:6.3f}".format(value)

    lines = ["{:<10} {:>8} {:>8} {:>8}".format("decoder", "mean R2", "mean r", "RMSE")]
    rows = [("rnn", result)] + sorted((result.get("baselines") or {}).items())
    for name, scores in rows:
        lines.append("{:<10} {:>8} {:>8} {:>8}".format(name, fmt(scores["mean_r2"]), fmt(scores["mean_pearson_r"]),
                                                       fmt(scores["mean_rmse"])))
    lines.append("")
    lines.append("R2 per output (rnn): " + ", ".join(
        "{} {}".format(name, fmt(value).strip()) for name, value in zip(result["label_names"], result["r2"])))
    lines.append("{} test steps decoded causally with the numpy backend, {:.1f} us per step".format(
        result["n_steps"], result["decode"]["us_per_step"]))
    return "\n".join(lines)
