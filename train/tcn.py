"""A small causal temporal convolutional network (TCN): the non-recurrent baseline (PyTorch; workstation only).

Architecture after Bai, Kolter and Koltun, *An empirical evaluation of generic
convolutional and recurrent networks for sequence modeling* (arXiv:1803.01271,
2018): residual blocks, each two dilated causal 1-D convolutions (weight
normalisation, ReLU, dropout) with a 1x1 convolution on the skip path where
the width changes; the dilation doubles from block to block::

    features (n_steps, n_features)
      -> block(d=1) -> block(d=2) -> ... -> block(d=2**(levels-1))     width ``channels``
      -> Linear(channels, n_outputs) -> sigmoid                        as the RNN's head

The receptive field is ``1 + 2 (kernel - 1) (2**levels - 1)`` steps (the
defaults: 253 steps, 5 s at 50 steps per second, close to the 3.8 s the
Wiener filter picks on NinaPro).  Causality is by construction: every
convolution is a "valid" one over the input padded on the left, and the
segment's first feature vector stands for the steps before it (as
``baselines.lagged`` does), so output t never reads a feature after t.

Training follows the RNN's recipe and budget (train/trainer.py defaults for
envelope data): MSE on labels scaled to 0..1, AdamW (lr 3e-3, weight decay
1e-4), gradient norm clipped at 1, Gaussian input noise 0.2, dropout 0.2,
learning rate halved after 3 epochs without validation improvement, early
stopping after 10 (best validation mean R² kept, min_delta 1e-3), at most 100
epochs and optionally ``max_minutes``.  Batches are the RNN's too: 8
pieces of 4 s (200 steps) with a random first cut per epoch; the TCN takes
one optimiser step per batch where the RNN takes one per 50-step
back-propagation chunk (the TCN has no state to carry between chunks, and
shorter pieces would cost more: each piece is fed with the receptive field's
worth of real history before it, the loss covering the piece only, so
training sees exactly what decoding a whole segment computes).
"""
import time

import numpy as np
import torch
from torch import nn

from neurohand.train import metrics

# Bai et al.'s generic TCN, sized to the RNN (GRU 2 x 128 with a 64 projection, ~170 k parameters).
DEFAULT_CHANNELS = 64
DEFAULT_LEVELS = 6
DEFAULT_KERNEL = 3
# The RNN's envelope-mode training defaults (train/trainer.py TRAINING_DEFAULTS and MODE_DEFAULTS).
DEFAULT_TRAINING = {
    "epochs": 100, "learning_rate": 3e-3, "weight_decay": 1e-4, "batch_size": 8, "piece_steps": 200,
    "grad_clip": 1.0, "patience": 10, "min_delta": 1e-3, "lr_patience": 3, "lr_factor": 0.5,
    "input_noise": 0.2, "dropout": 0.2, "max_minutes": None,
}


def settings_from_run(run_settings, seed, steps_per_s, threads=1):
    """TCNDecoder keywords that train it on a run's budget and recipe (config.json ``settings``).

    The run's epochs, time budget, optimiser, schedule, stopping rule, piece length, batch size, input
    noise and dropout; ``seed`` is the run's (or any other: the TCN's figures depend on it)."""
    training, model = run_settings["training"], run_settings.get("model", {})
    keywords = {key: training[key] for key in ("epochs", "learning_rate", "weight_decay", "batch_size", "grad_clip",
                                               "patience", "min_delta", "lr_patience", "lr_factor", "input_noise",
                                               "max_minutes") if key in training}
    keywords["piece_steps"] = max(1, int(round(training.get("sequence_s", 4.0) * steps_per_s)))
    keywords["dropout"] = model.get("dropout", DEFAULT_TRAINING["dropout"])
    keywords.update(seed=int(seed), threads=int(threads))
    return keywords


def receptive_field(levels, kernel):
    """Steps one output reads (its own included): two convolutions per level, dilation 2**level."""
    return 1 + 2 * (kernel - 1) * (2 ** levels - 1)


class _Block(nn.Module):
    """Two dilated causal convolutions with a residual path (Bai et al. 2018, figure 1b).

    Convolutions are unpadded ("valid"): the output is ``2 (kernel - 1) dilation``
    steps shorter than the input, and the residual path drops as many of its
    oldest steps, so step t of the output depends on input steps <= t only."""

    def __init__(self, n_in, n_out, kernel, dilation, dropout):
        super().__init__()
        weight_norm = nn.utils.parametrizations.weight_norm
        self.first = weight_norm(nn.Conv1d(n_in, n_out, kernel, dilation=dilation))
        self.second = weight_norm(nn.Conv1d(n_out, n_out, kernel, dilation=dilation))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv1d(n_in, n_out, 1) if n_in != n_out else None
        self.shrink = 2 * (kernel - 1) * dilation

    def forward(self, x):
        """x (batch, channels, time) -> (batch, n_out, time - shrink)."""
        y = self.dropout(torch.relu(self.first(x)))
        y = self.dropout(torch.relu(self.second(y)))
        residual = x[:, :, self.shrink:]
        if self.skip is not None:
            residual = self.skip(residual)
        return torch.relu(y + residual)


