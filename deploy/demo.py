"""``neurohand demo``: the whole pipeline on simulated data, with no hardware, in a few minutes.

Stages (each prints one progress line)::

    simulate   one session of train + held-out seconds (one simulated patient), cut in two recordings
    collect    a few seconds of the training recording played at once by a virtual chip and a virtual
               glove, recorded by 'neurohand collect''s loop; checked to be a recording train accepts
    train      'neurohand train' defaults for raw data on the first part, within a time budget
    bundle     the run as a verified bundle (golden vectors)
    selftest   the chosen backend against the golden vectors
    evaluate   the run on the training recording's test split, with the Wiener and Kalman baselines and
               the movement-class LDA
    replay     the held-out part in real time: virtual chip -> 'neurohand run' loop -> virtual hand
    report     summary table, summary.json, decoded.png, latency.png, training-report.png, and
               confusion.png where the decoder has a movement-class head

The held-out recording is the continuation of the training session (same
simulated nerve and electrodes, later in time), not another seed: a new seed
draws another patient's nerve fibres, and a decoder is trained per patient.

Workstation only (training needs torch); the helpers :func:`write_session_parts`
and :func:`hand_delays` are numpy-only.
"""
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError

MARKER = ".neurohand-demo"
TRAIN_RECORDING = "train.nhr"
HELDOUT_RECORDING = "heldout.nhr"
RUN_DIR = "run"
BUNDLE_DIR = "bundle"
SUMMARY_JSON = "summary.json"
DECODED_PNG = "decoded.png"
LATENCY_PNG = "latency.png"
TRAINING_REPORT_PNG = "training-report.png"
CONFUSION_PNG = "confusion.png"
REPLAY_STATS_JSON = "replay-stats.json"
COLLECTED_RECORDING = "collected.nh"        # the name collect.rig.collect_simulated writes
COLLECTED_QUALITY = "collected.quality.txt"
STAGES = 7


# --- simulated session ------------------------------------------------------------

def write_session_parts(config, parts, block_seconds=1.0):
    """Simulate one session and write consecutive parts of it as separate recordings.

    config : SimulatorConfig of the whole session (its seed draws the patient)
    parts : list of (path, start_s, stop_s); cut on label rows (multiples of 10 ms)
    Each part has the signals, the "fingers" labels and the events of its
    span, on its own time axis (sample 0 = start_s), and the simulator's
    metadata with ``session_part`` telling where it was cut.
    """
    from neurohand.firmware_bridge.recording.file_format import RecordingWriter
    from neurohand.firmware_bridge.virtual.simulator import (
        LABEL_RATE, LABEL_STREAM, SCALE_UV, NerveSimulator, channel_names)
    from neurohand.firmware_bridge.virtual.movements import FINGERS

    per_row = config.rate / LABEL_RATE
    if abs(per_row - round(per_row)) > 1e-9:
        raise UsageError("the rate {:g} Hz must be a multiple of the label rate {:g} Hz to cut a session".format(
            config.rate, LABEL_RATE))
    per_row = int(round(per_row))
    simulator = NerveSimulator.from_config(config)
    events = simulator.events()
    block = max(int(round(block_seconds * config.rate)), 1)
    for path, start_s, stop_s in parts:
        start = int(round(start_s * LABEL_RATE)) * per_row
        stop = min(int(round(stop_s * LABEL_RATE)) * per_row, config.n_samples)
        if not 0 <= start < stop:
            raise UsageError("session part {!r} [{} s, {} s) is empty or outside the {:g} s session".format(
                path, start_s, stop_s, config.seconds))
        metadata = simulator.metadata()
        metadata["session_part"] = {"start_sample": start, "stop_sample": stop,
                                    "session_seconds": config.seconds}
        with RecordingWriter(path, signal_rate=config.rate, channel_names=channel_names(config.n_channels),
                             dtype="int16", scale_uv=[SCALE_UV] * config.n_channels, metadata=metadata,
                             label_streams={LABEL_STREAM: {"rate": LABEL_RATE, "names": list(FINGERS)}}) as writer:
            for first in range(start, stop, block):
                last = min(first + block, stop)
                writer.append_signals(simulator.signals(first, last))
                row0, row1 = simulator.label_range(first, last)
                writer.append_labels(LABEL_STREAM, simulator.labels(row0, row1))
            for sample, kind, value in events:
                if start <= sample < stop:
                    writer.add_event(sample - start, kind, value=value)


