"""``neurohand bench decoding``: test R² of our RNN against a TCN, Wiener and Kalman filters, and training time.

Each data set goes through the same commands a user runs, in a fresh
interpreter each, in a temporary directory removed afterwards::

    NinaPro DB1 S2 E1   neurohand import ninapro S2_A1_E1.mat --out rec
    simulator           neurohand simulate --out rec --seconds 150 --seed 1
    then                neurohand train rec --out run --seed 0 --quiet --json [--max-minutes M]
                        neurohand evaluate run rec --json [--tcn]

with the trainer's defaults for the data's mode (train/trainer.py), so the
RNN is scored on the test split (NinaPro: repetitions 2, 5, 7) after causal,
streaming decoding with the numpy backend, and the Wiener and Kalman filters
are fitted on the same split and features (train/baselines.py).  The
temporal convolutional network (train/tcn.py, Bai et al. 2018) trains with the
run's recipe, budget and seed (``evaluate --tcn``); it costs about as much
training time as the RNN again, so ``with_tcn=False`` leaves it out.

``quick`` shrinks everything to check the set-up (1 epoch, 40 s simulated):
its R² figures mean nothing.

Output::

    {"quick": bool, "max_minutes": float | None, "tcn": bool,
     "datasets": {"ninapro_db1_s2_e1" | "simulator_150s_seed1": {
         "what": str, "test_steps": int, "test_seconds": float,
         "scores": {"rnn" | "wiener" | "kalman" | "tcn": {"mean_r2", "mean_pearson_r", "mean_rmse", "r2": [...]}
                    (the TCN's also "seed" and "training": {"epochs_run", "best_epoch", "stopped", "train_seconds"})},
         "classes": {"rnn" | "lda" | "lda_td": {"accuracy", "balanced_accuracy", "trial_accuracy", ...}}
                    (only where evaluate reports movement classes),
         "label_names": [...],
         "training": {"epochs_run", "best_epoch", "stopped", "train_seconds", "wall_seconds", "budget",
                      "validation_mean_r2", "device", "threads"},
         "seconds": {"prepare", "train", "evaluate"}}
       | {"skipped": "why"}}}
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

NINAPRO_RELATIVE = os.path.join("ninapro_db1_s2_e1", "S2_A1_E1.mat")
DEFAULT_SHARED_DATA = os.path.join("..", "shared", "data")
SIMULATOR_SECONDS, SIMULATOR_SEED = 150.0, 1
# The published figures (bench/results.md) were measured on the version-1 signal;
# "realistic" needs a re-measurement before it replaces them (docs/simulator.md).
SIMULATOR_DIFFICULTY = "easy"
QUICK_SIMULATOR_SECONDS = 40.0
TRAIN_SEED = 0
SCORE_KEYS = ("mean_r2", "mean_pearson_r", "mean_rmse", "r2")
# Movement-class scores (train/classes.py), where the recording has movement events.
CLASS_KEYS = ("accuracy", "balanced_accuracy", "trial_accuracy", "rest_trial_accuracy", "delay_s")
# What a trained baseline (the TCN) reports of its training (train/tcn.py TCNDecoder.settings).
BASELINE_TRAINING_KEYS = ("epochs_run", "best_epoch", "stopped", "train_seconds")


def default_ninapro_file():
    """../shared/data/ninapro_db1_s2_e1/S2_A1_E1.mat relative to the current directory (a source checkout)."""
    return os.path.join(DEFAULT_SHARED_DATA, NINAPRO_RELATIVE)


def neurohand_command(*arguments):
    """The neurohand CLI in a fresh interpreter of this Python."""
    return [sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in arguments]


def run_step(command, what, target="decoding", environment=None):
    """Run one CLI step (in ``environment``, default this one); returns (stdout, seconds).  A failure
    raises RuntimeError with its stderr tail."""
    print("  {}: {} ...".format(target, what), file=sys.stderr, flush=True)
    started = time.perf_counter()
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                             env=environment)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(process.stderr.strip().splitlines()[-8:])
        raise RuntimeError("{} failed (exit {}): {}\n{}".format(what, process.returncode, " ".join(command), tail))
    return process.stdout, seconds


def json_output(stdout, what):
    """The one JSON document a ``--json`` command printed; RuntimeError naming ``what`` otherwise."""
    try:
        return json.loads(stdout)
    except ValueError as error:
        raise RuntimeError("{} printed no JSON document: {}".format(what, error)) from error


def summarise(train_summary, evaluation, wall_seconds, budget):
    """One data set's entry from ``train --json`` and ``evaluate --json`` output (see the module docstring)."""
    scores = {"rnn": {key: evaluation[key] for key in SCORE_KEYS}}
    classes = {}
    if evaluation.get("classes"):
        classes["rnn"] = {key: evaluation["classes"].get(key) for key in CLASS_KEYS}
    for name in sorted(evaluation.get("baselines") or {}):
        baseline = evaluation["baselines"][name]
        # Regression baselines score positions, classifiers (train/classes.py: lda, lda_td) movement classes.
        if "mean_r2" in baseline:
            scores[name] = {key: baseline[key] for key in SCORE_KEYS}
            if "seed" in baseline:
                scores[name]["seed"] = baseline["seed"]
            if "train_seconds" in baseline:
                scores[name]["training"] = {key: baseline.get(key) for key in BASELINE_TRAINING_KEYS}
        elif "balanced_accuracy" in baseline:
            classes[name] = {key: baseline.get(key) for key in CLASS_KEYS}
    validation = train_summary["scores"].get("validation", {})
    entry = {
        "test_steps": evaluation["n_steps"],
        "test_seconds": evaluation["split"]["test_seconds"],
        "split_method": evaluation["split"]["method"],
        "label_names": evaluation["label_names"],
        "scores": scores,
        "training": {
            "epochs_run": train_summary["epochs_run"], "best_epoch": train_summary["best_epoch"],
            "stopped": train_summary["stopped"], "train_seconds": round(train_summary["train_seconds"], 1),
            "wall_seconds": round(wall_seconds, 1), "budget": budget,
            "validation_mean_r2": validation.get("mean_r2"), "device": train_summary["device"],
        },
        "decode_us_per_step": evaluation["decode"]["us_per_step"],
    }
    if classes:
        entry["classes"] = classes
    return entry


