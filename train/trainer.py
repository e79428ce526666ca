"""Training: recordings -> run directory with config, checkpoint, ONNX model, metrics and report.

Steps of :func:`train_run`::

    settings (defaults for the data's mode, overridden by --config)
      -> recordings loaded, split (train/splits.py), features + labels (train/dataset.py)
      -> RNN trained with truncated back-propagation through time (TBPTT),
         early stopping on the validation split, checkpoint every epoch
      -> RUN_DIR/config.json, checkpoint.pt, model.onnx, metrics.json, report.png

Class head (training ``class_head``): where the recordings have ``movement`` events,
the model's output layer also scores the movement classes (train/model.py), trained
with a class-weighted softmax cross-entropy next to the positions' MSE
(``class_weight``); the class targets follow train/classes.py's causal rule and are
not led by ``target_lead_s``; early stopping still watches validation mean R².

TBPTT: every training segment is cut into pieces of about ``sequence_s``
seconds (random offsets each epoch); a batch of pieces runs through the model
``tbptt_steps`` steps at a time with an optimiser step after each chunk, the
recurrent state carried into the next chunk of the same pieces and detached.

Determinism: everything random derives from the seed and the epoch number
(numpy ``default_rng([seed, epoch])``, ``torch.manual_seed`` per epoch), so
a run resumed from its checkpoint continues exactly as if it had never
stopped, and two runs with one seed give the same weights.

Fine-tuning (``--init-from RUN_DIR``, :class:`InitFrom`): the new run takes the
earlier run's model and pipeline settings and its label scaling, re-fits the
feature normalisation on the new recordings, starts from the earlier run's
best weights and trains with FINETUNE_DEFAULTS (a lower learning rate, an
L2-SP pull toward the earlier weights instead of AdamW's decay toward zero);
docs/training.md "Recalibration with --init-from" has the figures.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes every
``world_size``-th batch and DistributedDataParallel averages the gradients;
only rank 0 writes files.
"""
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from neurohand.decoder.pipeline import ENVELOPE_DEFAULTS, RAW_DEFAULTS, FeaturePipeline
from neurohand.firmware_bridge.recording.patient import recordings_patient
from neurohand.firmware_bridge.shared import atomic, checks
from neurohand.firmware_bridge.shared.atomic import atomic_path
from neurohand.firmware_bridge.shared.digest import sha256_of
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError
from neurohand.firmware_bridge.shared.outputs import check_output_path
from neurohand.train import dataset, metrics, splits
from neurohand.train.model import (ModelConfig, build_model, check_members, ensemble_masks, init_ensemble,
                                   is_block_diagonal, member_dropout_masks, member_forward, member_slots,
                                   merge_members)

RUN_FORMAT = "neurohand-run"
RUN_VERSION = 1
CHECKPOINT_FORMAT = "neurohand-training-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("settings_digest", "model_config", "model", "optimizer", "best_model", "state")
FILES = {"config": "config.json", "checkpoint": "checkpoint.pt", "onnx": "model.onnx",
         "onnx_plain": "model_plain.onnx", "metrics": "metrics.json", "report": "report.png"}

# Recordings below this rate hold envelopes (rectified, smoothed EMG such as
# NinaPro DB1's 100 Hz RMS); at kHz rates they are raw potentials.
ENVELOPE_BELOW_HZ = 1000.0

TRAINING_DEFAULTS = {
    "epochs": 100,             # upper bound; early stopping usually ends sooner
    "learning_rate": 3e-3,
    "weight_decay": 1e-4,      # AdamW, decoupled
    "batch_size": 8,           # pieces per batch
    "sequence_s": 4.0,         # length of a training piece, seconds
    "tbptt_steps": 50,         # decoder steps per back-propagation chunk
    "grad_clip": 1.0,          # max gradient norm
    "patience": 10,            # epochs without validation improvement before stopping
    "min_delta": 1e-3,         # improvement in validation mean R² that counts
    "lr_patience": 3,          # epochs without improvement before halving the learning rate
    "lr_factor": 0.5,
    "label_smoothing_s": 0.0,  # centred moving average of training targets, seconds (0 = off)
    "input_noise": 0.0,        # std of Gaussian noise added to training features (normalised units)
    "target_lead_s": 0.0,      # train on labels this far ahead (the nerve leads the finger); scoring is unshifted
    "class_head": "auto",      # movement-class head: "auto" (on with movement events of 2+ classes), true, false
    "class_weight": 0.02,      # weight of the class cross-entropy next to the position MSE (0.1 cost R², docs)
    "class_balance": True,     # weigh each class's steps by 1/frequency (rest is about half of NinaPro's steps)
    "max_minutes": None,       # training time budget (None = no limit)
    "ema_decay": 0.0,          # exponential moving average of the weights per optimiser step (0 = off)
    "time_warp": 0.0,          # pieces replayed at a speed drawn log-uniformly in [1/(1+w), 1+w] (0 = off)
    "ensemble": 1,             # this many independent copies of the model, one loss each, exported as one (mean logit)
    "ensemble_training": "joint",  # "joint": the members side by side in one model; "separate": one run each, merged
    "lr_schedule": "plateau",  # "plateau": cut by lr_factor after lr_patience bad epochs; "cosine": to 0 at epochs
    "joint_weights": False,    # weigh each output's squared error by 1 / its training variance (mean R²'s weights)
}

CLASS_HEAD_CHOICES = ("auto", True, False)
LR_SCHEDULES = ("plateau", "cosine")
ENSEMBLE_TRAINING = ("joint", "separate")
# Training settings added for issue 19's R² levers: left at their defaults (off), they stay out of a run's
# settings digest, so a run from before they existed resumes.
OPTIONAL_TRAINING_SETTINGS = ("ema_decay", "time_warp", "ensemble", "joint_weights", "lr_schedule",
                              "ensemble_training")
# The class head's settings, left out of a run's settings digest while it has no head (so a run without
# one keeps the digest, and can be resumed, as before the head existed).
CLASS_SETTINGS = ("class_head", "class_weight", "class_balance")

# Training settings that only a fine-tuning run (--init-from) has.
FINETUNE_SETTINGS = {
    "l2sp": 0.0,                     # strength of the pull toward the earlier run's weights (L2-SP), 0 = off
    "freeze_recurrent_epochs": 0,    # epochs at the start in which the recurrent layers stay as they were
}
# What a fine-tuning run changes in the earlier run's training settings (a --config overrides them).
# Chosen on simulated patients 0-1, sessions 1-3, 60 s of the new day (docs/training.md).
FINETUNE_DEFAULTS = {
    "learning_rate": 1e-3,
    "weight_decay": 0.0,             # AdamW's decay pulls toward zero; l2sp pulls toward the earlier weights
    "l2sp": 1e-2,
    "freeze_recurrent_epochs": 0,
    "epochs": 40,
    "patience": 5,                   # fine-tuning peaks within a few epochs (best epoch 1-12 in the trials)
    "max_minutes": None,             # the earlier run's budget is not this one's
}
# Parameters of RNNDecoder (train/model.py) that freeze_recurrent_epochs holds still.
RECURRENT_PREFIX = "rnn."

# Per data mode: feature pipeline settings (FeaturePipeline.design), model and
# training overrides.  Tuned on NinaPro DB1 S2 E1 (envelope) and the simulator
# (raw); see docs/training.md for the figures.
MODE_DEFAULTS = {
    "envelope": {
        "pipeline": {"mode": "envelope", "window_s": 0.2, "stride_s": 0.02, "features": ["mean", "std"],
                     "log": True, "log_epsilon": 1e-3},
        "model": {"cell": "gru", "hidden_size": 128, "num_layers": 2, "input_projection": 64, "dropout": 0.2},
        # Validation (repetition 4) ran ahead of test by ~0.1 R²; noise and dropout narrow the gap.
        # Targets 0.15 s ahead cancel most of the window's delay: NinaPro's median onset lag +90/+70 ms
        # -> +20/0 ms at test R² 0.714/0.734 (was 0.722/0.722), two seeds (docs/latency.md).
        "training": {"input_noise": 0.2, "target_lead_s": 0.15},
    },
    "raw": {
        "pipeline": {"mode": "raw"},
        "model": {"cell": "gru", "hidden_size": 64, "num_layers": 2, "input_projection": 64, "dropout": 0.0},
        "training": {},
    },
}
# Fewest samples a window gets when its default length in seconds rounds to fewer at a low rate
# (0.2 s at 10 Hz is 2): the std of 2 samples is half their difference, not a spread.
MIN_DEFAULT_WINDOW_SAMPLES = 4
SECTIONS = ("pipeline", "model", "training", "split", "labels", "baselines")
LABEL_DEFAULTS = {"stream": None, "scaling": "auto"}
BASELINE_DEFAULTS = {"wiener": {}, "kalman": {}}   # history and settings chosen on validation (train/baselines.py)


# --- settings -----------------------------------------------------------------------

def read_config_file(path):
    """User overrides from a JSON file: a dict with some of the sections in SECTIONS."""
    path = checks.check_file_exists("--config", path)
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except ValueError as exc:
        raise UsageError("--config {!r} is not valid JSON: {}".format(path, exc)) from exc
    if not isinstance(config, dict):
        raise UsageError("--config {!r} must hold a JSON object with sections {}".format(path, ", ".join(SECTIONS)))
    for key, value in config.items():
        checks.check_option("--config section", key, SECTIONS)
        if not isinstance(value, dict):
            raise UsageError("--config section {!r} must be an object, but got {!r}".format(key, value))
    return config


def detect_mode(recording):
    """'envelope' or 'raw' for a recording, from its metadata or else its rate."""
    kind = recording.metadata.get("signal_kind")
    if kind in MODE_DEFAULTS:
        return kind
    return "envelope" if recording.signal_rate < ENVELOPE_BELOW_HZ else "raw"


