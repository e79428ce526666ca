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
from torch import _VF, nn

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
        # Set by the trainer while this model is an ensemble of that many block-diagonal members (see
        # ensemble_masks): the recurrent layers then run member by member, the same arithmetic without
        # the blocks of zeros, which cost members-squared time.  Not part of the config: the exported
        # model is the wide one.
        self.block_members = 1

    def initial_state(self, batch_size=1):
        """Zero state for ``batch_size`` sequences, on the model's device."""
        weight = self.head.weight
        shape = (self.config.num_layers, batch_size, self.config.hidden_size)
        h = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if self.config.cell == "lstm":
            return (h, torch.zeros_like(h))
        return h

    def forward(self, x, state=None, logits=False, members=1):
        """Run a batch of sequences.

        Parameters
        ----------
        x : Tensor, shape (batch, time, n_features), float32
        state : None (zeros), Tensor (GRU) or tuple (h, c) (LSTM)
        logits : return the output layer before the sigmoid (the class head's cross-entropy
            needs the logits; a keyword so that DistributedDataParallel passes it through)
        members : with an ensemble of this many members (see :func:`ensemble_masks`), return each
            member's logits, shape (batch, time, members, output_width); their mean is the output layer's.
            ``x`` may then be (batch, time, members, n_features): each member reads its own sequences
            (through its own slice of the input projection, which a model with one needs)

        Returns
        -------
        outputs : Tensor, shape (batch, time, output_width), in 0..1 (positions, then class scores)
        state : the state after the last time step, same form as ``state``
        """
        if members > 1 and x.dim() == 4 and self.projection is not None and x.shape[2] == members:
            return self._members_apart(x, state, members)
        if x.dim() != 3 or x.shape[-1] != self.config.n_features:
            raise UsageError("model input must have shape (batch, time, {}), but got {}".format(
                self.config.n_features, tuple(x.shape)))
        if state is None:
            state = self.initial_state(x.shape[0])
        if self.projection is not None:
            x = self.projection_dropout(torch.relu(self.projection(x)))
        hidden, state = self._recurrent(x, state)
        if members > 1:
            return member_logits(self.head, hidden, members), state
        output = self.head(hidden)
        return (output if logits else torch.sigmoid(output)), state

    def _members_apart(self, x, state, members):
        """forward() of an ensemble whose members read different sequences, x (batch, time, members, F)."""
        if state is None:
            state = self.initial_state(x.shape[0])
        weight = self.projection.weight.reshape(members, -1, x.shape[-1])
        projected = torch.einsum("btkf,kpf->btkp", x, weight) + self.projection.bias.reshape(members, -1)
        projected = self.projection_dropout(torch.relu(projected)).reshape(x.shape[:2] + (-1,))
        hidden, state = self._recurrent(projected, state)
        return member_logits(self.head, hidden, members), state

    def _recurrent(self, x, state):
        if self.block_members == 1:
            return self.rnn(x, state)
        return members_apart_rnn(self.rnn, x, state, self.block_members, self.projection is not None)

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


def check_members(config, members):
    """An ensemble's member count that divides the model's widths (UsageError otherwise)."""
    members = check_int("ensemble", members, minimum=1)
    for name in ("hidden_size", "input_projection"):
        width = getattr(config, name)
        if width is not None and width % members:
            raise UsageError("ensemble {} needs {} to be a multiple of it, but got {}".format(members, name, width))
    return members


def ensemble_masks(model, members):
    """Masks (parameter name -> 0/1 tensor) that make ``model`` an ensemble of ``members`` independent RNNs.

    Member k owns the k-th slice of every layer's units (the projection's, and the hidden units of each of
    the cell's gates): the recurrent layers' input and recurrent weights are block-diagonal, so the
    members never see one another's units.  The projection and the output layer are left whole: each
    projection unit already belongs to one member, and the output layer sums over all hidden units,
    which :func:`member_logits` splits per member.  The masked model is an ordinary RNNDecoder: the ONNX
    export and every backend run it unchanged, and its output is the sigmoid of the members' mean logit."""
    config = model.config
    members = check_members(config, members)
    if members == 1:
        return {}
    hidden = config.hidden_size
    masks = {}
    for name, parameter in model.rnn.named_parameters():
        if not name.startswith("weight_"):
            continue
        if name.startswith("weight_ih_l0") and config.input_projection is None:
            continue            # raw features: every member reads all of them
        rows, columns = parameter.shape
        owner_row = (torch.arange(rows) % hidden) // (hidden // members)
        owner_column = torch.arange(columns) // (columns // members)
        masks["rnn." + name] = (owner_row[:, None] == owner_column[None, :]).to(parameter.dtype)
    return masks


