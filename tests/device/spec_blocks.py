"""Read the machine-readable blocks of the protocol documents.

docs/hand-protocol.md and docs/psyonic.md carry their constants, test vectors
and example mapping in fenced code blocks whose info string names their kind
(```hand-vector, ```hand-constants, ```keys-mapping), each holding one JSON
value.  Tests read them with :func:`read_blocks` and check the code against
them, so the documents and the code cannot drift apart.
"""
import json
import re

from neurohand.firmware_bridge.shared.errors import ConfigError

_FENCE = re.compile(r"^```([A-Za-z0-9_-]+)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def read_blocks(path, kind):
    """Return the JSON values of every ```kind block in the markdown file ``path``, in order."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    values = []
    for match in _FENCE.finditer(text):
        if match.group(1) != kind:
            continue
        try:
            values.append(json.loads(match.group(2)))
        except ValueError as exc:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError("{}:{}: ```{} block is not valid JSON: {}".format(path, line, kind, exc)) from exc
    return values


def hex_bytes(text):
    """``"A5 5A 01"`` -> ``b"\\xa5\\x5a\\x01"``."""
    return bytes(bytearray(int(part, 16) for part in text.split()))