def resolve_settings(user, mode, finetune=False):
    """Full settings: defaults for ``mode`` overridden by the user's sections (validated).

    finetune : a run with --init-from, whose training section may also hold FINETUNE_SETTINGS"""
    user = copy.deepcopy(user or {})
    pipeline_mode = user.get("pipeline", {}).get("mode", mode)
    mode = checks.check_option("pipeline mode", pipeline_mode, sorted(MODE_DEFAULTS))
    defaults = MODE_DEFAULTS[mode]
    settings = {"mode": mode}
    pipeline = copy.deepcopy(defaults["pipeline"])
    user_pipeline = user.get("pipeline", {})
    if user_pipeline.get("mode", mode) != defaults["pipeline"]["mode"]:
        pipeline = {}
    pipeline.update(user_pipeline)
    settings["pipeline"] = pipeline
    model = copy.deepcopy(defaults["model"])
    for key in user.get("model", {}):
        # class_names come from the data (training "class_head"), never from the user.
        checks.check_option("model setting", key, [k for k in ModelConfig.FIELDS
                                                   if k not in ("n_features", "n_outputs", "class_names")])
    model.update(user.get("model", {}))
    settings["model"] = model
    training = dict(TRAINING_DEFAULTS)
    training.update(defaults["training"])
    allowed = sorted(TRAINING_DEFAULTS) + (sorted(FINETUNE_SETTINGS) if finetune else [])
    for key in user.get("training", {}):
        if key in FINETUNE_SETTINGS and not finetune:
            raise UsageError("training setting {!r} is for fine-tuning only: give --init-from RUN_DIR".format(key))
        checks.check_option("training setting", key, allowed)
    if finetune:
        training.update(FINETUNE_SETTINGS)
    training.update(user.get("training", {}))
    settings["training"] = check_training(training)
    settings["split"] = splits.check_split_settings(user.get("split", {}))
    labels = dict(LABEL_DEFAULTS)
    for key in user.get("labels", {}):
        checks.check_option("labels setting", key, sorted(LABEL_DEFAULTS))
    labels.update(user.get("labels", {}))
    checks.check_option("labels scaling", labels["scaling"], dataset.SCALINGS)
    settings["labels"] = labels
    baselines = copy.deepcopy(BASELINE_DEFAULTS)
    for name, values in user.get("baselines", {}).items():
        checks.check_option("baseline", name, sorted(BASELINE_DEFAULTS))
        baselines[name].update(values)
    settings["baselines"] = baselines
    return settings


def check_training(training):
    t = dict(training)
    t["epochs"] = checks.check_int("training epochs", t["epochs"], minimum=1)
    t["learning_rate"] = checks.check_number("training learning_rate", t["learning_rate"], minimum=0.0,
                                             exclusive_minimum=True)
    t["weight_decay"] = checks.check_number("training weight_decay", t["weight_decay"], minimum=0.0)
    t["batch_size"] = checks.check_int("training batch_size", t["batch_size"], minimum=1)
    t["sequence_s"] = checks.check_number("training sequence_s", t["sequence_s"], minimum=0.0,
                                          exclusive_minimum=True)
    t["tbptt_steps"] = checks.check_int("training tbptt_steps", t["tbptt_steps"], minimum=1)
    t["grad_clip"] = checks.check_number("training grad_clip", t["grad_clip"], minimum=0.0)
    t["patience"] = checks.check_int("training patience", t["patience"], minimum=1)
    t["min_delta"] = checks.check_number("training min_delta", t["min_delta"], minimum=0.0)
    t["lr_patience"] = checks.check_int("training lr_patience", t["lr_patience"], minimum=1)
    t["lr_factor"] = checks.check_number("training lr_factor", t["lr_factor"], minimum=0.0,
                                         exclusive_minimum=True, maximum=1.0)
    t["input_noise"] = checks.check_number("training input_noise", t["input_noise"], minimum=0.0)
    t["label_smoothing_s"] = checks.check_number("training label_smoothing_s", t["label_smoothing_s"],
                                                 minimum=0.0)
    t["target_lead_s"] = checks.check_number("training target_lead_s", t["target_lead_s"], minimum=0.0,
                                             maximum=1.0)
    t["lr_schedule"] = checks.check_option("training lr_schedule", t["lr_schedule"], LR_SCHEDULES)
    if not isinstance(t["joint_weights"], bool):
        raise UsageError("training joint_weights must be true or false, but got {!r}".format(t["joint_weights"]))
    t["ensemble"] = checks.check_int("training ensemble", t["ensemble"], minimum=1)
    t["ensemble_training"] = checks.check_option("training ensemble_training", t["ensemble_training"],
                                                 ENSEMBLE_TRAINING)
    t["time_warp"] = checks.check_number("training time_warp", t["time_warp"], minimum=0.0, maximum=1.0)
    t["ema_decay"] = checks.check_number("training ema_decay", t["ema_decay"], minimum=0.0, maximum=0.9999)
    if t["max_minutes"] is not None:
        t["max_minutes"] = checks.check_number("max_minutes", t["max_minutes"], minimum=0.0,
                                               exclusive_minimum=True)
    if t["class_head"] not in CLASS_HEAD_CHOICES or not isinstance(t["class_head"], (str, bool)):
        raise UsageError('training class_head must be "auto", true or false, but got {!r}'.format(t["class_head"]))
    t["class_weight"] = checks.check_number("training class_weight", t["class_weight"], minimum=0.0,
                                            exclusive_minimum=True, maximum=100.0)
    if not isinstance(t["class_balance"], bool):
        raise UsageError("training class_balance must be true or false, but got {!r}".format(t["class_balance"]))
    if "l2sp" in t:
        t["l2sp"] = checks.check_number("training l2sp", t["l2sp"], minimum=0.0)
        t["freeze_recurrent_epochs"] = checks.check_int("training freeze_recurrent_epochs",
                                                        t["freeze_recurrent_epochs"], minimum=0)
    return t


def _pipeline_default(mode, key):
    """A pipeline setting's default in ``mode``: the trainer's, else the feature pipeline's own."""
    library = ENVELOPE_DEFAULTS if mode == "envelope" else RAW_DEFAULTS
    return MODE_DEFAULTS[mode]["pipeline"].get(key, library[key])


def fit_windows(settings, user_pipeline, signal_rate):
    """Pipeline settings whose window and stride are whole samples at ``signal_rate``, and what was chosen.

    The defaults are seconds chosen for 100 Hz .. 10 kHz data; at a lower rate
    they round to too few samples (a 0.02 s stride is no sample at 10 Hz), so a
    default becomes at least one sample (stride) or MIN_DEFAULT_WINDOW_SAMPLES
    (window).  A value the user gave is never changed: one that is no sample
    at this rate is refused, naming values that fit.

    settings : resolved settings (resolve_settings); user_pipeline : the user's "pipeline" section
    Returns (pipeline settings, choice): choice = {"signal_rate", "window_samples", "stride_samples",
    "window_s", "stride_s", "fitted_to_rate": the default keys changed to fit the rate}."""
    mode = settings["mode"]
    pipeline = dict(settings["pipeline"])
    minimum = {"window_s": MIN_DEFAULT_WINDOW_SAMPLES, "stride_s": 1}
    fitting, counts, fitted = {}, {}, []
    for key in ("window_s", "stride_s"):
        natural = int(round(_pipeline_default(mode, key) * signal_rate))
        fitting[key] = max(minimum[key], natural)
        if key not in user_pipeline and fitting[key] != natural:
            pipeline[key] = fitting[key] / signal_rate
            fitted.append(key)
    for key in ("window_s", "stride_s"):
        if key not in user_pipeline:
            counts[key] = fitting[key]
            continue
        seconds = checks.check_number("pipeline " + key, user_pipeline[key], minimum=0.0, exclusive_minimum=True)
        counts[key] = int(round(seconds * signal_rate))
        if counts[key] < 1:
            raise UsageError("pipeline {} = {:g} s is {} samples at {:g} Hz, where one sample lasts {:g} s; give a "
                             "multiple of {:g} s, e.g. the defaults at this rate: window_s {:g}, stride_s {:g}".format(
                                 key, seconds, counts[key], signal_rate, 1.0 / signal_rate, 1.0 / signal_rate,
                                 fitting["window_s"] / signal_rate, fitting["stride_s"] / signal_rate))
    choice = {"signal_rate": signal_rate, "window_samples": counts["window_s"], "stride_samples": counts["stride_s"],
              "window_s": counts["window_s"] / signal_rate, "stride_s": counts["stride_s"] / signal_rate,
              "fitted_to_rate": fitted}
    return pipeline, choice


def describe_windows(choice):
    """One line for the log and the CLI: the feature windows chosen and why."""
    line = "window {:g} s ({} samples), stride {:g} s ({} sample{}) at {:g} Hz".format(
        choice["window_s"], choice["window_samples"], choice["stride_s"], choice["stride_samples"],
        "" if choice["stride_samples"] == 1 else "s", choice["signal_rate"])
    if choice["fitted_to_rate"]:
        fitted = choice["fitted_to_rate"]
        line += " ({} raised from the default{}: too few samples at this rate)".format(
            " and ".join(k.replace("_s", "") for k in fitted), "s" if len(fitted) > 1 else "")
    return line


def settings_digest(settings, recordings, seed, init=None, class_head=None):
    """Identifies what a checkpoint was trained on; --resume refuses anything else.

    The epoch limit and time budget are left out: resuming may extend them.
    init : the InitFrom of a fine-tuning run (its weights' digest counts; a run without one
    keeps the digest it had before --init-from existed)
    class_head : the run's ClassHead, or None (then its settings are left out, see CLASS_SETTINGS)."""
    relevant = copy.deepcopy(settings)
    relevant["training"].pop("epochs", None)
    relevant["training"].pop("max_minutes", None)
    for key in OPTIONAL_TRAINING_SETTINGS:
        if relevant["training"].get(key, TRAINING_DEFAULTS[key]) == TRAINING_DEFAULTS[key]:
            relevant["training"].pop(key, None)     # a run without it keeps its digest from before
    if class_head is None:
        for key in CLASS_SETTINGS:
            relevant["training"].pop(key, None)
    else:
        relevant["classes"] = class_head.to_config()
    document = {"settings": relevant, "seed": seed,
                "recordings": [(os.path.basename(r.path), r.n_samples) for r in recordings]}
    if init is not None:
        document["init_from"] = init.record["checkpoint_sha256"]
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# --- distributed context ------------------------------------------------------------

class Context(object):
    """Where this process trains: device, rank and world size (1 without torchrun)."""

    def __init__(self, device, rank=0, world_size=1):
        self.device = device
        self.rank = rank
        self.world_size = world_size

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def choose_device(name):
    checks.check_option("--device", name, ["auto", "cpu", "cuda"])
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def start_context(device_name, threads=1):
    """Set up the device and, under torchrun, the process group (gloo on CPU, nccl on CUDA).

    threads : torch intra-op threads per process.  One is the default: the
    decoder's matrices are small, and on a busy 2-core machine a GRU step ran
    7 times slower with 2 threads than with 1 (docs/training.md)."""
    device = choose_device(device_name)
    torch.set_num_threads(checks.check_int("--threads", threads, minimum=1))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(device, dist.get_rank(), dist.get_world_size())


