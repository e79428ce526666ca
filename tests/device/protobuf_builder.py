"""Hand-built protobuf bytes for the ONNX reader's fuzz and regression tests.

Independent of the reader under test (decoder/onnx_weights.py), so a test can
build exactly the malformed or unexpected message it needs.
"""


def pb_varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_field(number, wire, value):
    """One protobuf field: wire 0 takes an int, 2 bytes (length-prefixed), 1 and 5 raw bytes."""
    key = pb_varint(number << 3 | wire)
    if wire == 0:
        return key + pb_varint(value)
    if wire == 2:
        return key + pb_varint(len(value)) + value
    return key + value


def pb_text(number, text):
    """A string field; bytes are written as they are (to build invalid UTF-8)."""
    return pb_field(number, 2, text if isinstance(text, bytes) else text.encode("utf-8"))
