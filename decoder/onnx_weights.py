"""Read an ONNX model's weights and graph with the standard library and numpy.

The Jetson runs the decoder from the exported ``model.onnx`` without the
``onnx`` package, so this module decodes just enough of the protobuf wire
format (https://protobuf.dev/programming-guides/encoding/) to get:

* ``ModelProto``: ir_version (1), graph (7), opset_import (8), metadata_props (14)
* ``GraphProto``: node (1), initializer (5), input (11), output (12)
* ``NodeProto``: input (1), output (2), name (3), op_type (4), attribute (5)
* ``AttributeProto``: name (1), f (2), i (3), s (4), t (5), floats (7), ints (8)
* ``TensorProto``: dims (1), data_type (2), float_data (4), int32_data (5),
  int64_data (7), name (8), raw_data (9), data_location (14)
* ``ValueInfoProto`` -> ``TypeProto.tensor_type`` -> shape dims (for I/O shapes)

Field numbers are from onnx/onnx.proto (IR version 8).  Every other field is
skipped by its wire type, so newer files with extra fields still read; a field
we read that arrives with another wire type than onnx.proto gives it is damage
(a flipped bit in a key) and is refused, as is text that is not UTF-8, packed
numbers of a wrong length and impossible tensor shapes.  Whatever the bytes,
reading gives an :class:`OnnxModel` or a ConfigError.  There is one source of
truth for the weights: the ONNX file itself.
"""
import struct

import numpy as np

from neurohand.firmware_bridge.shared.checks import parse_json
from neurohand.firmware_bridge.shared.errors import ConfigError

# Protobuf wire types.
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
LD = (LENGTH_DELIMITED,)

# The fields read, per message: field number -> wire types onnx.proto allows
# (repeated numbers come packed (length-delimited) or one per field).
MODEL_FIELDS = {1: (VARINT,), 7: LD, 8: LD, 14: LD}
OPSET_FIELDS = {1: LD, 2: (VARINT,)}
STRING_PAIR_FIELDS = {1: LD, 2: LD}
GRAPH_FIELDS = {1: LD, 5: LD, 11: LD, 12: LD}
NODE_FIELDS = {1: LD, 2: LD, 3: LD, 4: LD, 5: LD}
ATTRIBUTE_FIELDS = {1: LD, 2: (FIXED32,), 3: (VARINT,), 4: LD, 5: LD, 7: (LENGTH_DELIMITED, FIXED32),
                    8: (LENGTH_DELIMITED, VARINT)}
TENSOR_FIELDS = {1: (LENGTH_DELIMITED, VARINT), 2: (VARINT,), 4: (LENGTH_DELIMITED, FIXED32),
                 5: (LENGTH_DELIMITED, VARINT), 7: (LENGTH_DELIMITED, VARINT), 8: LD, 9: LD,
                 10: (LENGTH_DELIMITED, FIXED64), 14: (VARINT,)}
VALUE_INFO_FIELDS = {1: LD, 2: LD}
TYPE_FIELDS = {1: LD}                       # TypeProto.tensor_type
TENSOR_TYPE_FIELDS = {1: (VARINT,), 2: LD}  # elem_type, shape
SHAPE_FIELDS = {1: LD}                      # TensorShapeProto.dim
DIMENSION_FIELDS = {1: (VARINT,), 2: LD}    # dim_value, dim_param

# numpy's own limit on array dimensions; more is damage, not a tensor.
MAX_TENSOR_DIMS = 32

# TensorProto.DataType values we can turn into arrays.
TENSOR_DTYPES = {1: "<f4", 2: "<u1", 3: "<i1", 6: "<i4", 7: "<i8", 9: "<u1", 10: "<f2", 11: "<f8"}
FLOAT, INT32, INT64, DOUBLE = 1, 6, 7, 11


class OnnxNode(object):
    """One graph node: op_type, name, input and output names, attributes dict."""

    def __init__(self, op_type, name, inputs, outputs, attributes):
        self.op_type = op_type
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.attributes = attributes

    def __repr__(self):
        return "OnnxNode({!r}, inputs={!r}, outputs={!r})".format(self.op_type, self.inputs, self.outputs)