class TemporalConvNet(nn.Module):
    """Blocks of doubling dilation, then a per-step linear head with sigmoid (outputs in 0..1)."""

    def __init__(self, n_features, n_outputs, channels=DEFAULT_CHANNELS, levels=DEFAULT_LEVELS,
                 kernel=DEFAULT_KERNEL, dropout=0.0):
        super().__init__()
        widths = [n_features] + [channels] * levels
        self.blocks = nn.Sequential(*[_Block(widths[i], widths[i + 1], kernel, 2 ** i, dropout)
                                      for i in range(levels)])
        self.head = nn.Linear(channels, n_outputs)
        self.history = receptive_field(levels, kernel) - 1

    def forward(self, x):
        """x (batch, history + time, n_features) -> (batch, time, n_outputs): the first ``history``
        input steps are context only."""
        hidden = self.blocks(x.transpose(1, 2)).transpose(1, 2)
        return torch.sigmoid(self.head(hidden))


def _padded(features, history):
    """``features`` (n_steps, n_features) with ``history`` copies of its first row in front."""
    features = np.asarray(features, dtype=np.float32)
    return np.concatenate([np.repeat(features[:1], history, axis=0), features], axis=0)


class TCNDecoder(object):
    """The TCN as a baseline: ``fit(train_segments, validation_segments)``, ``predict(features)``.

    Segments are ``(features, labels)`` pairs as in train/baselines.py.  The
    constructor only stores the configuration; ``seed`` fixes the weights'
    initialisation, the pieces and the noise, so one seed gives one result on
    one machine and torch build.  ``threads``: torch threads while fitting and
    predicting (the trainer's default is 1).  Other keywords override
    :data:`DEFAULT_TRAINING`."""

    def __init__(self, channels=DEFAULT_CHANNELS, levels=DEFAULT_LEVELS, kernel=DEFAULT_KERNEL, seed=0, threads=1,
                 **training):
        unknown = sorted(set(training) - set(DEFAULT_TRAINING))
        if unknown:
            raise ValueError("unknown TCN setting(s) {}; known: {}".format(unknown, sorted(DEFAULT_TRAINING)))
        if int(channels) < 1 or int(levels) < 1 or int(kernel) < 2:
            raise ValueError("TCN needs channels >= 1, levels >= 1 and kernel >= 2")
        self.channels, self.levels, self.kernel = int(channels), int(levels), int(kernel)
        self.seed = int(seed)
        self.threads = int(threads)
        self.training = dict(DEFAULT_TRAINING)
        self.training.update(training)

    # --- fitting ------------------------------------------------------------------

    def fit(self, train_segments, validation_segments=None):
        """Train on ``train_segments``; early stopping and the learning-rate schedule on
        ``validation_segments`` (without them: every epoch runs and the last weights are kept)."""
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._fit(train_segments, validation_segments)
        finally:
            torch.set_num_threads(previous_threads)
        return self

    def _fit(self, train_segments, validation_segments):
        t = self.training
        torch.manual_seed(self.seed)
        n_features = np.shape(train_segments[0][0])[1]
        n_outputs = np.shape(train_segments[0][1])[1]
        self.model_ = TemporalConvNet(n_features, n_outputs, self.channels, self.levels, self.kernel, t["dropout"])
        history = self.model_.history
        padded = [_padded(f, history) for f, _ in train_segments]
        labels = [np.asarray(l, dtype=np.float32) for _, l in train_segments]
        optimizer = torch.optim.AdamW(self.model_.parameters(), lr=t["learning_rate"], weight_decay=t["weight_decay"])
        lr = t["learning_rate"]
        best_r2, best_state, bad, lr_bad = -np.inf, None, 0, 0
        self.history_ = {"epoch": [], "train_loss": [], "validation_r2": [], "seconds": []}
        started = time.perf_counter()
        budget_s = None if t["max_minutes"] is None else 60.0 * float(t["max_minutes"])
        self.stopped_ = "epochs"
        for epoch in range(1, int(t["epochs"]) + 1):
            rng = np.random.default_rng([self.seed, epoch])
            torch.manual_seed(self.seed * 1000003 + epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pieces = _pieces([len(l) for l in labels], int(t["piece_steps"]), rng)
            self.model_.train()
            losses = []
            for first in range(0, len(pieces), int(t["batch_size"])):
                batch = pieces[first:first + int(t["batch_size"])]
                losses.append(self._step(optimizer, padded, labels, batch, history))
            validation_r2 = np.nan
            if validation_segments:
                validation_r2 = _mean_r2(self, validation_segments)
            self.history_["epoch"].append(epoch)
            self.history_["train_loss"].append(float(np.mean(losses)))
            self.history_["validation_r2"].append(float(validation_r2))
            self.history_["seconds"].append(time.perf_counter() - started)
            # The trainer's rule (TrainingState.judge): a new best must beat the old by min_delta.
            score = validation_r2 if np.isfinite(validation_r2) else -np.inf
            if not validation_segments or best_state is None or score > best_r2 + t["min_delta"]:
                best_r2, self.best_epoch_ = score, epoch
                best_state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
                bad = lr_bad = 0
            else:
                bad += 1
                lr_bad += 1
                if lr_bad >= t["lr_patience"]:
                    lr *= t["lr_factor"]
                    lr_bad = 0
                if bad >= t["patience"]:
                    self.stopped_ = "patience"
                    break
            if budget_s is not None and time.perf_counter() - started >= budget_s:
                self.stopped_ = "time budget"
                break
        self.model_.load_state_dict(best_state)
        self.model_.eval()
        self.epochs_run_ = epoch
        self.train_seconds_ = time.perf_counter() - started
        self.validation_r2_ = float(best_r2) if validation_segments and np.isfinite(best_r2) else float("nan")

    def _step(self, optimizer, padded, labels, batch, history):
        """One optimiser step on a batch of (segment, start, stop) pieces of equal length or shorter."""
        t = self.training
        n_steps = max(stop - start for _, start, stop in batch)
        n_features = padded[0].shape[1]
        x = np.zeros((len(batch), history + n_steps, n_features), dtype=np.float32)
        y = np.zeros((len(batch), n_steps, labels[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(batch), n_steps), dtype=np.float32)
        for row, (index, start, stop) in enumerate(batch):
            n = stop - start
            # padded[index] row start + history is step ``start``: take ``history`` rows before it.
            x[row, :history + n] = padded[index][start:stop + history]
            y[row, :n] = labels[index][start:stop]
            mask[row, :n] = 1.0
        x, y, mask = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)
        if t["input_noise"] > 0:
            x = x + t["input_noise"] * torch.randn(x.shape)
        outputs = self.model_(x)
        loss = (((outputs - y) ** 2).mean(dim=2) * mask).sum() / mask.sum().clamp(min=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model_.parameters(), t["grad_clip"])
        optimizer.step()
        return float(loss.detach())

    # --- decoding -----------------------------------------------------------------

    def predict(self, features):
        """Decode one segment causally: features (n_steps, n_features) -> (n_steps, n_outputs) float64."""
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        was_training = self.model_.training
        self.model_.eval()
        try:
            with torch.no_grad():
                x = torch.from_numpy(_padded(features, self.model_.history)).unsqueeze(0)
                return self.model_(x)[0].double().numpy()
        finally:
            self.model_.train(was_training)
            torch.set_num_threads(previous_threads)

    def settings(self):
        """Architecture and what training did, for reports."""
        return {"channels": self.channels, "levels": self.levels, "kernel": self.kernel,
                "receptive_field_steps": self.model_.history + 1, "seed": self.seed,
                "parameters": int(sum(p.numel() for p in self.model_.parameters())),
                "epochs_run": self.epochs_run_, "best_epoch": self.best_epoch_, "stopped": self.stopped_,
                "train_seconds": round(self.train_seconds_, 1), "validation_mean_r2": self.validation_r2_}


def _pieces(lengths, piece_steps, rng):
    """Pieces (segment, start, stop) of ``piece_steps`` steps (the last of a segment may be shorter),
    with a random first cut per segment and epoch, in a random order."""
    pieces = []
    for index, n in enumerate(lengths):
        offset = int(rng.integers(0, piece_steps)) if n > piece_steps else 0
        cuts = sorted({0, n} | set(range(offset, n, piece_steps)))
        pieces.extend((index, a, b) for a, b in zip(cuts[:-1], cuts[1:]))
    return [pieces[i] for i in rng.permutation(len(pieces))]


def _mean_r2(decoder, segments):
    truth = np.concatenate([np.asarray(l, dtype=np.float64) for _, l in segments], axis=0)
    prediction = np.concatenate([decoder.predict(f) for f, _ in segments], axis=0)
    return metrics.nanmean(metrics.r2_score(truth, prediction))