def train_and_evaluate(recording, run_dir, quick, max_minutes, label, with_tcn=True):
    """Train with the defaults and evaluate (with the TCN where ``with_tcn``); returns the data set's entry."""
    arguments = ["train", recording, "--out", run_dir, "--seed", TRAIN_SEED, "--quiet", "--json"]
    if quick:
        arguments += ["--epochs", 1]
        budget = "1 epoch (quick)"
    elif max_minutes is not None:
        arguments += ["--max-minutes", max_minutes]
        budget = "{:g} min (trainer --max-minutes), otherwise the defaults".format(max_minutes)
    else:
        budget = "none: the trainer's defaults (early stopping)"
    stdout, train_s = run_step(neurohand_command(*arguments), "training on {} ({})".format(label, budget))
    train_summary = json_output(stdout, "neurohand train")
    stdout, evaluate_s = run_step(neurohand_command("evaluate", run_dir, recording, "--json",
                                                    *(["--tcn"] if with_tcn else [])),
                                  "evaluating on {}{}".format(label, " (and training the TCN)" if with_tcn else ""))
    entry = summarise(train_summary, json_output(stdout, "neurohand evaluate"), train_s, budget)
    entry["seconds"] = {"train": round(train_s, 1), "evaluate": round(evaluate_s, 1)}
    return entry


def ninapro(work, quick, max_minutes, mat_file, with_tcn=True):
    if not os.path.isfile(mat_file):
        return {"skipped": "{} not found (give the NinaPro DB1 S2 E1 file with --ninapro FILE)".format(mat_file)}
    recording = os.path.join(work, "ninapro.rec")
    _, prepare_s = run_step(neurohand_command("import", "ninapro", mat_file, "--out", recording),
                            "importing NinaPro")
    entry = train_and_evaluate(recording, os.path.join(work, "ninapro-run"), quick, max_minutes, "NinaPro", with_tcn)
    entry["what"] = "NinaPro DB1 subject 2 exercise 1 ({}): 10 EMG channels (100 Hz RMS) -> 22 glove angles".format(
        os.path.basename(mat_file))   # results are committed: no path of the measuring machine
    entry["seconds"]["prepare"] = round(prepare_s, 1)
    return entry


def simulator(work, quick, max_minutes, with_tcn=True):
    seconds = QUICK_SIMULATOR_SECONDS if quick else SIMULATOR_SECONDS
    recording = os.path.join(work, "simulated.rec")
    _, prepare_s = run_step(neurohand_command("simulate", "--out", recording, "--seconds", seconds,
                                              "--seed", SIMULATOR_SEED, "--difficulty", SIMULATOR_DIFFICULTY, "--quiet"),
                           "simulating {:g} s".format(seconds))
    entry = train_and_evaluate(recording, os.path.join(work, "simulator-run"), quick, max_minutes, "the simulator",
                               with_tcn)
    entry["what"] = ("neurohand simulate --seconds {:g} --seed {} --difficulty {}: 16 nerve channels at 10 kHz "
                     "-> 5 finger positions".format(seconds, SIMULATOR_SEED, SIMULATOR_DIFFICULTY))
    entry["seconds"]["prepare"] = round(prepare_s, 1)
    return entry


def run(quick, ninapro_file=None, max_minutes=None, with_tcn=True):
    """The ``decoding`` target.

    ninapro_file : path of S2_A1_E1.mat (default: :func:`default_ninapro_file`); skipped where absent.
    max_minutes : training budget per data set in minutes (None: the trainer's defaults), recorded.
    with_tcn : also train and score the TCN on each data set (the RNN's budget again, at most).
    """
    mat_file = ninapro_file or default_ninapro_file()
    work = tempfile.mkdtemp(prefix="neurohand-bench-decoding-")
    try:
        datasets = {
            "ninapro_db1_s2_e1": ninapro(work, quick, max_minutes, mat_file, with_tcn),
            "simulator_{:g}s_seed{}".format(QUICK_SIMULATOR_SECONDS if quick else SIMULATOR_SECONDS,
                                            SIMULATOR_SEED): simulator(work, quick, max_minutes, with_tcn),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"quick": bool(quick), "max_minutes": max_minutes, "train_seed": TRAIN_SEED, "tcn": bool(with_tcn),
            "datasets": datasets,
            "notes": "R² on the test split after causal streaming decoding; baselines fitted on the same split "
                     "and features; labels scaled to 0..1 as in training (R² and r are unaffected)"}