def stop_context(context, finished):
    """Leave the process group; after success wait for rank 0's files first.

    After a failure there is no barrier: the other processes may be blocked
    in a collective that will never complete, and torchrun ends them once
    this one exits."""
    if context.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def make_deterministic(seed):
    """Seed numpy and torch and ask torch for deterministic kernels (warn where none exist)."""
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# --- batches ------------------------------------------------------------------------

def cut_pieces(lengths, piece_steps, rng):
    """Cut sequences into pieces of about ``piece_steps`` steps with a random first cut.

    lengths : list of int, steps per training sequence
    Returns list of (sequence index, start, stop); pieces shorter than half a
    piece are merged into their neighbour so no piece is a sliver."""
    pieces = []
    for index, n in enumerate(lengths):
        if n <= piece_steps:
            pieces.append((index, 0, n))
            continue
        offset = int(rng.integers(0, piece_steps))
        cuts = [0] + list(range(offset, n, piece_steps)) + [n]
        cuts = sorted(set(cuts))
        bounds = []
        for start, stop in zip(cuts[:-1], cuts[1:]):
            if bounds and (stop - start < piece_steps // 2 or bounds[-1][1] - bounds[-1][0] < piece_steps // 2):
                bounds[-1] = (bounds[-1][0], stop)
            else:
                bounds.append((start, stop))
        pieces.extend((index, a, b) for a, b in bounds)
    return pieces


def plan_epoch(lengths, settings, steps_per_s, seed, epoch, world_size, stream=0):
    """Batches of one epoch, the same list in every process (``stream`` k > 0: another draw, an
    ensemble member's own).

    Returns list of batches, each a list of (sequence index, start, stop);
    the number of batches is a multiple of ``world_size`` (the last ones are
    filled with pieces drawn again) so every process runs the same number."""
    rng = np.random.default_rng([seed, epoch] + ([stream] if stream else []))
    piece_steps = max(1, int(round(settings["sequence_s"] * steps_per_s)))
    pieces = cut_pieces(lengths, piece_steps, rng)
    order = rng.permutation(len(pieces))
    pieces = [pieces[i] for i in order]
    size = settings["batch_size"]
    batches = [pieces[i:i + size] for i in range(0, len(pieces), size)]
    while len(batches) % world_size:
        batches.append([pieces[int(i)] for i in rng.integers(0, len(pieces), size=min(size, len(pieces)))])
    return batches


def warp_positions(start, n, speed, length):
    """Where a piece of ``n`` steps from ``start`` replayed at ``speed`` reads its sequence of ``length``
    steps: (lower step, upper step, weight of the upper) per step, stopping at the sequence's last step."""
    positions = start + np.arange(n) * speed
    positions = positions[positions <= length - 1]
    lower = np.floor(positions).astype(np.int64)
    return lower, np.minimum(lower + 1, length - 1), positions - lower


def collate(sequences, batch, n_steps, targets, class_targets=None, speeds=None):
    """Padded tensors for one batch: x (B, n_steps, F), y (B, n_steps, K), mask (B, n_steps);
    with ``class_targets`` (per sequence, head index per step) also c (B, n_steps) int64, NO_CLASS where
    padded.  ``speeds`` (one per piece, or None): time warping, features and targets interpolated
    linearly at the piece's speed (a movement made faster or slower), class targets from the nearest step."""
    n_features = sequences[0].features.shape[1]
    n_outputs = sequences[0].labels.shape[1]
    x = np.zeros((len(batch), n_steps, n_features), dtype=np.float32)
    y = np.zeros((len(batch), n_steps, n_outputs), dtype=np.float32)
    mask = np.zeros((len(batch), n_steps), dtype=np.float32)
    c = np.full((len(batch), n_steps), dataset.NO_CLASS, dtype=np.int64)
    for row, (index, start, stop) in enumerate(batch):
        n = stop - start
        if speeds is None or speeds[row] == 1.0:
            x[row, :n] = sequences[index].features[start:stop]
            y[row, :n] = targets[index][start:stop]
            mask[row, :n] = 1.0
            if class_targets is not None:
                c[row, :n] = class_targets[index][start:stop]
            continue
        lower, upper, weight = warp_positions(start, n, speeds[row], len(targets[index]))
        n, weight = len(lower), weight[:, None]
        features, target = sequences[index].features, targets[index]
        x[row, :n] = features[lower] * (1.0 - weight) + features[upper] * weight
        y[row, :n] = target[lower] * (1.0 - weight) + target[upper] * weight
        mask[row, :n] = 1.0
        if class_targets is not None:
            c[row, :n] = class_targets[index][np.where(weight[:, 0] < 0.5, lower, upper)]
    tensors = (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask))
    return tensors + (torch.from_numpy(c),) if class_targets is not None else tensors


def _pad_rows(tensor, rows):
    """``tensor`` with padding rows appended up to ``rows``: zeros (mask 0), NO_CLASS for class targets."""
    fill = dataset.NO_CLASS if tensor.dtype == torch.int64 else 0
    return torch.cat([tensor, torch.full((rows - len(tensor),) + tuple(tensor.shape[1:]), fill, dtype=tensor.dtype)])


def masked_mse(outputs, targets, mask, weights=None, denominator=None):
    """Mean squared error over the real (unpadded) steps; 0 (with a graph) where there are none.
    ``weights`` (per output, mean 1, or None) weigh the outputs' errors; ``denominator`` replaces the
    number of real steps (one ensemble member's share of the members' loss)."""
    squared = (outputs - targets) ** 2
    squared = (squared if weights is None else squared * weights).mean(dim=-1)
    if squared.dim() > mask.dim():
        squared = squared.mean(dim=2)       # an ensemble's members, all on the same steps
    squared = squared * mask
    return squared.sum() / (mask.sum().clamp(min=1.0) if denominator is None else denominator)


def masked_cross_entropy(logits, classes, weights=None, denominator=None):
    """Softmax cross-entropy over the steps with a class (``classes`` != NO_CLASS), each step weighted by
    its class's weight; the sum over steps divided by their number (not by the weights' sum, so a chunk of
    rare classes counts more, as the weights intend); 0 (with a graph) where no step has a class.
    ``denominator`` replaces that number (as in :func:`masked_mse`)."""
    flat = logits.reshape(-1, logits.shape[-1])
    target = classes.reshape(-1)
    losses = torch.nn.functional.cross_entropy(flat, target, weight=weights, ignore_index=dataset.NO_CLASS,
                                               reduction="none")
    return losses.sum() / ((target != dataset.NO_CLASS).sum().clamp(min=1) if denominator is None else denominator)


def detach_state(state):
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


# --- decoding and scoring -----------------------------------------------------------

def decode_offline(model, sequences, device):
    """Run ``model`` over each whole sequence from a zero state; list of (n_steps, n_outputs) float64."""
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for sequence in sequences:
            x = torch.from_numpy(np.ascontiguousarray(sequence.features)).unsqueeze(0).to(device)
            y, _ = model(x)
            outputs.append(y[0].double().cpu().numpy())
    model.train(was_training)
    return outputs


def score_sequences(model, sequences, device, class_targets=None):
    """metrics.score of the model's positions on ``sequences`` (scaled label units) plus their MSE loss;
    with a class head and ``class_targets`` (head index per step, per sequence) also "classes":
    accuracy and balanced accuracy of the decided class (argmax of the scores) per step.

    Returns (scores, the positions decoded per sequence)."""
    outputs = decode_offline(model, sequences, device)
    n_positions = model.config.n_outputs
    predictions = [o[:, :n_positions] for o in outputs]
    truth = np.concatenate([s.labels for s in sequences]).astype(np.float64)
    prediction = np.concatenate(predictions)
    result = metrics.score(truth, prediction)
    result["loss"] = float(np.mean((truth - prediction) ** 2))
    if model.config.n_classes and class_targets is not None:
        result["classes"] = score_class_steps(np.concatenate(class_targets),
                                              np.concatenate([o[:, n_positions:] for o in outputs]))
    return result, predictions


def score_class_steps(truth, scores):
    """Per-step accuracy, balanced accuracy and confusion (head order, rows true) of class ``scores``
    (n_steps, n_classes) against head indices ``truth`` (steps of unknown classes left out), as
    train/classes.py measures them."""
    from neurohand.train import classes

    known = truth != dataset.NO_CLASS
    n_classes = scores.shape[1]
    confusion = classes.confusion_matrix(truth[known], np.argmax(scores[known], axis=1), np.arange(n_classes))
    return {"accuracy": classes.accuracy(confusion), "balanced_accuracy": classes.balanced_accuracy(confusion),
            "n_steps": int(known.sum()), "confusion": confusion.tolist()}


# --- checkpoint ---------------------------------------------------------------------

def _cpu_state(state_dict):
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def save_checkpoint(path, document):
    """Atomically write ``document`` (tensors and plain types only) with torch.save."""
    with atomic_path(path, suffix=".pt") as temporary:
        torch.save(document, temporary)


def _first_line(exc):
    text = " ".join(str(exc).split("\n")[0].split())
    return "{}: {}".format(type(exc).__name__, text[:160]) if text else type(exc).__name__


