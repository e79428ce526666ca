"""Intent-to-command lag, R² and hold jitter of trained runs under post-processing variants.

For issue 18 ("cut the lag"): what the window, the stride, the training
targets (``target_lead_s``) and the post-processing each cost or save, on one
footing.  Per run and recording:

* the run's test split (or validation split, to choose settings without
  looking at the test) is decoded causally as ``neurohand evaluate`` does
  (train/evaluate.py: the device's feature stream and numpy backend, each
  segment from a zero state; for the lag each segment again from up to 3 s
  earlier);
* each variant's post-processing runs over the decoded outputs with the
  runtime's own :class:`~neurohand.deploy.runtime.postprocess.PostProcessor`
  built from a :class:`~neurohand.deploy.runtime.config.RuntimeConfig`, one
  window at a time at the stride, its state started at each segment's first
  command (:func:`post_process`);
  the variant ``raw`` is the decoder's output as ``evaluate`` scores it;
* scored as ``evaluate`` scores: mean R² per step against the scaled labels,
  ``lag_ms`` (decoder/lag.py: onset and release medians, xcorr) and its hold
  jitter.

Not modelled: the runtime's start-up hold in the safe posture (5 windows) and
its compute latency (docs/latency.md: microseconds against tens of ms).

``run(quick, options)`` (the bench target) imports NinaPro DB1 S2 E1, trains
with the trainer's defaults (``quick``: one epoch; the figures then mean
nothing) and measures the default variants; ``options.lag_runs`` (run
directories) with ``options.lag_recording`` measure existing runs instead.
For experiments::

    python -m neurohand.deploy.bench.lag --recording REC RUN_DIR [RUN_DIR ...] [--split validation]
        [--variants FILE]       FILE: JSON object {name: runtime settings or null (= raw)}

Output: ``{"runs": [{"run", "recording", "split", "pipeline": {"window_s", "stride_s"},
"training": {"target_lead_s", ...}, "variants": {name: {"settings", "mean_r2",
"onset_p50", "onset_p90", "release_p50", "release_p90", "xcorr", "xcorr_peak",
"jitter", "jitter_points", "onsets", "onsets_missed", ...}}}]}``.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from neurohand.firmware_bridge.shared.errors import UsageError

#: Post-processing variants measured by default: runtime settings over RuntimeConfig's defaults
#: (None: the decoder's raw output).  "today" is the default before issue 18 (no smoothing, slew 10/s);
#: "default" whatever config.py's defaults are now.
VARIANTS = {
    "raw": None,
    "today": {"smoothing": "exponential", "smoothing_tau_ms": 0.0, "max_slew_per_s": 10.0},
    "default": {},
    "exponential 10 ms": {"smoothing": "exponential", "smoothing_tau_ms": 10.0},
    "exponential 20 ms": {"smoothing": "exponential", "smoothing_tau_ms": 20.0},
    "one_euro 4 Hz, beta 10": {"smoothing": "one_euro", "one_euro_min_cutoff_hz": 4.0, "one_euro_beta": 10.0},
    "one_euro 4 Hz, beta 30": {"smoothing": "one_euro", "one_euro_min_cutoff_hz": 4.0, "one_euro_beta": 30.0},
    "one_euro 8 Hz, beta 30": {"smoothing": "one_euro", "one_euro_min_cutoff_hz": 8.0, "one_euro_beta": 30.0},
}
#: The figures of a variant copied from its ``lag_ms`` document.
LAG_KEYS = ("onset_p50", "onset_p90", "release_p50", "release_p90", "xcorr", "xcorr_peak", "jitter",
            "jitter_points", "onsets", "onsets_missed", "onsets_not_measured", "releases", "releases_missed",
            "movements", "reason")
SPLITS = ("test", "validation")
NINAPRO_RELATIVE = os.path.join("ninapro_db1_s2_e1", "S2_A1_E1.mat")


def post_process(outputs, config, dt_s):
    """``outputs`` (n, k) of one segment through a fresh PostProcessor of ``config`` (None: unchanged),
    its state started at the segment's first command: a device decoding without a break is there
    already, and a ramp from the open hand at every test segment would cost R² no device pays."""
    if config is None:
        return outputs
    from neurohand.deploy.runtime.postprocess import PostProcessor

    k = outputs.shape[1]
    post = PostProcessor.from_config(config, k)
    lo = np.array(config.per_finger("calibration_lo", k))
    hi = np.array(config.per_finger("calibration_hi", k))
    post.reset(np.clip((outputs[0] - lo) / (hi - lo), 0.0, 1.0))
    return np.array([post.process(row, dt_s) for row in outputs])


def variant_configs(variants):
    """{name: RuntimeConfig or None}; settings are checked as the runtime checks them."""
    from neurohand.deploy.runtime.config import RuntimeConfig

    configs = {}
    for name, settings in variants.items():
        if settings is not None and not isinstance(settings, dict):
            raise UsageError("variant {!r}: runtime settings must be an object or null, got {!r}".format(
                name, settings))
        configs[name] = None if settings is None else RuntimeConfig(**settings)
    return configs


def measure(run_dir, recording_path, variants=None, split="test", block_s=0.05):
    """One run on one recording: the document of one entry of ``runs`` (module docstring)."""
    from neurohand.firmware_bridge.shared import checks
    from neurohand.train import dataset, evaluate, metrics

    split = checks.check_option("split", split, SPLITS)
    configs = variant_configs(VARIANTS if variants is None else variants)
    config, onnx_path = evaluate.load_run(run_dir)
    pipeline, recording, (_, segments), sequences = evaluate.prepare(config, recording_path)
    block_samples = max(1, int(round(block_s * pipeline.signal_rate)))
    chosen = [s for s in segments if s.split == split]
    decoded = evaluate.stream_decode(pipeline, onnx_path, recording, chosen, block_samples)
    truth = np.concatenate([s.labels for s in sequences[split]]).astype(np.float64)
    extended = evaluate.lag_segments(recording, chosen)
    decoded_extended = evaluate.stream_decode(pipeline, onnx_path, recording, extended, block_samples)
    scaling = dataset.LabelScaling.from_config(config["labels"]["scaling"])
    dt_s = pipeline.stride_samples / float(pipeline.signal_rate)
    results = {}
    for name, runtime_config in configs.items():
        prediction = np.concatenate([post_process(o, runtime_config, dt_s) for o, _ in decoded])
        scores = metrics.score(truth, prediction)
        lag = evaluate.lag_of(recording, scaling, extended,
                              [(post_process(o, runtime_config, dt_s), ends) for o, ends in decoded_extended])
        entry = {"settings": None if runtime_config is None else variants_settings(runtime_config),
                 "mean_r2": scores["mean_r2"]}
        entry.update({key: lag.get(key) for key in LAG_KEYS})
        results[name] = entry
    settings = config["settings"]
    return metrics.json_ready({
        "run": os.path.abspath(run_dir), "recording": os.path.abspath(recording_path), "split": split,
        "pipeline": {"window_s": pipeline.window_samples / float(pipeline.signal_rate), "stride_s": dt_s},
        "training": {"target_lead_s": settings["training"].get("target_lead_s", 0.0),
                     "label_smoothing_s": settings["training"].get("label_smoothing_s", 0.0)},
        "steps": int(len(truth)), "variants": results})


def variants_settings(config):
    """The post-processing settings of a RuntimeConfig (what a variant is)."""
    names = ("smoothing", "smoothing_tau_ms", "one_euro_min_cutoff_hz", "one_euro_beta", "one_euro_d_cutoff_hz",
             "max_slew_per_s")
    return {name: getattr(config, name) for name in names}


def _train_on_ninapro(work, quick, mat_file, max_minutes):
    """Import and train with the trainer's defaults (deploy/bench/decoding.py's steps); (run_dir, recording)."""
    from neurohand.deploy.bench.decoding import json_output, neurohand_command, run_step

    recording = os.path.join(work, "ninapro.rec")
    run_step(neurohand_command("import", "ninapro", mat_file, "--out", recording), "importing NinaPro", "lag")
    run_dir = os.path.join(work, "run")
    arguments = ["train", recording, "--out", run_dir, "--seed", 0, "--quiet", "--json"]
    if quick:
        arguments += ["--epochs", 1]
    elif max_minutes is not None:
        arguments += ["--max-minutes", max_minutes]
    json_output(run_step(neurohand_command(*arguments), "training on NinaPro", "lag")[0], "neurohand train")
    return run_dir, recording


def run(quick, options=None):
    """The ``lag`` bench target (module docstring).  ``options`` attributes, each optional:
    ``lag_runs`` + ``lag_recording`` (measure these), ``ninapro`` (the .mat file), ``train_minutes``."""
    runs = getattr(options, "lag_runs", None)
    if runs:
        recording = getattr(options, "lag_recording", None)
        if not recording:
            raise UsageError("give the recording the runs are measured on")
        return {"quick": bool(quick), "runs": [measure(r, recording) for r in runs]}
    from neurohand.deploy.bench.decoding import DEFAULT_SHARED_DATA

    mat_file = getattr(options, "ninapro", None) or os.path.join(DEFAULT_SHARED_DATA, NINAPRO_RELATIVE)
    if not os.path.isfile(mat_file):
        return {"quick": bool(quick), "skipped": "{} not found (give the NinaPro DB1 S2 E1 file)".format(mat_file)}
    work = tempfile.mkdtemp(prefix="neurohand-bench-lag-")
    try:
        run_dir, recording = _train_on_ninapro(work, quick, mat_file, getattr(options, "train_minutes", None))
        entry = measure(run_dir, recording)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    entry["run"] = entry["recording"] = None     # temporary paths of the measuring machine
    entry["what"] = "NinaPro DB1 S2 E1, trainer defaults{}".format(" (quick: 1 epoch)" if quick else "")
    return {"quick": bool(quick), "runs": [entry]}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m neurohand.deploy.bench.lag",
                                     description="lag, R² and hold jitter of trained runs under post-processing "
                                                 "variants (JSON on stdout)")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--recording", required=True, metavar="REC")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--variants", metavar="FILE",
                        help="JSON object {{name: runtime settings, or null for the raw output}} (default: {})".format(
                            ", ".join(sorted(VARIANTS))))
    args = parser.parse_args(argv)
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import NeurohandError

    try:
        variants = None
        if args.variants:
            variants = checks.load_json_file(checks.check_file_exists("--variants", args.variants), "--variants")
        result = {"runs": [measure(r, args.recording, variants, args.split) for r in args.runs]}
    except NeurohandError as error:
        print("{}: error: {}".format(parser.prog, error), file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