def member_units(rnn, members, k, has_projection):
    """Index tensors of member k's part of each weight of ``rnn`` (block-diagonal, see ensemble_masks), in
    torch's flat-weight order: per layer (rows, columns) of the input and recurrent weights and the rows of
    the two biases; columns None where the member reads all the inputs."""
    hidden = rnn.hidden_size // members
    n_gates = rnn.weight_hh_l0.shape[0] // rnn.hidden_size
    rows = torch.cat([g * rnn.hidden_size + torch.arange(k * hidden, (k + 1) * hidden) for g in range(n_gates)])
    own = torch.arange(k * hidden, (k + 1) * hidden)
    first = rnn.input_size // members
    indices = []
    for layer in range(rnn.num_layers):
        inputs = own if layer else (torch.arange(k * first, (k + 1) * first) if has_projection else None)
        indices += [(rows, inputs), (rows, own)] + ([(rows, None), (rows, None)] if rnn.bias else [])
    return indices


def _cached_member_units(rnn, members, has_projection):
    cached = getattr(rnn, "_member_units", None)
    if cached is None or cached[0] != (members, has_projection):
        cached = ((members, has_projection), [member_units(rnn, members, k, has_projection)
                                              for k in range(members)])
        rnn._member_units = cached
    return cached[1]


def member_weights(rnn, indices):
    """Member's own weights (copies that pass their gradients back to ``rnn``'s), flat-weight order."""
    return [w[r] if c is None else w[r][:, c] for w, (r, c) in zip(rnn._flat_weights, indices)]