def load_checkpoint(path):
    """Read a training checkpoint; ConfigError (one line) for a damaged, truncated, foreign or crafted file.

    ``weights_only=True``: the unpickler builds tensors and plain containers
    only, so a crafted file cannot run code; what it refuses is reported, never
    retried the unsafe way."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError("checkpoint {!r} is not a file".format(path))
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with: noise for a file that is then
            # either refused below or fine.
            warnings.simplefilter("ignore")
            document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError ... on damage
        # The weights-only unpickler's refusal is pickle.UnpicklingError; named here by class so that
        # no module of ours imports pickle (tests/device/test_security.py scans for it).
        if type(exc).__name__ != "UnpicklingError":
            raise ConfigError("cannot read checkpoint {!r}: damaged, truncated or not a torch file ({})".format(
                path, _first_line(exc))) from None
        raise ConfigError("checkpoint {!r} is damaged or holds more than tensors and plain values; it was not "
                          "loaded (unpickling it could run code): resume from an intact copy or start a new run"
                          .format(path)) from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError("{!r} is not a neurohand training checkpoint".format(path))
    if document.get("format_version") != CHECKPOINT_VERSION:
        raise ConfigError("checkpoint {!r} has format version {!r}; this neurohand reads {}".format(
            path, document.get("format_version"), CHECKPOINT_VERSION))
    _check_checkpoint(path, document)
    return document


def _check_checkpoint(path, document):
    """The entries resume() uses, with the types it needs (a valid header says nothing of the rest)."""
    missing = [key for key in CHECKPOINT_KEYS if key not in document]
    if missing:
        raise ConfigError("checkpoint {!r} is incomplete: it lacks {}".format(path, ", ".join(missing)))
    if not isinstance(document["settings_digest"], str):
        raise ConfigError("checkpoint {!r}: settings_digest must be text".format(path))
    for key in ("model", "best_model"):
        weights = document[key]
        if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in weights.items()):
            raise ConfigError("checkpoint {!r}: {} must map parameter names to tensors".format(path, key))
    for key in ("model_config", "optimizer", "state"):
        if not isinstance(document[key], dict):
            raise ConfigError("checkpoint {!r}: {} must be a dict".format(path, key))


def write_json_atomic(path, value):
    atomic.write_json_atomic(path, metrics.json_ready(value), allow_nan=True)


# --- the run ------------------------------------------------------------------------

class InitFrom(object):
    """The earlier run a fine-tuning run starts from (``--init-from RUN_DIR``); see :func:`load_init_from`.

    run_dir : absolute path; config : its config.json; weights : its best weights {name: tensor}
    record : what config.json and metrics.json of the new run keep as "init_from": run_dir and the
    SHA-256 of the earlier run's config.json and checkpoint.pt"""

    def __init__(self, run_dir, config, weights, record):
        self.run_dir = run_dir
        self.config = config
        self.weights = weights
        self.record = record

    def user_config(self, user):
        """The sections of the new run: the earlier run's settings, FINETUNE_DEFAULTS, then the user's.

        The model and pipeline are the earlier run's: a --config may not change them."""
        user = copy.deepcopy(user or {})
        for section in ("model", "pipeline", "labels"):
            if user.get(section):
                raise UsageError("--init-from {!r}: the new run keeps that run's {} settings, so --config may not "
                                 "give a {!r} section".format(self.run_dir, section, section))
        old = self.config["settings"]
        merged = {"pipeline": copy.deepcopy(old["pipeline"]), "model": copy.deepcopy(old["model"]),
                  "labels": copy.deepcopy(old["labels"]), "baselines": copy.deepcopy(old.get("baselines", {}))}
        training = {k: v for k, v in old["training"].items() if k in TRAINING_DEFAULTS or k in FINETUNE_SETTINGS}
        training.update(FINETUNE_DEFAULTS)
        if training.get("ensemble_training") == "separate":
            # The earlier run's members were merged into one block-diagonal model: the form a joint ensemble
            # trains, so they are fine-tuned together (each on its own pieces).
            training["ensemble_training"] = "joint"
        training.update(user.get("training", {}))
        merged["training"] = training
        split = copy.deepcopy(old.get("split", {}))
        split.update(user.get("split", {}))
        merged["split"] = split
        for name, values in user.get("baselines", {}).items():
            merged["baselines"].setdefault(name, {}).update(values)
        return merged

    def check_recordings(self, recordings):
        """Refuse recordings the earlier run's model cannot take: other rate, channels or outputs (one line)."""
        pipeline, labels = self.config["pipeline"], self.config["labels"]
        for rec in recordings:
            if rec.signal_rate != pipeline["signal_rate"] or len(rec.channel_names) != pipeline["n_channels"]:
                raise UsageError("{}: {} channels at {:g} Hz, but --init-from {!r} was trained on {} channels at {:g} "
                                 "Hz; train a new run without --init-from".format(
                                     rec.path, len(rec.channel_names), rec.signal_rate, self.run_dir,
                                     pipeline["n_channels"], pipeline["signal_rate"]))
            if rec.labels.name != labels["stream"] or list(rec.labels.names) != list(labels["names"]):
                raise UsageError("{}: label stream {!r} with outputs {}, but --init-from {!r} decodes {!r} {}; train "
                                 "a new run without --init-from".format(
                                     rec.path, rec.labels.name, ", ".join(rec.labels.names), self.run_dir,
                                     labels["stream"], ", ".join(labels["names"])))

    def label_scaling(self):
        return dataset.LabelScaling.from_config(self.config["labels"]["scaling"])