# --- latency as the hand saw it ------------------------------------------------------

def hand_delays(samples, rate, stride_samples, samples_per_frame):
    """Delay (s) from the chip sending the frame that completed a window to the hand receiving its command.

    samples : (n,) float, each received command's position since the stream
    started, ``(t - t0) * rate``.  Frame k (samples [k*spf, (k+1)*spf)) is
    sent at ``k * spf / rate``; a command is attributed to the newest window
    whose last frame was sent before it arrived, which is exact while the
    delay stays under one stride.
    """
    samples = np.asarray(samples, dtype=np.float64)
    # The frame holding a window's last sample e - 1 is sent at floor((e - 1) / spf) * spf.
    sent_by_then = np.floor(samples / samples_per_frame) * samples_per_frame + samples_per_frame
    window_end = np.floor(sent_by_then / stride_samples) * stride_samples
    frame_sent = np.floor((window_end - 1) / samples_per_frame) * samples_per_frame
    return (samples - frame_sent) / float(rate)


# --- the demo -----------------------------------------------------------------------

class _Progress(object):
    def __init__(self, stream):
        self.stream = stream
        self.started = time.perf_counter()
        self.stage_seconds = {}
        self._stage = None
        self._stage_started = None

    def start(self, index, name, text):
        self._stage, self._stage_started = name, time.perf_counter()
        print("[{}/{}] {} ...".format(index, STAGES, text), file=self.stream, flush=True)

    def done(self, text):
        seconds = time.perf_counter() - self._stage_started
        self.stage_seconds[self._stage] = round(seconds, 2)
        print("      {} ({:.1f} s)".format(text, seconds), file=self.stream, flush=True)


def prepare_out_dir(out):
    """Check ``out`` before any stage runs; return ``(absolute out, whether an earlier demo is there)``.

    ``out`` may be new, an empty folder or an earlier demo's folder (it holds
    the MARKER file); anything else is refused in one line, and so are a
    symlink, a path no folder can be made at (``/proc/x``, a read-only or
    missing parent, an empty string) and a file.  Nothing is created here.
    """
    from neurohand.firmware_bridge.shared.outputs import check_output_path
    if isinstance(out, str) and out.strip() and "\x00" not in out:
        if os.path.islink(out):
            raise UsageError("--out {!r} is a symlink; give the folder itself".format(out))
        if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
            raise UsageError("--out {!r} exists and is not an earlier demo's folder; choose another "
                             "--out or remove it".format(out))
    # force: an earlier demo's folder is this command's to replace (checked above).
    absolute = check_output_path("--out", out, directory=True, force=True)
    earlier = os.path.isdir(absolute) and bool(os.listdir(absolute))
    return absolute, earlier


