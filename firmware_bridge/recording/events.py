"""A recording's events: compact storage, and reading an EVNT payload piece by piece.

Why not a list of namedtuples: an event takes about 20 bytes of JSON on disk
(``[12345,"movement",3],``) but some 150 bytes as Python objects, so a
recording made mostly of events (one huge EVNT chunk, or many small ones) would
need 10-20 times its size in memory to open.  Here an event costs 12 bytes (16
or 20 where a sample or value needs 64 bits), plus its kind text once per
distinct kind.  :class:`EventList` hands out :class:`Event` tuples on access.

Standard library and numpy only (Python 3.6, numpy 1.19).
"""
import array
import codecs
import collections
import collections.abc
import json
import re

import numpy as np

Event = collections.namedtuple("Event", ["sample", "kind", "value"])
Event.__doc__ = """A marker on the signal time axis.

sample : int, index of the signal sample it refers to (0-based)
kind : str, e.g. "movement", "repetition", "missing"
value : int, meaning depends on ``kind`` (docs/recording-format.md, "Events")
"""

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
# Distinct kinds kept once each.  Recordings use a handful ("movement",
# "rest", ...); past this many, new kinds are stored per event, so a file whose
# every event has its own kind cannot grow a dictionary beyond this.
MAX_SHARED_KINDS = 1024
# Longest JSON text of one event the reader parses; a writer's kinds are at
# most MAX_KIND_CHARS characters, which escaped as \uXXXX stays far below.
MAX_EVENT_TEXT = 1 << 16
MAX_KIND_CHARS = 1024

_WHITESPACE = re.compile(r"[ \t\n\r]*")
# What may still follow a number (or true/false/null) read at the end of the text so far.
_MAY_GO_ON = re.compile(r"[0-9.eE+-]*\Z")
_DECODER = json.JSONDecoder()


def valid_unicode(text):
    """``text`` with lone surrogates (which JSON's \\uD800 escapes can produce and
    UTF-8 cannot encode) replaced by U+FFFD; (text, True) if any was replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace"), True
    return text, False


class _IntColumn(object):
    """Growable integers: 4 bytes each until one needs 8, then 8 bytes each."""

    def __init__(self):
        self.data = array.array("i")

    def append(self, value):
        try:
            self.data.append(value)
        except OverflowError:
            self.data = array.array("q", self.data)
            self.data.append(value)

    def __len__(self):
        return len(self.data)

    def truncate(self, n):
        del self.data[n:]

    def to_numpy(self):
        if not self.data:
            return np.zeros(0, dtype=np.int64)
        return np.frombuffer(self.data, dtype=np.int32 if self.data.itemsize == 4 else np.int64)


class EventBuilder(object):
    """Collects events as they are read; :meth:`finish` gives an :class:`EventList`."""

    def __init__(self):
        self.samples = _IntColumn()
        self.values = _IntColumn()
        self.kind_ids = _IntColumn()   # < len(shared): shared[id]; else own kind number id - MAX_SHARED_KINDS
        self.shared = []
        self.shared_index = {}
        self.own_text = bytearray()    # UTF-8 of kinds past MAX_SHARED_KINDS, back to back
        self.own_ends = array.array("q")
        self.in_order = True
        self.replaced_text = False     # a kind held a lone surrogate (now U+FFFD)

    def __len__(self):
        return len(self.samples)

    def add(self, sample, kind, value):
        if len(self.samples) and self.in_order and sample < self.samples.data[-1]:
            self.in_order = False
        kind_id = self.shared_index.get(kind)
        if kind_id is None:
            kind, replaced = valid_unicode(kind)
            self.replaced_text |= replaced
            kind_id = self.shared_index.get(kind)
        if kind_id is None:
            if len(self.shared) < MAX_SHARED_KINDS:
                kind_id = len(self.shared)
                self.shared.append(kind)
                self.shared_index[kind] = kind_id
            else:
                kind_id = MAX_SHARED_KINDS + len(self.own_ends)
                self.own_text += kind.encode("utf-8")
                self.own_ends.append(len(self.own_text))
        self.samples.append(sample)
        self.values.append(value)
        self.kind_ids.append(kind_id)

    def mark(self):
        """A point to :meth:`roll_back` to (the events of a chunk found bad)."""
        return (len(self.samples), len(self.shared), len(self.own_ends), self.in_order)

    def roll_back(self, mark):
        n, n_shared, n_own, in_order = mark
        for column in (self.samples, self.values, self.kind_ids):
            column.truncate(n)
        for kind in self.shared[n_shared:]:
            del self.shared_index[kind]
        del self.shared[n_shared:]
        del self.own_ends[n_own:]
        del self.own_text[self.own_ends[-1] if self.own_ends else 0:]
        self.in_order = in_order

    def finish(self):
        samples, values, kind_ids = (c.to_numpy() for c in (self.samples, self.values, self.kind_ids))
        if not self.in_order:
            # Stable, so equal samples keep file order (docs/recording-format.md).
            order = np.argsort(samples, kind="mergesort")
            samples = samples[order]
            values = values[order]
            kind_ids = kind_ids[order]
            del order
        self.shared_index = None
        return EventList(samples, values, kind_ids, self.shared, bytes(self.own_text),
                         np.array(self.own_ends, dtype=np.int64))


class EventList(collections.abc.Sequence):
    """A recording's events, sorted by sample (stable); each item an :class:`Event`.

    Behaves as a read-only list (len, indexing, slicing, iteration, ``==`` with a
    list).  :attr:`samples` and :attr:`values` give the same numbers as int64
    ndarrays, shape (n_events,), for vectorised use.
    """

    def __init__(self, samples, values, kind_ids, shared, own_text, own_ends):
        self._samples = samples      # int32 or int64: 4 bytes each where the numbers allow
        self._values = values
        self._kind_ids = kind_ids
        self._shared = shared
        self._own_text = own_text
        self._own_ends = own_ends

    @property
    def samples(self):
        """ndarray, shape (n_events,), int64: the events' sample indices (a new array)."""
        return self._samples.astype(np.int64)

    @property
    def values(self):
        """ndarray, shape (n_events,), int64: the events' values (a new array)."""
        return self._values.astype(np.int64)

    @classmethod
    def from_events(cls, events):
        builder = EventBuilder()
        for event in events:
            builder.add(*event)
        return builder.finish()

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("event index out of range")
        return Event(int(self._samples[index]), self._kind(int(self._kind_ids[index])), int(self._values[index]))

    def __eq__(self, other):
        if not isinstance(other, (list, tuple, EventList)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self):
        shown = ", ".join(repr(e) for e in self[:3])
        return "EventList([{}{}])  # {} events".format(shown, ", ..." if len(self) > 3 else "", len(self))

    def kind_counts(self):
        """Return {kind: number of events}, in order of the kinds' first appearance."""
        counts = collections.Counter()
        if len(self):
            ids = self._kind_ids
            shared = np.bincount(ids[ids < MAX_SHARED_KINDS], minlength=len(self._shared))
            for kind, count in zip(self._shared, shared):
                if count:
                    counts[kind] += int(count)
            for kind_id in ids[ids >= MAX_SHARED_KINDS]:
                counts[self._kind(int(kind_id))] += 1
        return dict(counts)

    def _kind(self, kind_id):
        if kind_id < MAX_SHARED_KINDS:
            return self._shared[kind_id]
        own = kind_id - MAX_SHARED_KINDS
        start = int(self._own_ends[own - 1]) if own else 0
        return self._own_text[start:int(self._own_ends[own])].decode("utf-8")