def load_init_from(run_dir):
    """The earlier run of ``--init-from RUN_DIR``: its config.json and the best weights of its checkpoint.pt."""
    run_dir = os.path.abspath(checks.check_dir_exists("--init-from", run_dir))
    paths = {name: os.path.join(run_dir, FILES[name]) for name in ("config", "checkpoint")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise UsageError("--init-from {!r} is not a finished training run: {} is missing".format(
                run_dir, os.path.basename(path)))
    config = checks.load_json_file(paths["config"], "run config", error=ConfigError)
    if config.get("format") != RUN_FORMAT:
        raise ConfigError("{} is not a neurohand run config".format(paths["config"]))
    for key in ("pipeline", "model", "labels", "settings", "mode"):
        if key not in config:
            raise ConfigError("{} lacks {!r}".format(paths["config"], key))
    document = load_checkpoint(paths["checkpoint"])
    if document["model_config"] != config["model"]:
        raise ConfigError("--init-from {!r}: checkpoint.pt and config.json describe different models".format(run_dir))
    record = {"run_dir": run_dir, "config_sha256": sha256_of(paths["config"]),
              "checkpoint_sha256": sha256_of(paths["checkpoint"]),
              # The earlier run's sessions (and those it was initialised from) count as seen by the new one.
              "recordings_sha256": list(config.get("recordings_sha256") or [])
              + list((config.get("init_from") or {}).get("recordings_sha256") or [])}
    return InitFrom(run_dir, config, document["best_model"], record)


def _run_patient(prepared):
    patient = recordings_patient([r.metadata for r in prepared.recordings])
    if patient is None and prepared.init is not None:
        patient = (getattr(prepared.init, "config", None) or {}).get("patient")
    return patient


class Prepared(object):
    """Everything derived from the recordings before training (same in every process)."""

    def __init__(self, settings, recordings, plans, pipeline, sequences, label_scaling, targets, windows,
                 init=None, class_head=None, class_targets=None):
        self.init = init            # InitFrom of a fine-tuning run, else None
        self.class_head = class_head          # dataset.ClassHead of a run with a class head, else None
        self.class_targets = class_targets    # {split: [int64 (n_steps,) head index per step]} with a head
        self.windows = windows      # fit_windows' choice, for the log and metrics.json
        self.settings = settings
        self.recordings = recordings
        self.plans = plans
        self.pipeline = pipeline
        self.sequences = sequences
        self.label_scaling = label_scaling
        self.targets = targets


def prepare(recording_paths, user_config, init=None):
    """Load recordings, resolve settings, split and build sequences.

    init : InitFrom of a fine-tuning run: its settings are the base of ``user_config``, its
    label scaling is kept (a finger at 0.7 means the same to the hand as before, and a short
    session need not reach every finger's extremes), the normalisation is fitted anew."""
    if not recording_paths:
        raise UsageError("give at least one recording to train on")
    if init is not None:
        user_config = init.user_config(user_config)
    label_stream = (user_config or {}).get("labels", {}).get("stream")
    recordings = [dataset.load_recording(checks.check_file_exists("recording", p), label_stream)
                  for p in recording_paths]
    if init is not None:
        init.check_recordings(recordings)
    dataset.check_compatible(recordings)
    modes = {detect_mode(r) for r in recordings}
    if len(modes) > 1:
        raise UsageError("the recordings mix envelope and raw data; train them separately")
    mode = modes.pop() if init is None else init.config["mode"]
    settings = resolve_settings(user_config, mode, finetune=init is not None)
    first = recordings[0]
    settings["pipeline"], windows = fit_windows(settings, (user_config or {}).get("pipeline", {}), first.signal_rate)
    pipeline = FeaturePipeline.design(first.signal_rate, len(first.channel_names), settings["pipeline"])
    plans = dataset.split_recordings(recordings, settings["split"], dataset.guard_samples(pipeline))
    sequences, label_scaling = dataset.build_sequences(pipeline, recordings, plans, settings["labels"]["scaling"])
    if init is not None:
        sequences, label_scaling = _rescale_labels(sequences, label_scaling, init.label_scaling()), init.label_scaling()
    width = int(round(settings["training"]["label_smoothing_s"] * dataset.steps_per_second(pipeline)))
    lead = int(round(settings["training"]["target_lead_s"] * dataset.steps_per_second(pipeline)))
    targets = [dataset.lead_labels(dataset.smooth_labels(s.labels, width), lead).astype(np.float32)
               if width > 1 or lead > 0 else s.labels for s in sequences["train"]]
    class_head = choose_class_head(settings["training"], recordings, sequences["train"], init)
    class_targets = None
    if class_head is not None:
        class_targets = {name: [class_head.targets(recordings[s.recording], s.ends) for s in group]
                         for name, group in sequences.items()}
    return Prepared(settings, recordings, plans, pipeline, sequences, label_scaling, targets, windows, init,
                    class_head, class_targets)


def choose_class_head(training, recordings, train_sequences, init=None):
    """The run's dataset.ClassHead from the training setting ``class_head``, or None.

    "auto": a head where the training steps hold movement events of at least 2 classes (rest counts);
    true: the same, refusing data without them; false: none.  A fine-tuning run keeps the earlier run's
    head (its weights have the head's width) and its value -> class mapping."""
    setting = training["class_head"]
    if init is not None:
        earlier = init.config.get("classes")
        if setting is True and not earlier:
            raise UsageError("training class_head is true, but --init-from {!r} has no class head; the new run keeps "
                             "that run's model".format(init.run_dir))
        if setting is False and earlier:
            raise UsageError("training class_head is false, but --init-from {!r} has a class head; the new run keeps "
                             "that run's model".format(init.run_dir))
        return dataset.ClassHead.from_config(earlier) if earlier else None
    if setting is False:
        return None
    head = dataset.ClassHead.from_sequences(recordings, train_sequences, balance=training["class_balance"])
    if head is None and setting is True:
        raise UsageError("training class_head is true, but the training split holds no {!r} events of 2 or more "
                         "classes (rest counts as one); give recordings with movement events or set class_head "
                         "to \"auto\" or false".format(dataset.CLASS_EVENT_KIND))
    return head


def _rescale_labels(sequences, fitted, kept):
    """``sequences`` with labels in ``kept``'s scaling instead of the ``fitted`` one build_sequences applied."""
    return {name: [s._replace(labels=kept.apply(fitted.invert(s.labels)).astype(np.float32)) for s in group]
            for name, group in sequences.items()}


def check_run_dir(run_dir, resume, force=False, inputs=()):
    """Refuse a RUN_DIR this run may not write, before any work; returns its absolute path.

    The rule of every output (firmware_bridge/shared/outputs.py): a RUN_DIR
    that holds files is written into only to continue its run (``resume``) or
    with ``force`` (a new run replaces the run files, one by one and atomically,
    as it writes them); no run file may be an input (``inputs``: recordings,
    --config).  Missing parent directories are created, so the nearest missing
    ancestor is what must be creatable."""
    if run_dir is None or not os.fspath(run_dir).strip() or "\x00" in os.fspath(run_dir):
        check_output_path("--out", run_dir)      # raises, naming the problem
    run_dir = os.fspath(run_dir)
    absolute = os.path.abspath(run_dir)
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError("--out {!r} exists and is not a directory".format(run_dir))
    checkpoint = os.path.join(absolute, FILES["checkpoint"])
    if resume:
        if not os.path.isfile(checkpoint):
            raise UsageError("--resume: {!r} holds no {} to continue from".format(run_dir, FILES["checkpoint"]))
    elif not force and (os.path.lexists(checkpoint) or os.path.lexists(os.path.join(absolute, FILES["config"]))):
        raise UsageError("{!r} already holds a run; continue it with --resume, start over in it with --force, or "
                         "choose another --out".format(run_dir))
    target = absolute
    while not os.path.lexists(target) and not os.path.isdir(os.path.dirname(target)):
        parent = os.path.dirname(target)
        if parent == target:
            break
        target = parent
    check_output_path("--out", target if target != absolute else run_dir, inputs=inputs, force=force or resume,
                      directory=True)
    inputs = [os.path.realpath(os.fspath(p)) for p in inputs if p is not None]
    for name in FILES.values():
        path = os.path.join(absolute, name)
        if os.path.realpath(path) in inputs:
            raise UsageError("--out {!r}: the run writes {} there, which is an input of this command; choose "
                             "another --out".format(run_dir, name))
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UsageError("--out {!r}: {} there is not a regular file, so the run cannot write it".format(
                run_dir, name))
    return absolute


def train_command(args):
    """Handler of ``neurohand train``; returns the summary on rank 0, None elsewhere."""
    user = read_config_file(args.config) if args.config else {}
    if args.epochs is not None:
        user.setdefault("training", {})["epochs"] = checks.check_int("--epochs", args.epochs, minimum=1)
    if args.max_minutes is not None:
        user.setdefault("training", {})["max_minutes"] = args.max_minutes
    return train_run(args.recordings, args.out, user, seed=args.seed, device=args.device, resume=args.resume,
                     progress=not args.quiet, threads=args.threads, force=getattr(args, "force", False),
                     inputs=[args.config] if args.config else (), init_from=getattr(args, "init_from", None))


def train_run(recording_paths, run_dir, user_config=None, seed=0, device="auto", resume=False, progress=True,
              threads=1, force=False, inputs=(), init_from=None, light=False):
    """Train and write the run directory; returns a summary dict on rank 0 (None on other ranks).

    force : start a new run in a RUN_DIR that holds files (see check_run_dir)
    inputs : other files the command reads (its --config), which no run file may replace
    init_from : RUN_DIR of an earlier run to fine-tune (see :class:`InitFrom`), or None
    light : write neither report.png nor model_plain.onnx (seconds per run: matplotlib and a second export;
    for benchmarks that train hundreds of runs and only score model.onnx)"""
    seed = checks.check_int("--seed", seed, minimum=0)
    init = load_init_from(init_from) if init_from is not None else None
    if init is not None:
        # The earlier run is an input: --out (even with --force) may not write over it.
        inputs = list(inputs) + [os.path.join(init.run_dir, FILES[name]) for name in FILES]
    run_dir = check_run_dir(run_dir, resume, force, list(recording_paths or ()) + list(inputs))
    # A damaged or crafted checkpoint is refused before the recordings are loaded, not after.
    checkpoint = load_checkpoint(os.path.join(run_dir, FILES["checkpoint"])) if resume else None
    context = start_context(device, threads)
    finished = False
    try:
        make_deterministic(seed)
        prepared = prepare(recording_paths, user_config, init)
        if context.is_main and progress:
            print("features: {}".format(describe_windows(prepared.windows)), file=sys.stderr)
            if init is not None:
                print("fine-tuning {} (learning rate {:g}, l2sp {:g}, recurrent layers frozen for {} epochs)".format(
                    init.run_dir, prepared.settings["training"]["learning_rate"], prepared.settings["training"]["l2sp"],
                    prepared.settings["training"]["freeze_recurrent_epochs"]), file=sys.stderr)
        if context.is_main:
            os.makedirs(run_dir, exist_ok=True)
        digest = settings_digest(prepared.settings, prepared.recordings, seed, init, prepared.class_head)
        result = _train(prepared, run_dir, seed, context, checkpoint, digest, progress)
        summary = None
        if context.is_main:
            summary = _write_outputs(prepared, run_dir, seed, context, result, light)
        finished = True
    finally:
        stop_context(context, finished)
    return summary


def _build(prepared, seed, context):
    n_features = prepared.pipeline.n_features
    n_outputs = prepared.sequences["train"][0].labels.shape[1]
    class_names = [] if prepared.class_head is None else prepared.class_head.names
    sizes = dict(prepared.settings["model"])
    members = prepared.settings["training"]["ensemble"]
    if members > 1:
        # An ensemble of the configured model, trained and exported as one model that many times as wide.
        for key in ("hidden_size", "input_projection"):
            if isinstance(sizes.get(key), int) and not isinstance(sizes[key], bool):
                sizes[key] *= members
    model_config = ModelConfig(n_features=n_features, n_outputs=n_outputs, class_names=class_names, **sizes)
    torch.manual_seed(seed)
    model = build_model(model_config).to(context.device)
    return model_config, model


def _train(prepared, run_dir, seed, context, checkpoint, digest, progress):
    """Train until the epoch limit, early stopping or the time budget; the best model and how it went.

    checkpoint : the loaded checkpoint to resume from, or None for a new run
    Returns {"model": model holding the best weights, "model_config", "state": TrainingState}; a separately
    trained ensemble also "members" (see :func:`_train_separately`)."""
    settings = prepared.settings["training"]
    if settings["ensemble"] > 1 and settings["ensemble_training"] == "separate":
        return _train_separately(prepared, run_dir, seed, context, checkpoint, digest, progress)
    training = _Training(prepared, seed, context)
    checkpoint_path = os.path.join(run_dir, FILES["checkpoint"])
    if checkpoint is not None:
        training.resume(checkpoint_path, digest, run_dir, checkpoint)
    training.distribute()
    clock = _Clock(training.state.elapsed_s, training.settings["max_minutes"])
    _run_epochs(training, clock, context, progress, lambda: training.save_checkpoint(checkpoint_path, digest))
    return {"model": training.model, "model_config": training.model_config, "state": training.state}


def _run_epochs(training, clock, context, progress, save=None):
    """Epochs until the epoch limit, early stopping or the clock's budget; leaves the best weights loaded.
    ``save``: called (rank 0) after every epoch."""
    state = training.state
    while state.epoch < training.settings["epochs"] and not state.stopped:
        validation = training.run_epoch(clock, progress)
        if context.is_main:
            if progress:
                _print_epoch(state, validation)
            if save is not None:
                save()
    if not state.stopped:
        state.stopped = "epochs"
    training.model.load_state_dict(training.best_model)


def member_seed(seed, members, k):
    """Seed of member k of a separately trained ensemble: the members of --seed s are the ordinary runs with
    seeds s x members .. s x members + members - 1, so ensembles of different seeds share no member."""
    return seed * members + k


def _train_separately(prepared, run_dir, seed, context, checkpoint, digest, progress):
    """ensemble_training "separate": the ensemble's members trained one after another, each an ordinary run
    (its own seed, :func:`member_seed`; its own early stopping; an equal share of the time budget left),
    then merged into one model whose output is their mean logit (train/model.py ``merge_members``): the
    model a joint ensemble exports.  Returns _train's dict with "members": [{"seed", "model", "state"}]."""
    members = prepared.settings["training"]["ensemble"]
    if checkpoint is not None:
        raise UsageError("--resume: a run with training ensemble_training \"separate\" cannot be resumed; start it "
                         "over with --force")
    if prepared.init is not None:
        raise UsageError("training ensemble_training \"separate\" does not fine-tune (--init-from): the earlier "
                         "run's members are fine-tuned together; leave the setting out")
    one = copy.copy(prepared)
    one.settings = dict(prepared.settings, training=dict(prepared.settings["training"], ensemble=1))
    max_minutes = one.settings["training"]["max_minutes"]
    budget_s = None if max_minutes is None else max_minutes * 60.0
    started = time.monotonic()
    done = []
    for k in range(members):
        share_s = None if budget_s is None else max(0.0, budget_s - (time.monotonic() - started)) / (members - k)
        training = _Training(one, member_seed(seed, members, k), context)
        training.distribute()
        if context.is_main and progress:
            print("ensemble member {} of {} (seed {}){}".format(
                k + 1, members, training.seed, "" if share_s is None else ", {:.0f} s of the budget".format(share_s)),
                file=sys.stderr)
        # The run's clock (the history's seconds run on across members), this member's budget ending at its share.
        offset_s = time.monotonic() - started
        _run_epochs(training, _Clock(offset_s, None if share_s is None else (offset_s + share_s) / 60.0), context,
                    progress)
        done.append({"seed": training.seed, "model": training.model, "state": training.state,
                     "seconds": training.state.elapsed_s - offset_s})
        if context.is_main and progress:
            print("ensemble member {} of {}: validation R2 {:.3f} at epoch {} of {} ({}), {:.0f} s".format(
                k + 1, members, training.state.best_score, training.state.best_epoch, training.state.epoch,
                training.state.stopped, done[-1]["seconds"]), file=sys.stderr)
    model = merge_members([m["model"].cpu() for m in done]).to(context.device)
    state = _merged_state(done, prepared.settings["training"]["learning_rate"], prepared.class_head is not None)
    if context.is_main:
        # The merged model in the checkpoint's usual places, as a joint ensemble's (nothing there resumes).
        save_checkpoint(os.path.join(run_dir, FILES["checkpoint"]), {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "settings_digest": digest,
            "model_config": model.config.to_dict(), "model": _cpu_state(model.state_dict()),
            "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
            "best_model": _cpu_state(model.state_dict()), "state": state.to_dict(), "average": None})
    return {"model": model, "model_config": model.config, "state": state, "members": done}


def _merged_state(done, learning_rate, classes):
    """One TrainingState for the members trained one after another: their histories in a row (epochs
    numbered on), the epochs summed, best_epoch the last member's in that numbering, stopped "time budget"
    where any member ran out of its share."""
    state = TrainingState(learning_rate, classes)
    for member in done:
        for name in state.history:
            values = member["state"].history[name]
            state.history[name].extend([state.epoch + v for v in values] if name == "epoch" else values)
        state.best_epoch = state.epoch + member["state"].best_epoch
        state.epoch += member["state"].epoch
    stops = [m["state"].stopped for m in done]
    state.stopped = "time budget" if "time budget" in stops else stops[-1]
    state.best_score = max(m["state"].best_score for m in done)
    state.lr = done[-1]["state"].lr
    state.elapsed_s = done[-1]["state"].elapsed_s
    return state


class TrainingState(object):
    """How far training has come; the checkpoint holds it as "state", a dict of FIELDS.

    epoch        : last finished epoch
    best_score   : best validation mean R² so far, reached at best_epoch
    bad_epochs   : epochs since the last improvement (early stopping)
    lr_bad_epochs: the same for the learning-rate schedule, restarted at each cut
    lr           : learning rate of the next epoch
    elapsed_s    : training seconds, earlier sessions of a resumed run included
    stopped      : why training ended: "patience", "time budget", "epochs" ("" while it goes on)
    history      : per-epoch lists (HISTORY) for metrics.json and the report"""

    FIELDS = ("epoch", "best_score", "best_epoch", "bad_epochs", "lr_bad_epochs", "lr", "elapsed_s", "stopped",
              "history")
    HISTORY = ("epoch", "train_loss", "validation_loss", "validation_r2", "lr", "seconds", "batches")
    # Kept only by a run with a class head (train_loss stays the position MSE, comparable across runs).
    CLASS_HISTORY = ("train_class_loss", "validation_accuracy", "validation_balanced_accuracy")
    STOPPED = ("", "patience", "time budget", "epochs")

    def __init__(self, learning_rate, classes=False):
        self.epoch = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.lr_bad_epochs = 0
        self.lr = learning_rate
        self.elapsed_s = 0.0
        self.stopped = ""
        self.history = {name: [] for name in self.HISTORY + (self.CLASS_HISTORY if classes else ())}

    def to_dict(self):
        """The checkpoint's "state" entry (a plain dict of FIELDS, a copy)."""
        return copy.deepcopy({name: getattr(self, name) for name in self.FIELDS})

    def load_dict(self, values, source="checkpoint"):
        """Take the fields of a checkpoint's "state", refusing any of the wrong type (ConfigError)."""
        integer, number = (int, "an integer"), ((int, float), "a number")
        kinds = {"epoch": integer, "best_epoch": integer, "bad_epochs": integer, "lr_bad_epochs": integer,
                 "best_score": number, "lr": number, "elapsed_s": number, "stopped": (str, "text"),
                 "history": (dict, "a dict")}
        for name in self.FIELDS:
            value = values.get(name)
            kind, what = kinds[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError("checkpoint {!r}: training state {!r} is {!r}, not {}".format(
                    source, name, value, what))
        if (values["epoch"] < 0 or not 0 < values["lr"] < math.inf or not 0 <= values["elapsed_s"] < math.inf
                or values["stopped"] not in self.STOPPED):
            raise ConfigError("checkpoint {!r}: training state out of range (epoch {!r}, lr {!r}, elapsed_s {!r}, "
                              "stopped {!r})".format(source, values["epoch"], values["lr"], values["elapsed_s"],
                                                     values["stopped"]))
        history = values["history"]
        expected = sorted(self.history)
        if (sorted(history) != expected or not all(isinstance(history[k], list) for k in expected)
                or len({len(history[k]) for k in expected}) != 1
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                           for k in expected for x in history[k])):
            raise ConfigError("checkpoint {!r}: training history must hold equally long lists of numbers {}".format(
                source, ", ".join(expected)))
        for name in self.FIELDS:
            setattr(self, name, copy.deepcopy(values[name]))

    def record_epoch(self, losses, validation, n_batches):
        """Append the finished epoch (self.epoch) to the history."""
        history = self.history
        history["epoch"].append(self.epoch)
        history["train_loss"].append(float(np.mean([p for p, _ in losses])) if losses else float("nan"))
        if "train_class_loss" in history:
            class_losses = [c for _, c in losses if c is not None]
            history["train_class_loss"].append(float(np.mean(class_losses)) if class_losses else float("nan"))
            scores = validation.get("classes") or {}
            history["validation_accuracy"].append(scores.get("accuracy", float("nan")))
            history["validation_balanced_accuracy"].append(scores.get("balanced_accuracy", float("nan")))
        history["validation_loss"].append(validation["loss"])
        history["validation_r2"].append(validation["mean_r2"])
        history["lr"].append(self.lr)
        history["seconds"].append(self.elapsed_s)
        history["batches"].append(n_batches)

    def judge(self, score, settings):
        """Early stopping after an epoch with validation mean R² ``score``; True where it is a new best."""
        if score > self.best_score + settings["min_delta"]:
            self.best_score, self.best_epoch = score, self.epoch
            self.bad_epochs, self.lr_bad_epochs = 0, 0
            return True
        self.bad_epochs += 1
        self.step_lr_schedule(settings)
        if self.bad_epochs >= settings["patience"]:
            self.stopped = "patience"
        return False

    def step_lr_schedule(self, settings):
        """After an epoch without improvement: cut the learning rate once lr_patience of them have passed."""
        if settings.get("lr_schedule") == "cosine":
            return
        self.lr_bad_epochs += 1
        if self.lr_bad_epochs >= settings["lr_patience"]:
            self.lr *= settings["lr_factor"]
            self.lr_bad_epochs = 0


class _Clock(object):
    """Training time, counting the seconds of earlier sessions of a resumed run."""

    def __init__(self, elapsed_s, max_minutes):
        self.started = time.monotonic() - elapsed_s
        self.budget_s = None if max_minutes is None else max_minutes * 60.0

    def elapsed_s(self):
        return time.monotonic() - self.started

    def out_of_time(self, context):
        # Without a budget no process asks, so none waits in _agree's broadcast.
        return self.budget_s is not None and _agree(context, self.elapsed_s() > self.budget_s)


class _Training(object):
    """One process's training: model (and its DDP wrapper), optimiser, best weights and TrainingState."""

    def __init__(self, prepared, seed, context):
        self.prepared = prepared
        self.settings = prepared.settings["training"]
        self.seed = seed
        self.context = context
        self.model_config, self.model = _build(prepared, seed, context)
        self.members = check_members(self.model_config, self.settings["ensemble"])
        self.masks = {name: mask.to(context.device) for name, mask in ensemble_masks(self.model, self.members).items()}
        # Members read pieces of their own where each has its own input projection (see RNNDecoder.forward).
        self.members_apart = self.members > 1 and self.model_config.input_projection is not None
        init_ensemble(self.model, self.masks, self.members)
        self.anchor = None
        if prepared.init is not None:
            self.anchor = _load_init_weights(self.model, prepared.init, context.device)
        self.member_threads = 0
        if self.members > 1 and is_block_diagonal(self.model, self.masks):
            # Member by member: the same model, in about 1/members of the recurrent layers' time.
            self.model.block_members = self.members
            if not context.distributed:
                # Each member's step a graph of its own, on --threads threads side by side (DDP needs the
                # one graph of the wide model).
                self.member_threads = min(torch.get_num_threads(), self.members)
        self.train_model = self.model
        # An ensemble's wide weights are mostly zeros between the members: the fused optimiser passes over
        # them once per step instead of once per operation (3 times faster at 6 members).
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.settings["learning_rate"],
                                           weight_decay=self.settings["weight_decay"],
                                           fused=True if self.member_threads else None)
        self.state = TrainingState(self.settings["learning_rate"], classes=prepared.class_head is not None)
        self.class_weights = None
        if prepared.class_head is not None and prepared.class_head.weights is not None:
            self.class_weights = torch.tensor(prepared.class_head.weights, dtype=torch.float32,
                                              device=context.device)
        self.best_model = _cpu_state(self.model.state_dict())
        self.average = WeightAverage(self.model, self.settings["ema_decay"]) if self.settings["ema_decay"] else None
        self.lengths = [len(s.features) for s in prepared.sequences["train"]]
        self.joint_weights = None
        if self.settings["joint_weights"]:
            # Mean R² divides each output's squared error by its variance; so does this loss.
            inverse = 1.0 / np.maximum(np.concatenate(prepared.targets).var(axis=0), 1e-6)
            self.joint_weights = torch.tensor(inverse / inverse.mean(), dtype=torch.float32, device=context.device)
        self.steps_per_s = dataset.steps_per_second(prepared.pipeline)

    def resume(self, checkpoint_path, digest, run_dir, document=None):
        """Continue from the checkpoint (``document``: it loaded already): weights, optimiser, best weights, state."""
        if document is None:
            document = load_checkpoint(checkpoint_path)
        if document["settings_digest"] != digest:
            raise UsageError("the checkpoint in {!r} was trained with other settings, data or seed; resume with "
                             "the same recordings, --config, --seed and --init-from".format(run_dir))
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        for key in ("model", "best_model"):
            got = {k: tuple(v.shape) for k, v in document[key].items()}
            if got != expected:
                raise ConfigError("checkpoint {!r}: its {} does not fit this model ({})".format(
                    checkpoint_path, key, _difference(expected, got)))
        try:
            self.model.load_state_dict(document["model"])
            self.optimizer.load_state_dict(document["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ConfigError("checkpoint {!r} does not fit this model and optimiser ({})".format(
                checkpoint_path, _first_line(exc))) from None
        # The optimiser takes its moments as they come; a wrong shape would only fail at the first step.
        for parameter, moments in self.optimizer.state.items():
            for name, value in moments.items():
                if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != parameter.shape):
                    raise ConfigError("checkpoint {!r}: optimiser state {!r} does not fit its parameter".format(
                        checkpoint_path, name))
        self.best_model = document["best_model"]
        if self.average is not None:
            self.average.load_dict(document.get("average"), checkpoint_path)
        self.state.load_dict(document["state"], checkpoint_path)
        if self.state.stopped != "patience":
            # A time budget or epoch limit may be extended on resume; early stopping is final.
            self.state.stopped = ""

    def distance_to_anchor(self):
        """L2-SP: the squared distance of the weights to the earlier run's, summed over all parameters
        (Li, Grandvalet & Davoine 2018, "Explicit inductive bias for transfer learning with CNNs")."""
        return sum(((p - self.anchor[name]) ** 2).sum() for name, p in self.model.named_parameters())

    def save_checkpoint(self, checkpoint_path, digest):
        save_checkpoint(checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "settings_digest": digest,
            "model_config": self.model_config.to_dict(), "model": _cpu_state(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(), "best_model": self.best_model,
            "state": self.state.to_dict(), "average": None if self.average is None else self.average.to_dict()})

    def distribute(self):
        """Under torchrun, train through DistributedDataParallel (it averages the gradients)."""
        if self.context.distributed:
            from torch.nn.parallel import DistributedDataParallel
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.context.device.index] if self.context.device.type == "cuda" else None)

    def run_epoch(self, clock, progress):
        """Train one epoch, validate, update the state; the validation scores."""
        state = self.state
        epoch = state.epoch + 1
        losses, n_batches, out_of_time = self.train_epoch(epoch, clock, progress)
        class_targets = (self.prepared.class_targets or {}).get("validation")
        # With weight averaging the averaged weights are the ones validated, kept and exported.
        judged = self.model if self.average is None else self.average.model
        validation, _ = score_sequences(judged, self.prepared.sequences["validation"], self.context.device,
                                        class_targets)
        state.epoch = epoch
        state.elapsed_s = clock.elapsed_s()
        state.record_epoch(losses, validation, n_batches)
        if state.judge(validation["mean_r2"], self.settings):
            self.best_model = _cpu_state(judged.state_dict())
        if out_of_time:
            state.stopped = "time budget"
        return validation

    def train_epoch(self, epoch, clock, progress):
        """TBPTT over this process's share of the epoch's batches.

        Returns (chunk losses, number of batches in the share, whether the time budget ran out); a chunk's
        loss is (position MSE, class cross-entropy or None)."""
        context, settings = self.context, self.settings
        if settings["lr_schedule"] == "cosine":
            # A function of the epoch only, so a resumed run follows the same curve.
            progress_made = (epoch - 1) / settings["epochs"]
            self.state.lr = settings["learning_rate"] * 0.5 * (1.0 + math.cos(math.pi * progress_made))
        for group in self.optimizer.param_groups:
            group["lr"] = self.state.lr
        # Dropout and piece offsets depend on (seed, epoch) only: resuming repeats them exactly.
        torch.manual_seed(self.seed * 1000003 + epoch * 101 + context.rank)
        batches = plan_epoch(self.lengths, settings, self.steps_per_s, self.seed, epoch, context.world_size)
        mine = batches[context.rank::context.world_size]
        group_steps = _group_steps(batches, context.world_size)
        if self.members_apart:
            # Each member its own draw of pieces, as if trained alone: the members differ by more than
            # their initial weights (the diversity an ensemble lives on).
            draws = [batches] + [plan_epoch(self.lengths, settings, self.steps_per_s, self.seed, epoch,
                                            context.world_size, stream=k) for k in range(1, self.members)]
            n = min(len(d) for d in draws)
            mine = [list(group) for group in zip(*[d[:n][context.rank::context.world_size] for d in draws])]
            group_steps = [max(steps) for steps in zip(*[_group_steps(d[:n], context.world_size) for d in draws])]
        bar = _progress_bar(len(mine), epoch, settings["epochs"], progress and context.is_main)
        losses = []
        out_of_time = False
        self.model.train()
        for batch, n_steps in zip(mine, group_steps):
            losses.extend(self.train_batch(batch, n_steps))
            bar.update(1)
            if clock.out_of_time(context):
                out_of_time = True
                break
        bar.close()
        return losses, len(mine), out_of_time

    def train_batch(self, batch, n_steps):
        """One batch, ``tbptt_steps`` at a time: an optimiser step per chunk, the recurrent state carried
        on detached.  Returns the losses (position MSE, class cross-entropy or None) of the chunks that hold
        real (unpadded) steps.

        With a class head the objective is MSE(sigmoid(position logits), targets) + class_weight x
        cross-entropy(class logits, class targets)."""
        settings, device = self.settings, self.context.device
        class_targets = None if self.prepared.class_head is None else self.prepared.class_targets["train"]
        parts = []
        for pieces in (batch if self.members_apart else [batch]):
            speeds = None
            if settings["time_warp"] > 0:
                # Drawn from the epoch-seeded torch generator, as the input noise: resuming repeats them.
                speeds = np.exp((2.0 * torch.rand(len(pieces)).double().numpy() - 1.0)
                                * math.log1p(settings["time_warp"]))
            parts.append(collate(self.prepared.sequences["train"], pieces, n_steps, self.prepared.targets,
                                 class_targets, speeds))
        if self.members_apart:      # members along dim 2: x (B, T, members, F), y, mask, c likewise
            rows = max(len(pieces) for pieces in batch)     # a draw's last batch may be short: padded
            parts = [[_pad_rows(t, rows) for t in tensors] for tensors in parts]
            parts = [[torch.stack(tensors, dim=2) for tensors in zip(*parts)]]
        tensors = [t.to(device) for t in parts[0]]
        x, y, mask = tensors[:3]
        c = tensors[3] if class_targets is not None else None
        n_positions = self.model_config.n_outputs
        if settings["input_noise"] > 0:
            # Drawn on the CPU from the epoch-seeded generator: the same on any device.
            x = x + (settings["input_noise"] * torch.randn(x.shape)).to(device)
        losses = []
        hidden = None
        l2sp = settings.get("l2sp", 0.0) if self.anchor is not None else 0.0
        frozen = [p for name, p in self.model.named_parameters() if name.startswith(RECURRENT_PREFIX)] \
            if self.state.epoch < settings.get("freeze_recurrent_epochs", 0) else []
        for start in range(0, n_steps, settings["tbptt_steps"]):
            stop = start + settings["tbptt_steps"]
            if self.member_threads:
                chunk_classes = None if c is None else c[:, start:stop]
                loss, class_loss, hidden = self.members_step(x[:, start:stop], hidden, y[:, start:stop],
                                                             mask[:, start:stop], chunk_classes, l2sp)
                objective = None
            elif self.members > 1:
                chunk_classes = None if c is None else c[:, start:stop]
                loss, class_loss, hidden = self.ensemble_losses(x[:, start:stop], hidden, y[:, start:stop],
                                                                mask[:, start:stop], chunk_classes)
                objective = loss if c is None else loss + settings["class_weight"] * class_loss
            elif c is None:
                outputs, hidden = self.train_model(x[:, start:stop], hidden)
                loss = masked_mse(outputs, y[:, start:stop], mask[:, start:stop], self.joint_weights)
                objective, class_loss = loss, None
            else:
                logits, hidden = self.train_model(x[:, start:stop], hidden, logits=True)
                loss = masked_mse(torch.sigmoid(logits[..., :n_positions]), y[:, start:stop], mask[:, start:stop],
                                  self.joint_weights)
                class_loss = masked_cross_entropy(logits[..., n_positions:], c[:, start:stop], self.class_weights)
                objective = loss + settings["class_weight"] * class_loss
            if objective is not None:
                if l2sp > 0:
                    objective = objective + l2sp * self.distance_to_anchor()
                self.optimizer.zero_grad(set_to_none=True)
                objective.backward()
            for name, parameter in self.model.named_parameters():
                if name in self.masks and parameter.grad is not None and not self.member_threads:
                    parameter.grad.mul_(self.masks[name])     # the members stay apart
            for parameter in frozen:
                parameter.grad = None       # the optimiser skips a parameter without a gradient
            if settings["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings["grad_clip"])
            self.optimizer.step()
            if self.average is not None:
                self.average.update(self.model)
            hidden = detach_state(hidden)
            if float(mask[:, start:stop].sum()) > 0:
                losses.append((float(loss.detach()), None if class_loss is None else float(class_loss.detach())))
        return losses

    def members_step(self, x, hidden, y, mask, c, l2sp):
        """:meth:`ensemble_losses` and the gradients of the objective, member by member: each member's
        forward and backward pass is a graph of its own (train/model.py ``member_forward``), run on
        ``member_threads`` threads side by side.  The gradients are summed in member order and the dropout
        masks drawn in member order, so the result does not depend on the number of threads.  Leaves the
        gradients in the parameters' ``grad``; returns (position MSE, class cross-entropy or None, state)."""
        model, members, n_positions = self.model, self.members, self.model_config.n_outputs
        apart = y.dim() == 4            # members along dim 2: each reads its own pieces
        width = self.model_config.hidden_size // members
        # The wide losses' denominators (see ensemble_losses): every member's loss is its share of them.
        steps = mask.sum().clamp(min=1.0) * (1 if apart else members)
        if c is not None:
            c = c if apart else c.unsqueeze(2).expand(-1, -1, members)
            classified = (c != dataset.NO_CLASS).sum().clamp(min=1)
        dropout = member_dropout_masks(model, members, x.shape[0], x.shape[1])
        # Each member's own weights as leaves of its graph: its gradients stay member-sized (taken
        # through the wide weights they would be wide tensors of zeros, members-squared work).
        slots = [member_slots(model, members, k) for k in range(members)]
        with torch.no_grad():
            own = [[parameter[index].clone().requires_grad_() for parameter, index in member] for member in slots]
        bias = model.head.bias

        def member(k):
            units = slice(k * width, (k + 1) * width)
            state = None if hidden is None else (
                tuple(h[..., units] for h in hidden) if isinstance(hidden, tuple) else hidden[..., units])
            logits, state = member_forward(model, members, k, x[:, :, k] if apart else x, state, dropout[k],
                                           own[k])
            loss = masked_mse(torch.sigmoid(logits[..., :n_positions]), y[:, :, k] if apart else y,
                              mask[:, :, k] if apart else mask, self.joint_weights, steps)
            objective, class_loss = loss, None
            if c is not None:
                class_loss = masked_cross_entropy(logits[..., n_positions:], c[:, :, k], self.class_weights,
                                                  classified)
                objective = objective + self.settings["class_weight"] * class_loss
            gradients = torch.autograd.grad(objective, own[k] + [bias])
            return loss.detach(), None if class_loss is None else class_loss.detach(), state, gradients

        if self.member_threads > 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)        # one thread per op: the members are the parallel work
            try:
                with ThreadPoolExecutor(self.member_threads) as pool:
                    results = list(pool.map(member, range(members)))
            finally:
                torch.set_num_threads(threads)
        else:
            results = [member(k) for k in range(members)]
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        for k, result in enumerate(results):        # in member order: the same sums on any number of threads
            for (parameter, index), gradient in zip(slots[k], result[3]):
                parameter.grad[index] = gradient
            bias.grad += result[3][-1]
        if l2sp > 0:
            anchor = torch.autograd.grad(l2sp * self.distance_to_anchor(), list(model.parameters()))
            for parameter, gradient in zip(model.parameters(), anchor):
                parameter.grad += gradient
        loss = sum(r[0] for r in results)
        class_loss = None if c is None else sum(r[1] for r in results)
        states = [r[2] for r in results]
        if isinstance(states[0], tuple):
            return loss, class_loss, tuple(torch.cat([s[i] for s in states], dim=-1) for i in range(2))
        return loss, class_loss, torch.cat(states, dim=-1)

    def ensemble_losses(self, x, hidden, y, mask, c):
        """An ensemble's losses, each the mean over the members of the member's own loss (each member
        learns the task alone; only the exported output averages them).  Returns (position MSE, class
        cross-entropy or None, state)."""
        members, n_positions = self.members, self.model_config.n_outputs
        logits, hidden = self.train_model(x, hidden, members=members)
        if y.dim() == 3:            # the members read the same pieces
            y, c = y.unsqueeze(2), None if c is None else c.unsqueeze(2).expand(-1, -1, members)
        loss = masked_mse(torch.sigmoid(logits[..., :n_positions]), y, mask, self.joint_weights)
        class_loss = None
        if c is not None:
            class_loss = masked_cross_entropy(logits[..., n_positions:], c, self.class_weights)
        return loss, class_loss, hidden


