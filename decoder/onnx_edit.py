"""Give initializers of an ONNX file new values, every other byte left as it was (numpy only).

On-device recalibration (deploy/recalibrate.py) changes the decoder's output
layer without torch or the ``onnx`` package.  Re-serialising a whole model
would need both; instead the file's protobuf fields are copied as they are
(https://protobuf.dev/programming-guides/encoding/), except:

* each replaced ``TensorProto`` (GraphProto field 5) keeps its fields in their
  order, with its data fields (float_data 4, int32_data 5, int64_data 7,
  raw_data 9, double_data 10, uint64_data 11) replaced by one raw_data field,
  little-endian, where the first of them was;
* the length prefixes of that tensor and of the graph (ModelProto field 7),
  which change with it.

A replaced tensor must keep its name, data type and shape: the graph around it
is unchanged, so a value of another shape would be a different model.  Reading
the result with :func:`onnx_weights.parse_onnx` gives the new values for the
replaced initializers and the same arrays for all others (checked here before
the bytes are returned).
"""
import numpy as np

from neurohand.decoder import onnx_weights
from neurohand.firmware_bridge.shared.errors import ConfigError

_GRAPH = 7            # ModelProto.graph
_INITIALIZER = 5      # GraphProto.initializer
_TENSOR_NAME, _TENSOR_RAW = 8, 9
_TENSOR_DATA_TYPE = 2
_TENSOR_DIMS = 1
# TensorProto fields that hold the values (replaced by one raw_data); 13 is
# external_data, refused by the reader already (data_location 14).
_TENSOR_DATA_FIELDS = (4, 5, 7, 9, 10, 11)


def _encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number, wire):
    return _encode_varint((number << 3) | wire)


def _length_delimited(number, payload):
    return _key(number, onnx_weights.LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _field_spans(data, message):
    """Yield (number, wire, start, value_start, end) of each field of one message.

    ``data[start:end]`` is the whole field (key, length, value) and
    ``data[value_start:end]`` its value (for length-delimited fields, the
    payload).  Damage raises ConfigError as the reader would.
    """
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        start = pos
        key, pos = onnx_weights._varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ConfigError("{} has a field numbered 0 at byte {} (damaged)".format(message, start))
        if wire == onnx_weights.VARINT:
            _, pos = onnx_weights._varint(view, pos)
            value_start = start
        elif wire == onnx_weights.LENGTH_DELIMITED:
            size, pos = onnx_weights._varint(view, pos)
            value_start = pos
            pos += size
        elif wire == onnx_weights.FIXED32:
            value_start, pos = pos, pos + 4
        elif wire == onnx_weights.FIXED64:
            value_start, pos = pos, pos + 8
        else:
            raise ConfigError("unsupported protobuf wire type {} (field {} of {})".format(wire, number, message))
        if pos > end:
            raise ConfigError("field {} of {} runs past its end (damaged)".format(number, message))
        yield number, wire, start, value_start, pos


def _tensor_name(payload):
    for number, wire, _, value_start, end in _field_spans(payload, "TensorProto"):
        if number == _TENSOR_NAME and wire == onnx_weights.LENGTH_DELIMITED:
            return onnx_weights._text(bytes(payload[value_start:end]), "tensor name")
    return ""


def _new_tensor(payload, name, value):
    """The TensorProto ``payload`` with its data replaced by ``value`` (checked against its type and shape)."""
    _, old = onnx_weights._tensor(payload)
    dtype = old.dtype
    value = np.asarray(value)
    if value.shape != old.shape:
        raise ConfigError("initializer {!r} has shape {}; a new value of shape {} would change the model".format(
            name, old.shape, value.shape))
    if value.dtype != dtype:
        if not np.can_cast(value.dtype, dtype, casting="same_kind"):
            raise ConfigError("initializer {!r} holds {}; a new value of {} does not fit it".format(
                name, dtype, value.dtype))
        value = value.astype(dtype)
    if dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise ConfigError("the new value of initializer {!r} holds NaN or infinite numbers".format(name))
    raw = np.ascontiguousarray(value, dtype=dtype.newbyteorder("<")).tobytes()
    out = bytearray()
    placed = False
    for number, _, start, _, end in _field_spans(payload, "TensorProto"):
        if number in _TENSOR_DATA_FIELDS:
            if not placed:
                out += _length_delimited(_TENSOR_RAW, raw)
                placed = True
            continue
        out += payload[start:end]
    if not placed:        # a tensor of zero elements may carry no data field at all
        out += _length_delimited(_TENSOR_RAW, raw)
    return bytes(out)


def replace_initializers(data, values):
    """Return ``data`` (a serialized ModelProto, bytes) with initializers given new values.

    values : dict, initializer name -> array of the initializer's exact shape
        (cast to its data type when that loses no kind: float64 into float32 is
        allowed, float into int is not).
    Raises ConfigError for a name the graph does not hold (or holds twice), a
    value of another shape or kind, non-finite floats, or a damaged file.
    """
    data = bytes(data)
    wanted = dict(values)
    found = {}
    model_out = bytearray()
    graph_seen = False
    for number, wire, start, value_start, end in _field_spans(data, "ModelProto"):
        if number != _GRAPH or wire != onnx_weights.LENGTH_DELIMITED:
            model_out += data[start:end]
            continue
        if graph_seen:
            raise ConfigError("the model holds two graphs (damaged)")
        graph_seen = True
        graph = memoryview(data)[value_start:end]
        graph_out = bytearray()
        for g_number, g_wire, g_start, g_value_start, g_end in _field_spans(graph, "GraphProto"):
            if g_number == _INITIALIZER and g_wire == onnx_weights.LENGTH_DELIMITED:
                payload = bytes(graph[g_value_start:g_end])
                name = _tensor_name(payload)
                if name in wanted:
                    if name in found:
                        raise ConfigError("the graph holds two initializers named {!r}".format(name))
                    found[name] = True
                    graph_out += _length_delimited(_INITIALIZER, _new_tensor(payload, name, wanted[name]))
                    continue
            graph_out += graph[g_start:g_end]
        model_out += _length_delimited(_GRAPH, bytes(graph_out))
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise ConfigError("the model has no initializer named {}".format(", ".join(repr(m) for m in missing)))
    result = bytes(model_out)
    _check_replaced(data, result, wanted)
    return result


def _check_replaced(before, after, values):
    """ConfigError unless ``after`` reads as ``before`` with exactly ``values`` changed."""
    old = onnx_weights.parse_onnx(before)
    new = onnx_weights.parse_onnx(after)
    if sorted(old.initializers) != sorted(new.initializers) or len(old.nodes) != len(new.nodes) \
            or old.metadata != new.metadata or old.inputs != new.inputs or old.outputs != new.outputs:
        raise ConfigError("rewriting the initializers changed the graph (a bug; nothing was written)")
    for name, array in new.initializers.items():
        expected = np.asarray(values[name]).astype(array.dtype) if name in values else old.initializers[name]
        if array.dtype != old.initializers[name].dtype or not np.array_equal(array, expected):
            raise ConfigError("initializer {!r} does not read back as written (a bug; nothing was written)".format(
                name))
