"""The recurrent finger decoder (PyTorch; workstation only).

Architecture, in order::

    features (n_features,)            one feature vector per decoder step
      -> [Linear(n_features, P) -> ReLU]   optional input projection (P = input_projection)
      -> GRU or LSTM, num_layers x hidden_size, unidirectional
      -> Linear(hidden_size, n_outputs + n_classes) -> sigmoid
    positions (n_outputs,)            finger positions, 0 = open .. 1 = closed
    class scores (n_classes,)         with a class head (``class_names``): sigmoid of each
                                      movement class's logit, in class_names order

It is trained on sequences (``model(x, state)``) and run one step at a time
(``model.step(features, state)``); both share the same weights and give the
same result, which ``train/export.py`` relies on when it exports one step
per call to ONNX.  The device never imports this module: it runs the exported
ONNX file through ``neurohand.decoder.backends``.
"""
import torch
from torch import nn

from neurohand.firmware_bridge.shared.checks import check_int, check_number, check_option
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

CELLS = ("gru", "lstm")
CHECKPOINT_FORMAT = "neurohand-rnn-checkpoint"
CHECKPOINT_VERSION = 1


class ModelConfig(object):
    """Hyper-parameters of the decoder; a plain value object.

    Parameters
    ----------
    n_features : int
        Length of one feature vector (e.g. 16 channels x 10 features = 160).
    n_outputs : int
        Number of positions decoded: 5 fingers (default), 6 for the Ability
        Hand, 22 for a CyberGlove.
    cell : {"gru", "lstm"}
    hidden_size : int
        Units per recurrent layer (default 128).
    num_layers : int
        Stacked recurrent layers (default 2).
    input_projection : int or None
        Width of a Linear+ReLU layer in front of the RNN, or None for none.
    dropout : float
        Dropout between recurrent layers and after the projection, training
        only (0 <= dropout < 1).
    class_names : list of str
        Movement classes of a class head ("rest" first), [] for none.  The
        output layer then has ``n_outputs + len(class_names)`` units: the
        positions first, then one score per class (sigmoid of its logit; the
        largest is the decided class, as the softmax's would be).  Trained with
        softmax cross-entropy on the logits (train/trainer.py).
    """

    FIELDS = ("n_features", "n_outputs", "cell", "hidden_size", "num_layers",
              "input_projection", "dropout", "class_names")

    def __init__(self, n_features, n_outputs=5, cell="gru", hidden_size=128, num_layers=2,
                 input_projection=None, dropout=0.0, class_names=()):
        self.n_features = check_int("n_features", n_features, minimum=1)
        self.n_outputs = check_int("n_outputs", n_outputs, minimum=1)
        self.cell = check_option("cell", cell, CELLS)
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        if input_projection is not None:
            input_projection = check_int("input_projection", input_projection, minimum=1)
        self.input_projection = input_projection
        self.dropout = check_number("dropout", dropout, minimum=0.0)
        if self.dropout >= 1.0:
            raise UsageError("dropout must be below 1, but got {!r}".format(dropout))
        self.class_names = check_class_names(class_names)

    @property
    def n_classes(self):
        return len(self.class_names)

    @property
    def output_width(self):
        """Units of the output layer (and of the exported "positions" output): positions, then class scores."""
        return self.n_outputs + self.n_classes

    def to_dict(self):
        """Plain dict of the fields (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, values):
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ConfigError.

        ``class_names`` may be missing (runs and bundles from before the class head)."""
        if not isinstance(values, dict):
            raise ConfigError("model config must be a mapping, but got {!r}".format(type(values).__name__))
        unknown = sorted(set(values) - set(cls.FIELDS))
        if unknown:
            raise ConfigError("model config has unknown keys {}; known keys are {}".format(
                unknown, list(cls.FIELDS)))
        if "n_features" not in values:
            raise ConfigError("model config lacks 'n_features'")
        return cls(**values)

    def __eq__(self, other):
        return isinstance(other, ModelConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return "ModelConfig({})".format(", ".join(
            "{}={!r}".format(name, getattr(self, name)) for name in self.FIELDS))


def check_class_names(names):
    """A class head's names as a list: none, or at least 2 distinct non-empty strings (UsageError)."""
    if names is None or isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise UsageError("class_names must be a list of names, but got {!r}".format(names))
    names = list(names)
    if names and (len(names) < 2 or not all(isinstance(n, str) and n.strip() == n and n for n in names)
                  or len(set(names)) != len(names)):
        raise UsageError("class_names must be at least 2 distinct non-empty names without surrounding spaces, "
                         "but got {!r}".format(names))
    return names


class RNNDecoder(nn.Module):
    """Features -> [projection] -> GRU/LSTM -> Linear -> sigmoid.

    State is ``h`` of shape (num_layers, batch, hidden_size) for a GRU and a
    tuple ``(h, c)`` of two such tensors for an LSTM.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        rnn_input = config.n_features
        if config.input_projection is not None:
            self.projection = nn.Linear(config.n_features, config.input_projection)
            rnn_input = config.input_projection
        else:
            self.projection = None
        self.projection_dropout = nn.Dropout(config.dropout)
        rnn_class = nn.GRU if config.cell == "gru" else nn.LSTM
        # Inter-layer dropout only exists with two or more layers (torch warns otherwise).
        self.rnn = rnn_class(rnn_input, config.hidden_size, num_layers=config.num_layers,
                             batch_first=True,
                             dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.head = nn.Linear(config.hidden_size, config.output_width)

    def initial_state(self, batch_size=1):
        """Zero state for ``batch_size`` sequences, on the model's device."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if self.config.cell == "lstm":
            return (h, torch.zeros_like(h))
        return h

    def forward(self, x, state=None, logits=False):
        """Run a batch of sequences.

        Parameters
        ----------
        x : Tensor, shape (batch, time, n_features), float32
        state : None (zeros), Tensor (GRU) or tuple (h, c) (LSTM)
        logits : return the output layer before the sigmoid (the class head's cross-entropy
            needs the logits; a keyword so that DistributedDataParallel passes it through)

        Returns
        -------
        outputs : Tensor, shape (batch, time, output_width), in 0..1 (positions, then class scores)
        state : the state after the last time step, same form as ``state``
        """
        if x.dim() != 3 or x.shape[-1] != self.config.n_features:
            raise UsageError("model input must have shape (batch, time, {}), but got {}".format(
                self.config.n_features, tuple(x.shape)))
        if state is None:
            state = self.initial_state(x.shape[0])
        if self.projection is not None:
            x = self.projection_dropout(torch.relu(self.projection(x)))
        hidden, state = self.rnn(x, state)
        output = self.head(hidden)
        return (output if logits else torch.sigmoid(output)), state

    def step(self, features, state):
        """One decoder step.

        Parameters
        ----------
        features : Tensor, shape (batch, n_features)
        state : as in :meth:`forward` (not None)

        Returns
        -------
        outputs : Tensor, shape (batch, output_width), in 0..1
        state : the new state
        """
        if features.dim() != 2 or features.shape[-1] != self.config.n_features:
            raise UsageError("step input must have shape (batch, {}), but got {}".format(
                self.config.n_features, tuple(features.shape)))
        # Same arithmetic as forward() on a length-1 sequence, but the
        # Linear layers see 2-D tensors so that the ONNX export turns them
        # into plain Gemm nodes with the weights as stored (see train/export.py).
        x = features
        if self.projection is not None:
            x = self.projection_dropout(torch.relu(self.projection(x)))
        hidden, state = self.rnn(x.unsqueeze(1), state)
        return torch.sigmoid(self.head(hidden[:, 0, :])), state


def build_model(config):
    """Return a fresh :class:`RNNDecoder` (float32, CPU, train mode) for ``config``."""
    if not isinstance(config, ModelConfig):
        raise UsageError("build_model needs a ModelConfig, but got {!r}".format(type(config).__name__))
    return RNNDecoder(config)


def save_checkpoint(model, path):
    """Save weights and config as a plain dict that ``torch.load(weights_only=True)`` accepts."""
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path):
    """Load a model saved by :func:`save_checkpoint` (never unpickles code)."""
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ConfigError("cannot load checkpoint {!r}: {}".format(str(path), exc)) from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError("{!r} is not a neurohand RNN checkpoint".format(str(path)))
    if document.get("format_version") != CHECKPOINT_VERSION:
        raise ConfigError("checkpoint {!r} has format version {!r}; this neurohand reads version {}".format(
            str(path), document.get("format_version"), CHECKPOINT_VERSION))
    model = build_model(ModelConfig.from_dict(document["config"]))
    model.load_state_dict(document["state_dict"])
    model.eval()
    return model