class WeightAverage(object):
    """Exponential moving average of the weights, updated after every optimiser step (Polyak averaging;
    the average of a noisy descent sits nearer the flat middle of the minimum than its last step).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first steps n, so the random
    initial weights do not linger in the average (as TensorFlow's ExponentialMovingAverage)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def update(self, model):
        self.steps += 1
        decay = min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            for average, current in zip(self.model.state_dict().values(), model.state_dict().values()):
                if average.dtype.is_floating_point:
                    average.mul_(decay).add_(current, alpha=1.0 - decay)
                else:
                    average.copy_(current)

    def to_dict(self):
        return {"steps": self.steps, "weights": _cpu_state(self.model.state_dict())}

    def load_dict(self, document, source):
        if (not isinstance(document, dict) or not isinstance(document.get("steps"), int)
                or not isinstance(document.get("weights"), dict)):
            raise ConfigError("checkpoint {!r} lacks the weight average (training ema_decay) it was trained "
                              "with".format(source))
        try:
            self.model.load_state_dict(document["weights"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ConfigError("checkpoint {!r}: its weight average does not fit this model ({})".format(
                source, _first_line(exc))) from None
        self.steps = document["steps"]


def _load_init_weights(model, init, device):
    """Load the earlier run's best weights into ``model``; returns them on ``device`` (the L2-SP anchor)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in init.weights.items()}
    if got != expected:
        raise ConfigError("--init-from {!r}: its weights do not fit the model ({})".format(
            init.run_dir, _difference(expected, got)))
    model.load_state_dict(init.weights)
    return {name: init.weights[name].detach().to(device) for name, _ in model.named_parameters()}