@contextlib.contextmanager
def demo_folder(out):
    """Yield the absolute ``out``, empty but for the MARKER, for the stages to fill.

    An earlier demo's folder there is not removed when the new demo starts but
    moved aside (``.NAME.previous-XXXX`` beside it) and deleted only when the
    block succeeds; if it fails or is interrupted (Ctrl-C), the partial new
    folder is deleted and the earlier one put back.  With no earlier demo, a
    failed demo's partial folder stays for inspection (the next demo replaces it).
    """
    out, earlier = prepare_out_dir(out)
    parent, name = os.path.split(out)
    aside = None
    if earlier:
        aside = tempfile.mkdtemp(prefix=".{}.previous-".format(name), dir=parent)
        os.rename(out, os.path.join(aside, name))
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, MARKER), "w", encoding="utf-8") as handle:
            handle.write("written by 'neurohand demo'; the next demo with this --out replaces the folder\n")
        yield out
    except BaseException:
        if aside is not None:
            shutil.rmtree(out, ignore_errors=True)
            os.rename(os.path.join(aside, name), out)
            os.rmdir(aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def demo_command(args):
    """Handler of ``neurohand demo``."""
    from neurohand.firmware_bridge.shared import checks
    settings = {
        "seed": checks.check_int("--seed", args.seed, minimum=0),
        "difficulty": checks.check_option("--difficulty", getattr(args, "difficulty", "realistic"),
                                          ("realistic", "easy")),
        "max_minutes": checks.check_number("--max-minutes", args.max_minutes, minimum=0.0, exclusive_minimum=True),
        "train_seconds": checks.check_number("--train-seconds", args.train_seconds, minimum=10.0),
        "heldout_seconds": checks.check_number("--heldout-seconds", args.heldout_seconds, minimum=3.0),
        "replay_seconds": checks.check_number("--replay-seconds", args.replay_seconds, minimum=2.0),
        "channels": checks.check_int("--channels", args.channels, minimum=1, maximum=64),
        "rate": checks.check_number("--rate", args.rate, minimum=1000.0, maximum=30000.0),
        "epochs": None if args.epochs is None else checks.check_int("--epochs", args.epochs, minimum=1),
        "backend": args.backend,
        "baselines": not args.no_baselines,
    }
    from neurohand.deploy.replay import REALTIME_MARGIN_S
    if settings["replay_seconds"] > settings["heldout_seconds"] - REALTIME_MARGIN_S:
        raise UsageError("the replay ({:g} s) must be at least {:g} s shorter than the held-out recording "
                         "({:g} s)".format(settings["replay_seconds"], REALTIME_MARGIN_S,
                                           settings["heldout_seconds"]))
    prepare_out_dir(args.out)       # before torch loads: a bad --out is a one-line error at once
    summary = run_demo(args.out, settings)
    print(format_demo_table(summary))
    return 0


def run_demo(out, settings, stream=sys.stderr):
    """Run every stage into folder ``out``; return the summary (also written to summary.json)."""
    _require_torch()
    with demo_folder(out) as out:
        progress = _Progress(stream)
        paths = {name: os.path.join(out, name)
                 for name in (TRAIN_RECORDING, HELDOUT_RECORDING, RUN_DIR, BUNDLE_DIR)}

        _simulate_stage(progress, paths, settings)
        collected = _collect_stage(progress, out, paths)
        training = _train_stage(progress, out, paths, settings)
        _bundle_stage(progress, paths)
        selftest = _selftest_stage(progress, paths, settings)
        evaluation = _evaluate_stage(progress, paths, settings)
        replayed = _replay_stage(progress, out, paths, settings)

        _write_plots(out, replayed, evaluation)
        summary = _summarize(out, settings, progress, collected, training, selftest, evaluation, replayed)
        _write_summary(out, summary)
    return summary


def _require_torch():
    try:
        import torch  # noqa: F401  (only to fail early and clearly)
    except ImportError as exc:
        raise UsageError("the demo trains a decoder and needs the workstation install "
                         "(pip install 'neurohand[train]'): {}".format(exc)) from exc


def _simulate_stage(progress, paths, settings):
    """Stage 1: one simulated session, written as the training and the held-out recording."""
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig
    total = settings["train_seconds"] + settings["heldout_seconds"]
    progress.start(1, "simulate", "simulating a {:g} s session ({} channels, {:g} kHz, seed {}, difficulty {}): "
                   "{:g} s to train on, the next {:g} s held out".format(
                       total, settings["channels"], settings["rate"] / 1000.0, settings["seed"],
                       settings["difficulty"], settings["train_seconds"], settings["heldout_seconds"]))
    session = SimulatorConfig(total, n_channels=settings["channels"], rate=settings["rate"], seed=settings["seed"],
                              difficulty=settings["difficulty"])
    write_session_parts(session, [(paths[TRAIN_RECORDING], 0.0, settings["train_seconds"]),
                                  (paths[HELDOUT_RECORDING], settings["train_seconds"], total)])
    progress.done("wrote {} and {}".format(TRAIN_RECORDING, HELDOUT_RECORDING))


#: The collect stage's protocol: the paper's first two movements, twice each (7.5 s recorded); the
#: virtual devices start collect.rig.START_DELAY_S after launch, so the stage takes about 12 s.
COLLECT_MOVEMENTS, COLLECT_REPETITIONS = 2, 2
COLLECT_HOLD_S, COLLECT_REST_S, COLLECT_LEAD_IN_S = 1.0, 0.75, 0.5


def collect_protocol():
    """The short protocol the demo collects with (a Protocol)."""
    from neurohand.deploy.collect.protocol import Protocol, load_protocol
    config = load_protocol("paper").to_config()
    config.update(name="demo", movements=config["movements"][:COLLECT_MOVEMENTS], repetitions=COLLECT_REPETITIONS,
                  hold_s=COLLECT_HOLD_S, rest_s=COLLECT_REST_S, lead_in_s=COLLECT_LEAD_IN_S, order="fixed")
    return Protocol.from_config(config, "the demo's collect protocol")


def _collect_stage(progress, out, paths):
    """Stage 2: the start of the training recording played at once by ``neurohand virtual-chip`` and
    ``virtual-glove`` and recorded by ``neurohand collect``'s loop (collect.rig.collect_simulated: no
    display, the virtual glove's stored calibration), its quality report written; return its figures.

    Only shown: training uses the simulated recording, whose labels are the truth the collected
    ones approximate (docs/collect.md; ``neurohand bench collect`` compares the two)."""
    from neurohand.deploy.collect import quality, rig
    from neurohand.firmware_bridge.shared.atomic import write_atomic
    protocol = collect_protocol()
    seconds = protocol.lead_in_s + protocol.n_trials * (protocol.hold_s + protocol.rest_s)
    progress.start(2, "collect", "collecting {:g} s of {} in real time: virtual chip + virtual glove -> "
                   "'neurohand collect' (stored glove calibration, no display)".format(seconds, TRAIN_RECORDING))
    try:
        path, outcome, session, _ = rig.collect_simulated(out, paths[TRAIN_RECORDING], protocol)
    except RuntimeError as exc:
        raise RecordingError("the demo's collect stage failed: {}".format(exc)) from exc
    alignment, _, identical = rig.alignment_error(session, path, paths[TRAIN_RECORDING])
    report = quality.analyse(path, outcome.counters, outcome.trials_total, outcome.done_before)
    write_atomic(os.path.join(out, COLLECTED_QUALITY), quality.format_text(report))
    accepted = train_accepts(path)
    counters = outcome.counters
    collected = {"file": os.path.basename(path), "seconds": round(outcome.samples / float(outcome.signal_rate), 3),
                 "trials": len(outcome.trials_done), "signal_identical": bool(identical),
                 "chip_frames_lost": counters.get("chip_parser_frames_missing"),
                 "chip_samples_missing": counters.get("chip_samples_missing"),
                 "glove_samples_lost": counters.get("glove_sequence_lost"),
                 "glove_rows_held": counters.get("glove_rows_held"),
                 "alignment_ms": alignment, "unusable": report["unusable"], "train_accepts": accepted,
                 "quality_report": COLLECTED_QUALITY}
    progress.done(format_collect_line(collected))
    return collected


def train_accepts(path):
    """What ``neurohand train`` reads of the recording at ``path`` (its default label stream, the events
    its repetition split uses); RecordingError where it lacks labels for every sample, repetitions
    or movements.  Returns ``{"label_stream", "label_names", "repetitions", "movements"}``."""
    from neurohand.train import dataset, splits
    data = dataset.load_recording(path)
    dataset.check_finite_signals([data])
    # Raises where the labels stop before the signal, as train's windowing would.
    dataset.label_rows(np.array([data.n_samples]), data.signal_rate, data.labels.rate, len(data.labels.data), path)
    repetitions = sorted(set(run[2] for run in splits.repetition_runs(data.n_samples, data.events)))
    movements = sorted(set(int(e.value) for e in data.events if e.kind == "movement") - {0})
    if not repetitions or not movements:
        raise RecordingError("{}: no repetition or movement events; train's repetition split needs them".format(
            path))
    return {"label_stream": data.labels.name, "label_names": list(data.labels.names),
            "repetitions": repetitions, "movements": movements}


def format_collect_line(collected):
    """One line: what was collected, what was lost, the alignment, what train reads of it."""
    alignment = collected["alignment_ms"]
    accepted = collected["train_accepts"]
    return ("{:.1f} s collected into {}, chip frames lost {}, glove samples lost {}, glove->chip alignment {}; "
            "signal {} the simulation's; train accepts it: label stream '{}' ({} fingers), repetitions {}, "
            "movements {}{}".format(
                collected["seconds"], collected["file"], collected["chip_frames_lost"],
                collected["glove_samples_lost"],
                "p99 {:.2f} ms (max {:.2f})".format(alignment["p99"], alignment["max"]),
                "identical to" if collected["signal_identical"] else "DIFFERS from",
                accepted["label_stream"], len(accepted["label_names"]),
                ",".join(str(r) for r in accepted["repetitions"]), ",".join(str(m) for m in accepted["movements"]),
                "; UNUSABLE: " + collected["unusable"] if collected["unusable"] else ""))


def _train_stage(progress, out, paths, settings):
    """Stage 3: train the run on the training recording; return trainer.train_run's result."""
    from neurohand.train import trainer
    progress.start(3, "train", "training the decoder on {} ('neurohand train' defaults, at most {:g} min)".format(
        TRAIN_RECORDING, settings["max_minutes"]))
    user = {"training": {"max_minutes": settings["max_minutes"]}}
    if settings["epochs"] is not None:
        user["training"]["epochs"] = settings["epochs"]
    training = trainer.train_run([paths[TRAIN_RECORDING]], paths[RUN_DIR], user, seed=0, progress=False)
    progress.done("{} epochs, stopped by {}; test mean R2 {:.3f} on the training recording's test split".format(
        training["epochs_run"], training["stopped"] or "epochs", training["scores"]["test"]["mean_r2"]))
    shutil.copyfile(os.path.join(paths[RUN_DIR], "report.png"), os.path.join(out, TRAINING_REPORT_PNG))
    return training


def _bundle_stage(progress, paths):
    """Stage 4: the run as a verified bundle, with its golden vectors."""
    from neurohand.deploy.bundle import make_bundle
    progress.start(4, "bundle", "bundling the run")
    manifest = make_bundle(paths[RUN_DIR], paths[BUNDLE_DIR])
    classes = manifest["io"].get("class_names") or []
    progress.done("{} features -> {} outputs{}, golden vectors made".format(
        manifest["io"]["n_features"], manifest["io"]["n_outputs"],
        " ({} finger positions, then {} movement-class scores)".format(
            manifest["io"]["n_outputs"] - len(classes), len(classes)) if classes else ""))


def _selftest_stage(progress, paths, settings):
    """Stage 5: the chosen backend against the golden vectors; return the self-test result (raise if it failed)."""
    from neurohand.deploy.selftest import record_result, run_selftest
    from neurohand.deploy.session import load_decoder
    progress.start(5, "selftest", "self-testing the {} backend against the golden vectors".format(
        settings["backend"]))
    decoder = load_decoder(paths[BUNDLE_DIR], settings["backend"])
    try:
        selftest = run_selftest(decoder.bundle, decoder.backend)
    finally:
        decoder.close()
    record_result(decoder.bundle, selftest)
    if not selftest["passed"]:
        raise UsageError("the self-test of the {} backend FAILED (max error {:.3g} > {:g})".format(
            selftest["backend"], selftest["max_abs_error"], selftest["tolerance"]))
    progress.done("PASSED on {}: max error {:.2g}, step p50 {:.0f} us".format(
        selftest["backend"], selftest["max_abs_error"], selftest["step_us"]["p50"]))
    return selftest


def _evaluate_stage(progress, paths, settings):
    """Stage 6: the run (and the baselines) on the training recording's test split; return evaluate_run's result."""
    from neurohand.train import evaluate
    progress.start(6, "evaluate", "scoring the run on the training recording's test split{}".format(
        ", with Wiener and Kalman baselines and the LDA" if settings["baselines"] else ""))
    evaluation = evaluate.evaluate_run(paths[RUN_DIR], paths[TRAIN_RECORDING], with_baselines=settings["baselines"])
    classes = _class_figures(evaluation)
    progress.done("rnn {:.3f}{}{}".format(evaluation["mean_r2"], "".join(
        ", {} {:.3f}".format(name, scores["mean_r2"]) for name, scores in sorted(_regression(evaluation).items())),
        "" if not classes else "; movement classes, balanced accuracy: {}".format(", ".join(
            "{} {}".format(name, _fmt(value, "{:.3f}")) for name, value in classes.items()))))
    return evaluation


def _class_figures(evaluation):
    """Balanced accuracy of the RNN's class head ("rnn") and of the LDA baseline, where evaluate scored them."""
    figures = {}
    if evaluation.get("classes"):
        figures["rnn"] = evaluation["classes"].get("balanced_accuracy")
    lda = (evaluation.get("baselines") or {}).get("lda") or {}
    if "balanced_accuracy" in lda:
        figures["lda"] = lda["balanced_accuracy"]
    return figures


def _regression(evaluation):
    """The baselines that decode positions (evaluate also scores movement classifiers, which have no R²)."""
    return {name: scores for name, scores in (evaluation.get("baselines") or {}).items() if "mean_r2" in scores}


def _replay_stage(progress, out, paths, settings):
    """Stage 7: the held-out recording in real time through a virtual chip and a virtual hand.

    Returns a dict: ``outcome`` (replay_realtime's), ``delays`` (chip -> hand,
    s, per command, see :func:`hand_delays`), ``true_labels`` (scaled as in
    training) at ``label_rate``, and the signal ``rate``.
    """
    from neurohand.deploy import replay
    from neurohand.deploy.runtime.config import RuntimeConfig
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.recording.file_format import open_recording
    progress.start(7, "replay", "replaying {:g} s of {} in real time: virtual chip -> decoder -> virtual hand".format(
        settings["replay_seconds"], HELDOUT_RECORDING))
    decoder = load_decoder(paths[BUNDLE_DIR], settings["backend"])
    with open_recording(paths[HELDOUT_RECORDING]) as recording:
        replay_range = replay.ReplayRange(recording, 0.0, settings["replay_seconds"], "realtime")
        outcome = replay.replay_realtime(decoder, recording, replay_range, RuntimeConfig(status_interval_s=0),
                                         stats_path=os.path.join(out, REPLAY_STATS_JSON), quiet=True,
                                         devices="process")
        label_stream = recording.label_streams[decoder.bundle.config["labels"]["stream"]]
        true_rows = int(np.ceil(replay_range.seconds * label_stream.rate))
        true_labels = replay.scale_labels(label_stream.data[:true_rows], decoder.bundle.config["labels"]["scaling"])
        label_rate = float(label_stream.rate)
    result = outcome.summary
    progress.done("mean R2 {} on what the hand received, latency p50 {} us".format(
        _fmt(result["mean_r2"], "{:.3f}"), _fmt(result["latency_us"]["p50"], "{:.0f}")))

    from neurohand.firmware_bridge.chip.protocol import DEFAULT_SAMPLES_PER_FRAME
    delays = hand_delays(outcome.samples, replay_range.rate, decoder.pipeline.stride_samples,
                         DEFAULT_SAMPLES_PER_FRAME)
    return {"outcome": outcome, "delays": delays, "true_labels": true_labels, "label_rate": label_rate,
            "rate": replay_range.rate}


def _write_plots(out, replayed, evaluation=None):
    """decoded.png and latency.png of the real-time replay; confusion.png of a class head's test split."""
    if evaluation is not None and evaluation.get("classes"):
        from neurohand.train.evaluate import write_confusion_png
        write_confusion_png(evaluation, os.path.join(out, CONFUSION_PNG),
                            title="class head on the training recording's test split: balanced accuracy {:.3f}".format(
                                evaluation["classes"]["balanced_accuracy"]))
    outcome = replayed["outcome"]
    result = outcome.summary
    plot_decoded(os.path.join(out, DECODED_PNG), outcome, replayed["true_labels"], replayed["label_rate"],
                 replayed["rate"], result["label_names"], result["scored_from_s"], result["mean_r2"])
    plot_latency(os.path.join(out, LATENCY_PNG), replayed["delays"][outcome.scored], result["latency_us"])


def _summarize(out, settings, progress, collected, training, selftest, evaluation, replayed):
    """The summary of every stage (what summary.json holds); call it once every other file is written."""
    outcome = replayed["outcome"]
    scored_delays = replayed["delays"][outcome.scored]
    summary = {
        "settings": dict(settings),
        "replay": outcome.summary,
        "collect": collected,
        "training": {"epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
                     "stopped": training["stopped"], "train_seconds": training["train_seconds"],
                     "test_mean_r2": training["scores"]["test"]["mean_r2"],
                     "test_r2": training["scores"]["test"]["r2"]},
        "evaluate": {"split": "test split of {}".format(TRAIN_RECORDING),
                     "rnn": {"mean_r2": evaluation["mean_r2"], "r2": evaluation["r2"],
                             "mean_r": evaluation.get("mean_pearson_r")},
                     "baselines": {name: {"mean_r2": scores["mean_r2"], "r2": scores["r2"],
                                          "mean_r": scores.get("mean_pearson_r")}
                                   for name, scores in _regression(evaluation).items()},
                     "classes_balanced_accuracy": _class_figures(evaluation)},
        "selftest": {key: selftest[key] for key in ("passed", "backend", "max_abs_error", "tolerance")},
        "hand_delay_ms": {"p50": _ms(scored_delays, 50), "p99": _ms(scored_delays, 99),
                          "max": _ms(scored_delays, 100),
                          "definition": "chip frame completing a window sent -> virtual hand received its "
                                        "command (includes both serial links)"},
        "stage_seconds": progress.stage_seconds,
        "total_seconds": round(time.perf_counter() - progress.started, 1),
        "out": out,
        "files": sorted(os.listdir(out)),
    }
    summary["files"] = sorted(set(summary["files"]) | {SUMMARY_JSON})
    return summary


def _write_summary(out, summary):
    from neurohand.firmware_bridge.shared.atomic import write_json_atomic
    write_json_atomic(os.path.join(out, SUMMARY_JSON), summary)


def _fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def _ms(delays_s, q):
    return round(float(np.percentile(delays_s, q)) * 1e3, 3) if len(delays_s) else None


def format_demo_table(summary):
    """The summary table printed at the end of the demo."""
    replay_result = summary["replay"]
    difficulty = summary.get("settings", {}).get("difficulty", "realistic")
    lines = ["", "neurohand demo: {:g} s of held-out recording replayed in real time through a virtual chip "
             "and a virtual hand".format(replay_result["seconds"]),
             "simulated nerve: difficulty {} ({})".format(
                 difficulty, ("calibrated to the r 0.3-0.55 published for implants, so R2 near 0 is expected here; "
                             "'--difficulty easy' gives the clean signal: docs/simulator.md")
                 if difficulty == "realistic" else "the clean signal of simulator version 1"), ""]
    baselines = summary["evaluate"]["baselines"]
    names = sorted(baselines)
    lines.append("{:<12} {:>9} {:>9}{}".format("finger", "replay R2", "test R2",
                                               "".join(" {:>9}".format(n) for n in names)))
    rows = list(zip(replay_result["label_names"], replay_result["r2"], summary["evaluate"]["rnn"]["r2"],
                    *[baselines[n]["r2"] for n in names]))
    for row in rows:
        lines.append("{:<12} {:>9} {:>9}{}".format(row[0], _fmt(row[1], "{:.3f}"), _fmt(row[2], "{:.3f}"),
                                                   "".join(" {:>9}".format(_fmt(v, "{:.3f}")) for v in row[3:])))
    lines.append("{:<12} {:>9} {:>9}{}".format("mean", _fmt(replay_result["mean_r2"], "{:.3f}"),
                                               _fmt(summary["evaluate"]["rnn"]["mean_r2"], "{:.3f}"),
                                               "".join(" {:>9}".format(_fmt(baselines[n]["mean_r2"], "{:.3f}"))
                                                       for n in names)))
    lines.append("{:<12} {:>9} {:>9}{}".format("mean r", "", _fmt(summary["evaluate"]["rnn"].get("mean_r"), "{:.3f}"),
                                               "".join(" {:>9}".format(_fmt(baselines[n].get("mean_r"), "{:.3f}"))
                                                       for n in names)))
    lines.append("  replay R2: the RNN on the held-out recording, scored on what the hand received; test R2 "
                 "and {}: 'neurohand evaluate' on the training recording's test split".format(
                     " / ".join(names) if names else "no baselines"))
    latency = replay_result["latency_us"]
    lines.append("")
    lines.append("latency        p50 {} us  p99 {} us  max {} us  (chip bytes in -> hand command written)".format(
        _fmt(latency["p50"], "{:.0f}"), _fmt(latency["p99"], "{:.0f}"), _fmt(latency["max"], "{:.0f}")))
    delay = summary["hand_delay_ms"]
    lines.append("chip -> hand   p50 {} ms  p99 {} ms  max {} ms  (frame sent -> virtual hand received)".format(
        _fmt(delay["p50"], "{:.2f}"), _fmt(delay["p99"], "{:.2f}"), _fmt(delay["max"], "{:.2f}")))
    frames = replay_result["frames"]
    lines.append("frames         received {}  missing {}  corrupt {}".format(
        frames["received"], frames["missing"], frames["corrupt"]))
    lines.append("safety events  {}   skipped windows {}".format(replay_result["safety_events"], replay_result["skips"]))
    class_line = format_class_line(replay_result.get("classes"),
                                   summary["evaluate"].get("classes_balanced_accuracy") or {})
    if class_line:
        lines.append("classes        " + class_line)
    lines.append("collect        " + format_collect_line(summary["collect"]))
    training = summary["training"]
    lines.append("training       {} epochs in {:.1f} s (best epoch {}, stopped by {})".format(
        training["epochs_run"], training["train_seconds"], training["best_epoch"], training["stopped"] or "epochs"))
    lines.append("demo           {:.0f} s in all; report in {}".format(summary["total_seconds"], summary["out"]))
    return "\n".join(lines)


def format_class_line(replayed, tested):
    """Movement classes: the class head on what the hand was told in the replay, and on the test split
    next to the LDA baseline (balanced accuracy: each class's recall weighs the same, rest included)."""
    parts = []
    if replayed:
        parts.append("replay balanced accuracy {} (accuracy {}, {} of trials after {:g} s)".format(
            _fmt(replayed.get("balanced_accuracy"), "{:.3f}"), _fmt(replayed.get("accuracy"), "{:.3f}"),
            _fmt(replayed.get("trial_accuracy"), "{:.0%}"), replayed.get("delay_s", 0.3)))
    if tested:
        parts.append("test split balanced accuracy " + ", ".join(
            "{} {}".format(name, _fmt(value, "{:.3f}")) for name, value in sorted(tested.items())))
    return "; ".join(parts)


# --- plots --------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot
    return pyplot


def plot_decoded(path, outcome, true_labels, label_rate, rate, names, scored_from_s, mean_r2):
    """decoded.png: per finger, the true trajectory and the positions the virtual hand received."""
    plt = _pyplot()
    n = len(names)
    figure, axes = plt.subplots(n, 1, figsize=(11, 1.6 * n + 1.0), sharex=True, squeeze=False)
    true_t = np.arange(len(true_labels)) / label_rate
    hand_t = outcome.samples / rate
    r2 = outcome.summary["r2"]
    for index, axis in enumerate(axes[:, 0]):
        axis.plot(true_t, true_labels[:, index], color="0.3", linewidth=1.2, label="true (glove)")
        axis.step(hand_t, outcome.positions[:, index], where="post", color="tab:blue", linewidth=1.0,
                  label="received by the hand")
        axis.axvspan(0.0, scored_from_s, color="0.9", zorder=0)
        axis.set_ylabel("{}\nR2 {}".format(names[index], _fmt(r2[index], "{:.2f}")), fontsize=9)
        axis.set_ylim(-0.05, 1.05)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=2)
    axes[-1, 0].set_xlabel("time in the held-out recording (s); grey = warm-up, not scored")
    figure.suptitle("Real-time replay through virtual chip and hand: mean R2 {}".format(_fmt(mean_r2, "{:.3f}")))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_latency(path, delays_s, runtime_latency_us):
    """latency.png: histogram of chip -> hand delays, with the runtime's own latency percentiles."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4))
    delays_ms = np.asarray(delays_s) * 1e3
    if len(delays_ms):
        axis.hist(delays_ms, bins=60, color="tab:blue", alpha=0.8, label="chip frame sent -> hand received")
    for key, style in (("p50", "--"), ("p99", ":")):
        value = runtime_latency_us.get(key)
        if value is not None:
            axis.axvline(value / 1e3, color="tab:red", linestyle=style,
                         label="runtime latency {} {:.2f} ms".format(key, value / 1e3))
    axis.set_xlabel("milliseconds")
    axis.set_ylabel("commands")
    axis.set_title("Latency of the real-time replay")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
