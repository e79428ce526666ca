"""The shared framing loop (firmware_bridge/shared/framer.py), on a toy protocol.

The toy protocol differs from both real ones (3-byte sync, 1-byte length,
adler32 instead of CRC-32), so these tests show that nothing of the chip's or
the glove's format is built into the framer.  The real parsers' behaviour is
checked by test_chip_parser.py, test_fuzz_parser.py and test_glove_protocol.py.
"""
import struct
import zlib

import pytest

from neurohand.firmware_bridge.chip.parser import ChipParser
from neurohand.firmware_bridge.gloves.parser import GloveParser
from neurohand.firmware_bridge.shared.framer import FRAMER_COUNTERS, Framer, sync_prefix_length

SYNC = b"\xab\xcd\xef"
HEADER = struct.Struct("<3sBBB")
CRC = struct.Struct("<I")
VERSION = 7
KIND_A, KIND_B = 0x10, 0x20


def encode(kind, body, version=VERSION):
    head = HEADER.pack(SYNC, version, kind, len(body))
    return head + body + CRC.pack(zlib.adler32(head[len(SYNC):] + body))


class ToyParser(Framer):
    """Accepts A frames (2..8 bytes) and B frames (exactly 1 byte, refused when it is 0)."""

    def __init__(self):
        Framer.__init__(self, FRAMER_COUNTERS + ("a", "b"), sync=SYNC, version=VERSION, header=HEADER, crc=CRC,
                        frame_types={KIND_A: (2, 8, ToyParser._a), KIND_B: (1, 1, ToyParser._b)},
                        crc_function=zlib.adler32)

    def _a(self, buf, at, body_len, events):
        events.append(("a", bytes(buf[at:at + body_len])))
        self.counters["a"] += 1
        return True

    def _b(self, buf, at, body_len, events):
        if buf[at] == 0:
            return False
        events.append(("b", buf[at]))
        self.counters["b"] += 1
        return True


def feed_all(data, chunk):
    parser = ToyParser()
    events = []
    for offset in range(0, len(data), chunk):
        events += parser.feed(data[offset:offset + chunk])
    return parser, events


A1, A2, B5 = encode(KIND_A, b"\x01\x02"), encode(KIND_A, b"hello!"), encode(KIND_B, b"\x05")
EVENTS = [("a", b"\x01\x02"), ("a", b"hello!"), ("b", 5)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_clean_stream_in_any_chunking(chunk):
    parser, events = feed_all(A1 + A2 + B5, chunk)
    assert events == EVENTS
    assert parser.counters == dict(dict.fromkeys(FRAMER_COUNTERS, 0), a=2, b=1)
    assert parser.buffered_bytes == 0


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_every_fault_is_counted_once(chunk):
    bad_crc = bytearray(A2)
    bad_crc[-1] ^= 0x40
    stream = (b"junk" + A1                                   # 4 garbage bytes: resync 1
              + encode(KIND_A, b"\x01\x02", version=8)       # wrong version: a false sync, resync 2
              + A2 + bytes(bad_crc)                          # a CRC error: resync 3
              + encode(KIND_B, b"\x00")                      # good CRC, refused by the handler
              + encode(0x30, b"\x01")                        # unknown type
              + B5)
    parser, events = feed_all(stream, chunk)
    assert events == [("a", b"\x01\x02"), ("a", b"hello!"), ("b", 5)]
    c = parser.counters
    assert (c["bad_headers"], c["crc_errors"], c["malformed"]) == (2, 1, 1)
    assert c["resyncs"] == 3
    dropped = 4 + len(A1) + len(A2) + len(encode(KIND_B, b"\x00")) + len(encode(0x30, b"\x01"))
    assert c["bytes_discarded"] == dropped
    assert len(stream) - c["bytes_discarded"] == len(A1 + A2 + B5)


def test_a_frame_hidden_in_a_damaged_frame_is_found():
    # A header that promises 8 bytes; the real frame starts inside them.
    stream = HEADER.pack(SYNC, VERSION, KIND_A, 8) + A1 + A2
    parser, events = feed_all(stream, 1000)
    assert events == [("a", b"\x01\x02"), ("a", b"hello!")]
    assert parser.counters["crc_errors"] == 1
    assert parser.counters["bytes_discarded"] == HEADER.size


def test_a_split_sync_word_is_kept_and_flush_counts_the_rest():
    parser = ToyParser()
    assert parser.feed(b"garbage" + A1[:2]) == []      # ends in 2 bytes of the sync word
    assert parser.buffered_bytes == 2
    assert parser.counters["bytes_discarded"] == 7
    assert parser.feed(A1[2:]) == [("a", b"\x01\x02")]
    assert parser.feed(A2[:-1]) == []
    parser.flush()
    assert parser.buffered_bytes == 0
    assert parser.counters["bytes_discarded"] == 7 + len(A2) - 1
    assert parser.counters["resyncs"] == 2


def test_sync_prefix_length():
    assert sync_prefix_length(bytearray(b"..\xab\xcd"), SYNC) == 2
    assert sync_prefix_length(bytearray(b"..\xab"), SYNC) == 1
    assert sync_prefix_length(bytearray(b"\xab\xcd\xef"), SYNC) == 0     # a whole sync word is found, not kept
    assert sync_prefix_length(bytearray(b""), SYNC) == 0
    assert sync_prefix_length(bytearray(b"\xcd"), SYNC) == 0


def test_a_parser_without_the_framing_counters_is_refused():
    with pytest.raises(ValueError, match="bytes_discarded"):
        Framer(("crc_errors", "bad_headers", "malformed", "resyncs"), SYNC, VERSION, HEADER, CRC, {})


def test_chip_and_glove_parsers_share_the_loop():
    # One implementation of framing: neither parser has its own feed or flush.
    for cls in (ChipParser, GloveParser):
        assert cls.feed is Framer.feed and cls.flush is Framer.flush
        assert set(FRAMER_COUNTERS) <= set(cls().counters)