def _difference(expected, got):
    """A short description of how two {name: shape} dicts differ."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        return "missing {}, unexpected {}".format(", ".join(missing[:3]) or "none", ", ".join(extra[:3]) or "none")
    name = next(k for k in sorted(expected) if expected[k] != got[k])
    return "{} has shape {}, the model {}".format(name, got[name], expected[name])


def _group_steps(batches, world_size):
    """Steps to pad each of this process's batches to: the longest piece of the batches that the
    ``world_size`` processes run side by side, so all of them run as many TBPTT chunks (under DDP
    every backward pass is a collective)."""
    return [max(stop - start for _, start, stop in [p for b in batches[i:i + world_size] for p in b])
            for i in range(0, len(batches), world_size)]


def _print_epoch(state, validation):
    classes = ""
    if "classes" in validation:
        classes = ", class loss {:.3f}, validation balanced accuracy {:.3f}".format(
            state.history["train_class_loss"][-1], validation["classes"]["balanced_accuracy"])
    print("epoch {}: train loss {:.4f}, validation R2 {:.3f} (best {:.3f} at epoch {}){}, {:.0f} s".format(
        state.epoch, state.history["train_loss"][-1], validation["mean_r2"], state.best_score,
        state.best_epoch, classes, state.elapsed_s), file=sys.stderr)


def _agree(context, flag):
    """Under torchrun every process must stop together: rank 0's clock decides."""
    if not context.distributed:
        return flag
    import torch.distributed as dist
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if context.device.type == "cuda":
        value = value.to(context.device)
    dist.broadcast(value, src=0)
    return bool(value.item())