class OnnxModel(object):
    """What :func:`parse_onnx` found.

    Attributes
    ----------
    ir_version : int
    opsets : dict, domain ("" for the default domain) -> version
    nodes : list of OnnxNode, in graph (topological) order
    initializers : dict, name -> ndarray (float32 weights keep float32)
    inputs, outputs : list of (name, shape tuple); unknown dims are None
    metadata : dict, str -> str (ModelProto.metadata_props)
    """

    def __init__(self, ir_version, opsets, nodes, initializers, inputs, outputs, metadata):
        self.ir_version = ir_version
        self.opsets = opsets
        self.nodes = nodes
        self.initializers = initializers
        self.inputs = inputs
        self.outputs = outputs
        self.metadata = metadata


def read_onnx(path):
    """Parse the ONNX file at ``path``; a broken file raises ConfigError naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read ONNX model {!r}: {}".format(str(path), exc)) from exc
    try:
        return parse_onnx(data)
    except ConfigError as exc:
        raise ConfigError("ONNX model {!r}: {}".format(str(path), exc)) from exc


def parse_onnx(data):
    """Parse a serialized ``ModelProto`` (bytes) into an :class:`OnnxModel`."""
    ir_version, graph, opsets, metadata = 0, None, {}, {}
    for number, wire, value in _fields(data, MODEL_FIELDS, "ModelProto"):
        if number == 1:
            ir_version = value
        elif number == 7:
            graph = value
        elif number == 8:
            domain, version = _opset(value)
            opsets[domain] = version
        elif number == 14:
            key, text = _string_pair(value)
            metadata[key] = text
    if graph is None:
        raise ConfigError("not an ONNX model (no graph found)")
    nodes, initializers, inputs, outputs = [], {}, [], []
    for number, wire, value in _fields(graph, GRAPH_FIELDS, "GraphProto"):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            initializers[name] = array
        elif number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
    # Older exporters also list initializers among the graph inputs.
    inputs = [item for item in inputs if item[0] not in initializers]
    return OnnxModel(ir_version, opsets, nodes, initializers, inputs, outputs, metadata)


# --- wire format ---------------------------------------------------------------

def _varint(data, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ConfigError("truncated varint at byte {}".format(pos))
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos   # protobuf keeps the low 64 bits
        shift += 7
        if shift > 63:
            raise ConfigError("varint longer than 10 bytes at byte {}".format(pos))


def _fields(data, expected, message):
    """Yield (field_number, wire_type, value) for each field of one message.

    ``value`` is an int for VARINT, bytes for the other wire types.
    expected : dict, field number -> allowed wire types, for the fields the
        caller reads; one of them with another wire type raises ConfigError
        (fields not listed are skipped, whatever their wire type)
    message : str, the message's name for errors, e.g. "TensorProto"
    """
    data = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ConfigError("{} has a field numbered 0 at byte {} (damaged)".format(message, pos))
        if wire not in (VARINT, FIXED64, LENGTH_DELIMITED, FIXED32):
            raise ConfigError("unsupported protobuf wire type {} (field {})".format(wire, number))
        if number in expected and wire not in expected[number]:
            raise ConfigError("{} field {} has wire type {}, expected {} (damaged)".format(
                message, number, wire, " or ".join(str(w) for w in expected[number])))
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire == LENGTH_DELIMITED:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ConfigError("field {} runs past the end of its message".format(number))
            value, pos = bytes(data[pos:pos + size]), pos + size
        elif wire == FIXED32:
            value, pos = bytes(data[pos:pos + 4]), pos + 4
        else:
            value, pos = bytes(data[pos:pos + 8]), pos + 8
        if pos > end:
            raise ConfigError("field {} is truncated".format(number))
        yield number, wire, value


def _signed64(value):
    return value - (1 << 64) if value >= (1 << 63) else value


def _packed_varints(value):
    out, pos, view = [], 0, memoryview(value)
    while pos < len(view):
        item, pos = _varint(view, pos)
        out.append(_signed64(item))
    return out


def _packed_reals(value, wire, code, what):
    """Floats (code "f", 4 bytes) or doubles ("d", 8 bytes): packed, or one fixed-size field."""
    size = struct.calcsize("<" + code)
    if len(value) % size:
        raise ConfigError("{}: {} bytes of packed {}-byte numbers".format(what, len(value), size))
    return struct.unpack("<{}{}".format(len(value) // size, code), value)


def _text(value, what):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("{} is not UTF-8 text: {!r}".format(what, value[:40])) from None


def _string_pair(data):
    key, text = "", ""
    for number, wire, value in _fields(data, STRING_PAIR_FIELDS, "metadata entry"):
        if number == 1:
            key = _text(value, "metadata key")
        elif number == 2:
            text = _text(value, "metadata value")
    return key, text


def _opset(data):
    domain, version = "", 0
    for number, wire, value in _fields(data, OPSET_FIELDS, "opset_import"):
        if number == 1:
            domain = _text(value, "opset domain")
        elif number == 2:
            version = value
    return domain, version


# --- messages ------------------------------------------------------------------

def _node(data):
    inputs, outputs, name, op_type, attributes = [], [], "", "", {}
    for number, wire, value in _fields(data, NODE_FIELDS, "NodeProto"):
        if number == 1:
            inputs.append(_text(value, "node input name"))
        elif number == 2:
            outputs.append(_text(value, "node output name"))
        elif number == 3:
            name = _text(value, "node name")
        elif number == 4:
            op_type = _text(value, "node op_type")
        elif number == 5:
            key, item = _attribute(value)
            attributes[key] = item
    return OnnxNode(op_type, name, inputs, outputs, attributes)


def _attribute(data):
    """Return (name, value): int, float, str, ndarray, list of ints or floats."""
    name, value_out, ints, floats = "", None, [], []
    for number, wire, value in _fields(data, ATTRIBUTE_FIELDS, "AttributeProto"):
        if number == 1:
            name = _text(value, "attribute name")
        elif number == 2:
            value_out = struct.unpack("<f", value)[0]
        elif number == 3:
            value_out = _signed64(value)
        elif number == 4:
            value_out = _text(value, "attribute {!r} string".format(name))
        elif number == 5:
            value_out = _tensor(value)[1]
        elif number == 7:
            floats.extend(_packed_reals(value, wire, "f", "attribute {!r} floats".format(name)))
        elif number == 8:
            if wire == LENGTH_DELIMITED:
                ints.extend(_packed_varints(value))
            elif wire == VARINT:
                ints.append(_signed64(value))
    if value_out is None:
        value_out = ints if ints else floats
    return name, value_out


def _tensor(data):
    """Return (name, ndarray) of one TensorProto."""
    dims, data_type, name, raw = [], None, "", None
    numbers = []
    for number, wire, value in _fields(data, TENSOR_FIELDS, "TensorProto"):
        if number == 1:
            dims.extend(_packed_varints(value) if wire == LENGTH_DELIMITED else [_signed64(value)])
        elif number == 2:
            data_type = value
        elif number == 8:
            name = _text(value, "tensor name")
        elif number == 9:
            raw = value
        elif number == 4:      # float_data: packed floats, or one fixed32 each
            numbers.extend(_packed_reals(value, wire, "f", "tensor {!r} float_data".format(name)))
        elif number in (5, 7):   # int32_data / int64_data: varints
            numbers.extend(_packed_varints(value) if wire == LENGTH_DELIMITED else [_signed64(value)])
        elif number == 10:     # double_data
            numbers.extend(_packed_reals(value, wire, "d", "tensor {!r} double_data".format(name)))
        elif number == 14 and value == 1:
            raise ConfigError("tensor {!r} keeps its data in an external file; "
                              "export with the weights inside the .onnx".format(name))
    if data_type not in TENSOR_DTYPES:
        raise ConfigError("tensor {!r} has unsupported data type {}".format(name, data_type))
    if len(dims) > MAX_TENSOR_DIMS or any(dim < 0 for dim in dims):
        raise ConfigError("tensor {!r} has an impossible shape {}".format(name, dims[:MAX_TENSOR_DIMS + 1]))
    dtype = np.dtype(TENSOR_DTYPES[data_type])
    count = 1
    for dim in dims:
        count *= dim
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise ConfigError("tensor {!r}: {} bytes of data for shape {}".format(name, len(raw), dims))
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    else:
        if len(numbers) != count:
            raise ConfigError("tensor {!r}: {} values for shape {}".format(name, len(numbers), dims))
        try:
            array = np.array(numbers, dtype=dtype.newbyteorder("="))
        except (OverflowError, ValueError) as exc:   # e.g. 300 in a uint8 tensor (numpy >= 2 refuses)
            raise ConfigError("tensor {!r}: values do not fit its data type {}: {}".format(name, dtype, exc)) from None
    return name, array.reshape(dims)


def _value_info(data):
    """Return (name, shape) of a ValueInfoProto; unknown dims are None."""
    name, shape = "", None
    for number, wire, value in _fields(data, VALUE_INFO_FIELDS, "ValueInfoProto"):
        if number == 1:
            name = _text(value, "graph input/output name")
        elif number == 2:
            for t_number, _, tensor_type in _fields(value, TYPE_FIELDS, "TypeProto"):
                if t_number == 1:
                    shape = _tensor_shape(tensor_type)
    return name, shape


def _tensor_shape(tensor_type):
    for number, _, value in _fields(tensor_type, TENSOR_TYPE_FIELDS, "TypeProto.Tensor"):
        if number == 2:
            dims = []
            for d_number, _, dim in _fields(value, SHAPE_FIELDS, "TensorShapeProto"):
                if d_number != 1:
                    continue
                size = None
                for x_number, _, x_value in _fields(dim, DIMENSION_FIELDS, "TensorShapeProto.Dimension"):
                    if x_number == 1:
                        size = _signed64(x_value)
                dims.append(size)
            return tuple(dims)
    return None


# --- the decoder's exported graph -------------------------------------------------
#
# train/export.py gives the tensors of the decoder these fixed names, so the
# backends find them without guessing.  Shapes are ONNX's, batch 1.

INPUT_FEATURES = "features"      # (1, n_features) float32
INPUT_H = "h_in"                 # (num_layers, 1, hidden_size) float32
INPUT_C = "c_in"                 # LSTM only, same shape as h_in
OUTPUT_POSITIONS = "positions"   # (1, n_outputs) float32, 0..1
OUTPUT_H = "h_out"
OUTPUT_C = "c_out"               # LSTM only
PROJECTION_WEIGHT = "projection.weight"   # (projection, n_features), Gemm transB=1
PROJECTION_BIAS = "projection.bias"       # (projection,)
HEAD_WEIGHT = "head.weight"               # (n_outputs, hidden_size), Gemm transB=1
HEAD_BIAS = "head.bias"                   # (n_outputs,)
CONFIG_METADATA_KEY = "neurohand.model_config"   # JSON of ModelConfig.to_dict()
GRAPH_FORMAT_KEY = "neurohand.graph_format"
GRAPH_FORMAT = "rnn-step-1"
# The same step as plain arithmetic, no GRU/LSTM node (train/export.py: export_plain_onnx).
PLAIN_GRAPH_FORMAT = "rnn-step-plain-1"


def rnn_weight_names(layer):
    """Names of the W, R, B initializers of recurrent layer ``layer`` (0-based).

    ONNX layouts: W (1, G*H, inputs), R (1, G*H, H), B (1, 2*G*H) = [Wb, Rb],
    with G = 3 gates (z, r, h) for GRU and 4 (i, o, f, c) for LSTM.
    """
    prefix = "rnn.{}.".format(layer)
    return prefix + "W", prefix + "R", prefix + "B"


class RnnWeights(object):
    """The decoder's weights as the backends need them (float32, ONNX layouts).

    Attributes
    ----------
    cell : "gru" or "lstm"
    n_features, n_outputs, hidden_size, num_layers : int
    projection : None or (weight (P, n_features), bias (P,))
    layers : list of (W (G*H, inputs), R (G*H, H), Wb (G*H,), Rb (G*H,)) per layer
    head : (weight (n_outputs, H), bias (n_outputs,))
    metadata : dict of the file's metadata_props
    class_names : tuple of str, the movement classes of a class head ("rest" first), () without one
    n_positions : int, the positions among the outputs: outputs[:n_positions] are finger positions,
        outputs[n_positions:] the class scores, in class_names order (sigmoid of each class's logit,
        so their argmax is the softmax's)
    """

    def __init__(self, cell, n_features, n_outputs, hidden_size, projection, layers, head, metadata):
        self.cell = cell
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.hidden_size = hidden_size
        self.num_layers = len(layers)
        self.projection = projection
        self.layers = layers
        self.head = head
        self.metadata = metadata
        self.class_names = class_names_of(metadata, n_outputs)
        self.n_positions = n_outputs - len(self.class_names)

    @property
    def state_names(self):
        """(input, output) names of the recurrent state tensors."""
        if self.cell == "lstm":
            return (INPUT_H, INPUT_C), (OUTPUT_H, OUTPUT_C)
        return (INPUT_H,), (OUTPUT_H,)

    @property
    def state_shape(self):
        return (self.num_layers, 1, self.hidden_size)


def load_rnn_weights(source):
    """Read and verify the decoder graph from a path, bytes or :class:`OnnxModel`.

    Refuses (ConfigError) anything the numpy backend would compute differently
    from ONNX Runtime: GRUs without ``linear_before_reset=1``, non-default
    activations, clipping, peepholes, bidirectional layers, or a graph whose
    names or shapes do not follow train/export.py.
    """
    if isinstance(source, OnnxModel):
        model = source
    elif isinstance(source, (bytes, bytearray)):
        model = parse_onnx(bytes(source))
    else:
        model = read_onnx(source)
    where = "ONNX model {!r}".format(source if isinstance(source, str) else "<bytes>")
    try:
        return _rnn_weights(model)
    except ConfigError as exc:
        raise ConfigError("{} is not a neurohand decoder graph: {}".format(where, exc)) from exc


def _float32(model, name, shape):
    if name not in model.initializers:
        raise ConfigError("initializer {!r} is missing".format(name))
    array = model.initializers[name]
    if array.dtype != np.float32:
        raise ConfigError("initializer {!r} is {}, expected float32".format(name, array.dtype))
    if tuple(array.shape) != tuple(shape):
        raise ConfigError("initializer {!r} has shape {}, expected {}".format(name, array.shape, shape))
    return np.ascontiguousarray(array)


def _rows(model, name):
    """Number of rows of a 2-d initializer (its shape is checked in full by :func:`_float32`)."""
    array = model.initializers[name]
    if array.ndim != 2:
        raise ConfigError("initializer {!r} has shape {}, expected 2 dimensions".format(name, array.shape))
    return array.shape[0]


def _typed_attribute(node, key, default, kinds, what):
    """``node.attributes[key]`` (or ``default``) if it is of ``kinds``, else ConfigError.

    A damaged file can give any attribute any type (a tensor where an int
    belongs); comparing it to the expected value must not be left to chance.
    """
    value = node.attributes.get(key, default)
    if not isinstance(value, kinds):
        raise ConfigError("{} attribute {!r} is {!r}, expected {}".format(
            what, key, value, " or ".join(k.__name__ for k in kinds)))
    return value


def _io_shape(items, name):
    for item_name, shape in items:
        if item_name == name:
            return shape
    raise ConfigError("graph has no input/output named {!r} (found {})".format(
        name, [item[0] for item in items]))


def _check_gemm(model, weight_name):
    nodes = [n for n in model.nodes if n.op_type == "Gemm" and weight_name in n.inputs]
    if len(nodes) != 1 or nodes[0].inputs[1:] != [weight_name, weight_name.replace("weight", "bias")]:
        raise ConfigError("expected one Gemm node using {!r} as B".format(weight_name))
    node = nodes[0]
    what = "Gemm with {!r}".format(weight_name)
    if (_typed_attribute(node, "transA", 0, (int,), what) != 0
            or _typed_attribute(node, "transB", 0, (int,), what) != 1
            or _typed_attribute(node, "alpha", 1.0, (float, int), what) != 1.0
            or _typed_attribute(node, "beta", 1.0, (float, int), what) != 1.0):
        raise ConfigError("Gemm with {!r} has attributes {}, expected transB=1 only".format(
            weight_name, node.attributes))
    return nodes[0]


def class_names_of(metadata, n_outputs):
    """The class head's class names from the model config in ``metadata`` (() when it has none).

    The head shares the output layer with the positions: the config's ``class_names`` (train/model.py)
    say how many of the ``n_outputs`` outputs, from the end, are class scores; at least one output
    must remain a position."""
    text = metadata.get(CONFIG_METADATA_KEY)
    if text is None:
        return ()
    try:
        config = parse_json(text)
    except ValueError:
        return ()     # _check_model_config names this; a weights object built by hand has no config
    names = config.get("class_names") if isinstance(config, dict) else None
    if not names:
        return ()
    if (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise ConfigError("metadata {!r}: class_names must be a list of distinct non-empty names, "
                          "but got {!r}".format(CONFIG_METADATA_KEY, names))
    if len(names) < 2 or len(names) >= n_outputs:
        raise ConfigError("metadata {!r}: {} class names for {} outputs (need at least 2 classes and "
                          "1 position)".format(CONFIG_METADATA_KEY, len(names), n_outputs))
    return tuple(names)


def _check_model_config(metadata):
    """train/export.py always writes the model config; without it the file was cut short.

    Protobuf has no end marker: a file cut between two top-level fields (or two
    metadata entries) is a valid, shorter message.  metadata_props is the last
    field the exporter writes and this is its last entry, so requiring it
    refuses every such cut.
    """
    if CONFIG_METADATA_KEY not in metadata:
        raise ConfigError("metadata {!r} is missing (the file is cut short, or was not exported by "
                          "train/export.py)".format(CONFIG_METADATA_KEY))
    try:
        config = parse_json(metadata[CONFIG_METADATA_KEY])
    except ValueError as exc:
        raise ConfigError("metadata {!r} is not valid JSON: {}".format(CONFIG_METADATA_KEY, exc)) from None
    if not isinstance(config, dict):
        raise ConfigError("metadata {!r} must be a JSON object, not {}".format(
            CONFIG_METADATA_KEY, type(config).__name__))


def _rnn_weights(model):
    if model.metadata.get(GRAPH_FORMAT_KEY) != GRAPH_FORMAT:
        raise ConfigError("metadata {!r} is {!r}, expected {!r} (export it with train/export.py)".format(
            GRAPH_FORMAT_KEY, model.metadata.get(GRAPH_FORMAT_KEY), GRAPH_FORMAT))
    rnn_nodes = [n for n in model.nodes if n.op_type in ("GRU", "LSTM")]
    if not rnn_nodes or len(set(n.op_type for n in rnn_nodes)) != 1:
        raise ConfigError("expected GRU or LSTM nodes of one kind, found {}".format(
            [n.op_type for n in rnn_nodes]))
    cell = rnn_nodes[0].op_type.lower()
    gates = 3 if cell == "gru" else 4
    features_shape = _io_shape(model.inputs, INPUT_FEATURES)
    if features_shape is None or len(features_shape) != 2 or features_shape[0] != 1:
        raise ConfigError("input {!r} has shape {}, expected (1, n_features)".format(
            INPUT_FEATURES, features_shape))
    n_features = features_shape[1]
    if n_features is None or n_features < 1:
        raise ConfigError("input {!r} has shape {}, expected a known n_features >= 1".format(
            INPUT_FEATURES, features_shape))
    hidden = _typed_attribute(rnn_nodes[0], "hidden_size", None, (int,), "{} layer 0".format(rnn_nodes[0].op_type))
    if hidden < 1:
        raise ConfigError("{} layer 0 has hidden_size {}, expected at least 1".format(rnn_nodes[0].op_type, hidden))
    layers = []
    rnn_input = n_features
    projection = None
    if PROJECTION_WEIGHT in model.initializers:
        _check_gemm(model, PROJECTION_WEIGHT)
        width = _rows(model, PROJECTION_WEIGHT)
        projection = (_float32(model, PROJECTION_WEIGHT, (width, n_features)),
                      _float32(model, PROJECTION_BIAS, (width,)))
        if sum(1 for n in model.nodes if n.op_type == "Relu") != 1:
            raise ConfigError("expected one Relu after the input projection")
        rnn_input = width
    for layer, node in enumerate(rnn_nodes):
        attributes = node.attributes
        what = "{} layer {}".format(node.op_type, layer)
        if _typed_attribute(node, "hidden_size", None, (int,), what) != hidden:
            raise ConfigError("{} layer {} has hidden_size {}, layer 0 has {}".format(
                node.op_type, layer, attributes.get("hidden_size"), hidden))
        if cell == "gru" and _typed_attribute(node, "linear_before_reset", 0, (int,), what) != 1:
            raise ConfigError("GRU layer {} lacks linear_before_reset=1 (PyTorch's GRU "
                              "equations); refusing to compute it differently".format(layer))
        for key in ("activations", "activation_alpha", "activation_beta", "clip"):
            if key in attributes:
                raise ConfigError("{} layer {} sets {!r}, which is not supported".format(node.op_type, layer, key))
        if (_typed_attribute(node, "direction", "forward", (str,), what) != "forward"
                or _typed_attribute(node, "input_forget", 0, (int,), what) != 0):
            raise ConfigError("{} layer {} must be forward-only without input_forget".format(node.op_type, layer))
        if cell == "lstm" and len(node.inputs) > 7 and node.inputs[7]:
            raise ConfigError("LSTM layer {} has peephole weights, which are not supported".format(layer))
        w_name, r_name, b_name = rnn_weight_names(layer)
        if node.inputs[1:4] != [w_name, r_name, b_name]:
            raise ConfigError("{} layer {} reads {}, expected {}".format(
                node.op_type, layer, node.inputs[1:4], [w_name, r_name, b_name]))
        w = _float32(model, w_name, (1, gates * hidden, rnn_input))[0]
        r = _float32(model, r_name, (1, gates * hidden, hidden))[0]
        b = _float32(model, b_name, (1, 2 * gates * hidden))[0]
        layers.append((np.ascontiguousarray(w), np.ascontiguousarray(r),
                       b[:gates * hidden].copy(), b[gates * hidden:].copy()))
        rnn_input = hidden
    _check_gemm(model, HEAD_WEIGHT)
    n_outputs = _rows(model, HEAD_WEIGHT) if HEAD_WEIGHT in model.initializers else 0
    head = (_float32(model, HEAD_WEIGHT, (n_outputs, hidden)), _float32(model, HEAD_BIAS, (n_outputs,)))
    if sum(1 for n in model.nodes if n.op_type == "Sigmoid") != 1:
        raise ConfigError("expected one Sigmoid on the output")
    state_shape = (len(layers), 1, hidden)
    names = [INPUT_H] + ([INPUT_C] if cell == "lstm" else [])
    for name in names:
        if _io_shape(model.inputs, name) != state_shape:
            raise ConfigError("input {!r} has shape {}, expected {}".format(
                name, _io_shape(model.inputs, name), state_shape))
    for name in [OUTPUT_H] + ([OUTPUT_C] if cell == "lstm" else []):
        if _io_shape(model.outputs, name) != state_shape:
            raise ConfigError("output {!r} has shape {}, expected {}".format(
                name, _io_shape(model.outputs, name), state_shape))
    if _io_shape(model.outputs, OUTPUT_POSITIONS) != (1, n_outputs):
        raise ConfigError("output {!r} has shape {}, expected {}".format(
            OUTPUT_POSITIONS, _io_shape(model.outputs, OUTPUT_POSITIONS), (1, n_outputs)))
    _check_model_config(model.metadata)
    return RnnWeights(cell, n_features, n_outputs, hidden, projection, layers, head, dict(model.metadata))