def parse_event(event):
    """(sample, kind, value) of one decoded JSON event; ValueError if it is not
    ``[sample >= 0, kind, value]`` with 64-bit integers."""
    if (not isinstance(event, list) or len(event) != 3 or not _is_int(event[0])
            or not 0 <= event[0] <= INT64_MAX or not isinstance(event[1], str)
            or not _is_int(event[2]) or not INT64_MIN <= event[2] <= INT64_MAX):
        raise ValueError("event {} is not [sample, kind, value]".format(_short(event)))
    return event[0], event[1], event[2]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def utf8_text(byte_pieces, errors="strict"):
    """Yield the text of UTF-8 ``byte_pieces`` (an iterable of bytes), decoded
    across piece boundaries; UnicodeDecodeError on invalid UTF-8 unless
    ``errors="replace"``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    for piece in byte_pieces:
        text = decoder.decode(piece)
        if text:
            yield text
    tail = decoder.decode(b"", True)
    if tail:
        yield tail


def iter_json_array(text_pieces, max_item_chars=MAX_EVENT_TEXT):
    """Yield the elements of one JSON array whose text comes in pieces.

    Holds at most about one piece plus one element in memory, not the whole
    array.  Raises ValueError for text that is not exactly one JSON array (the
    elements before the problem have been yielded), for an element longer than
    ``max_item_chars`` characters, or nested too deep for the parser.
    """
    pieces = iter(text_pieces)
    state = {"text": "", "pos": 0, "done": False}

    def more(at_least):
        """Append at least ``at_least`` characters (fewer at the end); False if none."""
        parts, got = [state["text"][state["pos"]:]], 0
        while got < at_least:
            piece = next(pieces, None)
            if piece is None:
                state["done"] = True
                break
            parts.append(piece)
            got += len(piece)
        state["text"], state["pos"] = "".join(parts), 0
        return got > 0

    def next_char():
        """The next non-whitespace character ('' at the end of the text), not consumed."""
        while True:
            state["pos"] = _WHITESPACE.match(state["text"], state["pos"]).end()
            if state["pos"] < len(state["text"]):
                return state["text"][state["pos"]]
            if state["done"] or not more(1):
                return ""

    def value():
        while True:
            text, pos = state["text"], state["pos"]
            try:
                item, end = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                if len(text) - pos > max_item_chars:
                    raise ValueError("an element is invalid or longer than {} characters ({})".format(
                        max_item_chars, exc.msg)) from None
                if state["done"]:
                    raise ValueError(exc.msg) from None
                more(max(len(text) - pos, 4096))   # doubling: an element split many times stays linear
                continue
            except RecursionError:
                raise ValueError("nested too deep") from None
            if not state["done"] and _MAY_GO_ON.match(text, end) and more(1):
                continue   # "-1." + "5e3": a number at the end of the text may go on in the next piece
            if end - pos > max_item_chars:
                raise ValueError("an element is longer than {} characters".format(max_item_chars))
            state["pos"] = end
            return item

    def expect(char, what):
        found = next_char()
        if found != char:
            raise ValueError("expected {}, found {!r}".format(what, found or "the end"))
        state["pos"] += 1

    expect("[", "a JSON array '['")
    if next_char() == "]":
        state["pos"] += 1
    else:
        while True:
            yield value()
            found = next_char()
            if found == "]":
                state["pos"] += 1
                break
            if found != ",":
                raise ValueError("expected ',' or ']' after an element, found {!r}".format(found or "the end"))
            state["pos"] += 1
            next_char()   # value() starts at the element itself, past any whitespace
    if next_char():
        raise ValueError("extra data after the JSON array")