class _NoBar(object):
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(total, epoch, epochs, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc="epoch {}/{}".format(epoch, epochs), unit="batch", file=sys.stderr,
                leave=False, dynamic_ncols=True)


def inference_copy(model, model_config):
    """(model, config) computing the same function with dropout 0, in eval mode.

    Dropout only acts in training, so the copy decodes identically; exporting
    it keeps a training-only setting out of the deployed file (and out of the
    export's parity check, which compares stepping in whatever mode the
    exporter leaves the model)."""
    values = model_config.to_dict()
    values["dropout"] = 0.0
    config = ModelConfig.from_dict(values)
    copy_model = build_model(config)
    copy_model.load_state_dict(model.state_dict())
    copy_model.eval()
    return copy_model, config


def _write_outputs(prepared, run_dir, seed, context, result, light=False):
    """config.json, model.onnx, model_plain.onnx, metrics.json and report.png from the best model (rank 0);
    ``light``: the first and the metrics only (see train_run)."""
    from neurohand.train.export import export_onnx, export_plain_onnx
    from neurohand.train import report

    model, model_config, state = result["model"], result["model_config"], result["state"]
    first = prepared.recordings[0]
    config = {
        "format": RUN_FORMAT, "version": RUN_VERSION,
        "mode": prepared.settings["mode"],
        "pipeline": prepared.pipeline.to_config(),
        "model": model_config.to_dict(),
        "labels": {"stream": first.labels.name, "names": list(first.labels.names), "rate": first.labels.rate,
                   "scaling": prepared.label_scaling.to_config()},
        "split": {"settings": prepared.settings["split"], "guard_samples": dataset.guard_samples(prepared.pipeline),
                  "recordings": [dict(splits.describe(method, segments, rec.signal_rate),
                                      recording=os.path.basename(rec.path))
                                 for rec, (method, segments) in zip(prepared.recordings, prepared.plans)]},
        "settings": prepared.settings,
        "recordings": [os.path.abspath(r.path) for r in prepared.recordings],
        # Which sessions the run has seen (held-in for neurohand evaluate), whatever their paths become.
        "recordings_sha256": [sha256_of(r.path) for r in prepared.recordings],
        "channel_names": first.channel_names,
        # The one patient all the recordings are of (None where any does not say or two differ); a
        # fine-tuned run keeps its earlier run's where its new session does not say.  neurohand recalibrate
        # refuses another patient's session with it (docs/recalibration.md).
        "patient": _run_patient(prepared),
        # The class head's value -> output mapping (dataset.ClassHead), None without a head.
        "classes": None if prepared.class_head is None else prepared.class_head.to_config(),
        "seed": seed,
        "init_from": None if prepared.init is None else prepared.init.record,
    }
    write_json_atomic(os.path.join(run_dir, FILES["config"]), config)
    model = model.cpu()
    onnx_path = os.path.join(run_dir, FILES["onnx"])
    onnx_report = export_onnx(*inference_copy(model, model_config), path=onnx_path)
    # The same step without a GRU/LSTM node, for TensorRT 8.x (build-engine --graph plain, or its fallback).
    if not light:
        export_plain_onnx(*inference_copy(model, model_config), path=os.path.join(run_dir, FILES["onnx_plain"]),
                          reference_onnx=onnx_path)
    scores, predictions = {}, {}
    for name in splits.SPLIT_NAMES:
        scores[name], predictions[name] = score_sequences(model, prepared.sequences[name], torch.device("cpu"),
                                                          (prepared.class_targets or {}).get(name))
    history = state.history
    summary = {
        "run_dir": os.path.abspath(run_dir),
        "scores": scores,
        "label_names": list(first.labels.names),
        "class_names": list(model_config.class_names),
        "history": history,
        "epochs_run": state.epoch, "best_epoch": state.best_epoch, "stopped": state.stopped,
        "train_seconds": state.elapsed_s,
        "device": str(context.device), "world_size": context.world_size, "seed": seed,
        "n_windows": {name: int(sum(len(s.features) for s in prepared.sequences[name]))
                      for name in splits.SPLIT_NAMES},
        "onnx": {k: onnx_report[k] for k in onnx_report if k in ("sha256", "max_abs_error", "steps_checked",
                                                                  "check_steps", "errors", "opset")},
        "scores_in": "labels scaled to 0..1 (see config.json labels.scaling); R2 and r are unaffected",
        "features": dict(prepared.windows, mode=prepared.settings["mode"], summary=describe_windows(prepared.windows)),
        "init_from": None if prepared.init is None else prepared.init.record,
    }
    if result.get("members"):
        summary["ensemble_members"] = [
            {"seed": m["seed"], "epochs_run": m["state"].epoch, "best_epoch": m["state"].best_epoch,
             "stopped": m["state"].stopped, "train_seconds": m["seconds"],
             "mean_r2": {name: score_sequences(m["model"].cpu(), prepared.sequences[name], torch.device("cpu"))[0][
                 "mean_r2"] for name in ("validation", "test")}}
            for m in result["members"]]
    write_json_atomic(os.path.join(run_dir, FILES["metrics"]), summary)
    if light:
        return metrics.json_ready(summary)
    test = prepared.sequences["test"]
    test_classes = scores["test"].get("classes")
    report.write_report(os.path.join(run_dir, FILES["report"]),
                        truth=np.concatenate([s.labels for s in test]),
                        prediction=np.concatenate(predictions["test"]),
                        steps_per_s=dataset.steps_per_second(prepared.pipeline),
                        label_names=list(first.labels.names), r2=scores["test"]["r2"], history=history,
                        title="{} - test mean R2 {:.3f}".format(os.path.basename(first.path),
                                                                 scores["test"]["mean_r2"]),
                        classes=None if not test_classes else dict(test_classes,
                                                                    class_names=list(model_config.class_names)))
    return metrics.json_ready(summary)