def member_dropout_masks(model, members, batch, steps):
    """Per member, the dropout masks of one training forward of :func:`member_forward` (after the projection,
    then after each recurrent layer but the last), scaled as nn.Dropout scales them; None where the model
    has no dropout or is evaluating.  Drawn in member order from torch's generator, so they do not depend
    on the order in which the members then run."""
    config, p = model.config, model.config.dropout
    if not model.training or p == 0:
        return [None] * members
    first = None if config.input_projection is None else config.input_projection // members
    widths = [first] + [config.hidden_size // members] * (config.num_layers - 1)
    return [[None if w is None else torch.empty(batch, steps, w).bernoulli_(1.0 - p).div_(1.0 - p)
             for w in widths] for _ in range(members)]


def member_slots(model, members, k):
    """Member k's own part of the wide model's weights, as (parameter, index) pairs: ``parameter[index]``
    is the member's weight (its projection rows and bias, its recurrent layers' blocks in torch's
    flat-weight order, its columns of the output layer), in the order :func:`member_forward` takes them.
    The output layer's bias is shared by the members and not among them."""
    slots = []
    if model.projection is not None:
        p = model.config.input_projection // members
        rows = slice(k * p, (k + 1) * p)
        slots += [(model.projection.weight, (rows,)), (model.projection.bias, (rows,))]
    rnn = model.rnn
    for weight, (r, c) in zip(rnn._flat_weights,
                              _cached_member_units(rnn, members, model.projection is not None)[k]):
        slots.append((weight, (r,) if c is None else (r[:, None], c[None, :])))
    width = model.config.hidden_size // members
    slots.append((model.head.weight, (slice(None), slice(k * width, (k + 1) * width))))
    return slots


def member_forward(model, members, k, x, state, dropout=None, weights=None):
    """Member k of a block-diagonal ensemble (see ensemble_masks) run on its own: its logits (batch, time,
    output_width), as :func:`member_logits` gives them for member k, and its state (its slice of the wide
    state's units).  x: (batch, time, n_features), the member's pieces; state: the member's state or None;
    dropout: its masks from :func:`member_dropout_masks`; weights: the member's weights in
    :func:`member_slots` order (default: taken from the wide model, so gradients reach it).

    Members share no computation but the output layer's bias, so each can run (forward and backward) on
    a thread of its own."""
    config, rnn = model.config, model.rnn
    if weights is None:
        weights = [parameter[index] for parameter, index in member_slots(model, members, k)]
    width = config.hidden_size // members
    dropout = dropout or [None] * config.num_layers
    if model.projection is not None:
        x = torch.relu(torch.nn.functional.linear(x, weights[0], weights[1]))
        weights = weights[2:]
    if dropout[0] is not None:
        x = x * dropout[0]
    if state is None:
        shape = (config.num_layers, x.shape[0], width)
        state = (x.new_zeros(shape), x.new_zeros(shape)) if config.cell == "lstm" else x.new_zeros(shape)
    per_layer = (len(weights) - 1) // config.num_layers
    states = []
    for layer in range(config.num_layers):
        own = weights[layer * per_layer:(layer + 1) * per_layer]
        if config.cell == "lstm":
            result = _VF.lstm(x, (state[0][layer:layer + 1], state[1][layer:layer + 1]), own, rnn.bias, 1, 0.0,
                              model.training, False, True)
            x, states = result[0], states + [result[1:]]
        else:
            x, last = _VF.gru(x, state[layer:layer + 1], own, rnn.bias, 1, 0.0, model.training, False, True)
            states.append(last)
        if layer + 1 < config.num_layers and dropout[layer + 1] is not None:
            x = x * dropout[layer + 1]
    if config.cell == "lstm":
        state = (torch.cat([s[0] for s in states]), torch.cat([s[1] for s in states]))
    else:
        state = torch.cat(states)
    return members * torch.nn.functional.linear(x, weights[-1]) + model.head.bias, state


def members_apart_rnn(rnn, x, state, members, has_projection):
    """``rnn(x, state)`` for a block-diagonal ensemble (see ensemble_masks), computed as ``members`` RNNs of
    one member's width: each reads its own slice of ``x`` (all of it without an input projection) and of
    the state, and the outputs and states are joined in the wide model's unit order.  The gradients reach
    the wide weights' own blocks only."""
    lstm = isinstance(rnn, nn.LSTM)
    width = rnn.hidden_size // members
    outputs, states = [], []
    for k, indices in enumerate(_cached_member_units(rnn, members, has_projection)):
        weights = member_weights(rnn, indices)
        units = slice(k * width, (k + 1) * width)
        inputs = x[..., indices[0][1]] if indices[0][1] is not None else x
        if lstm:
            own_state = (state[0][..., units].contiguous(), state[1][..., units].contiguous())
            result = _VF.lstm(inputs, own_state, weights, rnn.bias, rnn.num_layers, rnn.dropout,
                              rnn.training, False, rnn.batch_first)
            outputs.append(result[0])
            states.append(result[1:])
        else:
            result = _VF.gru(inputs, state[..., units].contiguous(), weights, rnn.bias, rnn.num_layers,
                             rnn.dropout, rnn.training, False, rnn.batch_first)
            outputs.append(result[0])
            states.append(result[1])
    output = torch.cat(outputs, dim=-1)
    if lstm:
        return output, (torch.cat([s[0] for s in states], dim=-1), torch.cat([s[1] for s in states], dim=-1))
    return output, torch.cat(states, dim=-1)


def is_block_diagonal(model, masks):
    """Whether every masked weight of ``model`` is zero outside its members' blocks."""
    with torch.no_grad():
        return all(not bool((parameter * (1 - masks[name])).any())
                   for name, parameter in model.named_parameters() if name in masks)


def member_logits(head, hidden, members):
    """Each member's output logits from the hidden units (..., members x h): member k's are
    members x (its slice of the output weights) . (its hidden units) + the shared bias, so their mean over
    the members is exactly ``head(hidden)``."""
    split = hidden.reshape(hidden.shape[:-1] + (members, -1))
    weight = head.weight.reshape(head.weight.shape[0], members, -1)
    return members * torch.einsum("...kh,okh->...ko", split, weight) + head.bias


def merge_members(models):
    """One RNNDecoder whose output is the mean logit of ``models`` (same config each): their layers side by
    side, block-diagonal (see :func:`ensemble_masks`; without an input projection every member reads all the
    features), the output layer's weights divided by their number and its bias their mean."""
    first = models[0].config
    members = len(models)
    if any(m.config != first for m in models):
        raise UsageError("models to merge must share one config")
    h, p = first.hidden_size, first.input_projection
    wide = build_model(ModelConfig(first.n_features, first.n_outputs, first.cell, members * h, first.num_layers,
                                   None if p is None else members * p, first.dropout, first.class_names))
    n_gates = wide.rnn.weight_hh_l0.shape[0] // (members * h)
    state = {name: torch.zeros_like(value) for name, value in wide.state_dict().items()}
    for k, model in enumerate(models):
        units = torch.cat([g * members * h + torch.arange(k * h, (k + 1) * h) for g in range(n_gates)])
        for name, value in model.state_dict().items():
            if name.startswith("projection."):
                state[name][k * p:(k + 1) * p] = value
            elif name.startswith("rnn.weight_ih_l0") and p is None:
                state[name][units] = value
            elif name.startswith("rnn.weight"):
                width = p if name.startswith("rnn.weight_ih_l0") else h
                state[name][units[:, None], torch.arange(k * width, (k + 1) * width)[None, :]] = value
            elif name.startswith("rnn.bias"):
                state[name][units] = value
            elif name == "head.weight":
                state[name][:, k * h:(k + 1) * h] = value / members
            else:
                state[name] += value / members
    wide.load_state_dict(state)
    return wide


def init_ensemble(model, masks, members):
    """Zero the weights between members and give each member's blocks the scale of a model of its own size
    (torch scales a layer's initial weights by its full width, 1/sqrt(members) too small for a member)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("rnn."):
                parameter.mul_(masks[name] * members ** 0.5 if name in masks else members ** 0.5)


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
