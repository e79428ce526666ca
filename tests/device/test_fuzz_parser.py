"""Fuzzing the chip parser (firmware_bridge/chip/parser.py) with a million frames.

A seeded generator builds one byte stream of ``NEUROHAND_FUZZ_FRAMES`` data
frames (default 1,000,000) as the chip would send them, with faults injected
by construction: dropped frames, frames with one byte damaged (CRC errors),
garbage bursts, false sync words (impossible headers), plausible headers with
long lengths whose CRC fails, frames with a good CRC but an inconsistent body,
ACK/NAK and command frames (intact and damaged), stream restarts, sequence
jumps backwards, the uint32 sequence wrap and a partial frame at the end.  It
is fed in random chunk sizes and the parser's counters must equal what was
injected, counted by the receiver rules of docs/chip-protocol.md ("Receiver
behaviour"), from the injection log, not from the parser.

False syncs by chance: the receiver searches for the sync word only inside
discarded bytes.  The generator makes sure no discarded run contains a sync
word other than the ones it placed: every bad item is checked, and a garbage
burst never starts with a byte that could complete a sync word begun by the
bytes before it (the sync word has no prefix that is also a suffix, so that is
the only way one could straddle two items).  A sync word inside an intact frame
is harmless: an accepted frame is skipped whole.

NEUROHAND_FUZZ_SEED=N reproduces a run; NEUROHAND_FUZZ_SEED=random picks a new
seed (printed in every failure message).
"""
import array
import os
import random
import struct
import zlib

import numpy as np

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipCommand, ChipParser, ChipReply, SampleFrame, SampleGap

DEFAULT_SEED = 20240611
DEFAULT_FRAMES = 1000000
SYNC = cp.SYNC
# A burst starting with one of these could complete a sync word begun by the item before it.
SYNC_SUFFIX_STARTS = frozenset(SYNC[1:])
MAX_FRAME_BYTES = cp.frame_size(cp.MAX_DATA_BODY)
CONTROL_MIN_BODY = {cp.FRAME_COMMAND: cp.COMMAND_HEADER.size, cp.FRAME_ACK: cp.REPLY_HEADER.size,
                    cp.FRAME_NAK: cp.REPLY_HEADER.size}

# Probability per frame slot of each extra item placed before the frame.
EXTRA_KINDS = ("garbage", "false_sync", "long_header", "malformed", "reply", "command", "bad_control",
               "stream_start", "backwards")
EXTRA_WEIGHTS = (50, 10, 3, 5, 10, 10, 4, 1, 1)
EXTRA_PROBABILITY = 0.01
DROP_PROBABILITY = 0.01
CORRUPT_PROBABILITY = 0.01


def fuzz_seed():
    text = os.environ.get("NEUROHAND_FUZZ_SEED", "")
    if text == "random":
        return random.SystemRandom().randrange(2 ** 32)
    return int(text) if text else DEFAULT_SEED


def fuzz_frames():
    return int(os.environ.get("NEUROHAND_FUZZ_FRAMES", DEFAULT_FRAMES))


class Expected(object):
    """What a receiver that saw every byte counts, from the injection log."""

    def __init__(self):
        self.counters = dict.fromkeys(("frames_good", "crc_errors", "bad_headers", "malformed", "resyncs",
                                       "bytes_discarded", "frames_missing", "gaps", "sequence_restarts",
                                       "stream_starts", "replies", "commands"), 0)
        self.frame_slots = array.array("q")      # device time (= slot index) of each accepted frame
        self.frame_sequences = array.array("Q")
        self.gaps = []                           # (index of the frame it precedes, SampleGap)
        self.lost = False                        # inside a run of discarded bytes
        self.pending_missing = 0                 # frames lost since the last accepted data frame
        self.seen_data = False

    def bad(self, n_bytes):
        if n_bytes and not self.lost:
            self.counters["resyncs"] += 1
            self.lost = True
        self.counters["bytes_discarded"] += n_bytes

    def accepted_control(self, kind):
        self.counters[kind] += 1
        self.lost = False

    def accepted_frame(self, slot, sequence, spf, how):
        """how: "start" (STREAM_START flag), "backwards" (a chip reset without the flag) or None."""
        c = self.counters
        if how == "start":
            c["stream_starts"] += 1
        elif how == "backwards":
            c["sequence_restarts"] += 1
        elif self.pending_missing and self.seen_data:
            c["gaps"] += 1
            c["frames_missing"] += self.pending_missing
            first = (sequence - self.pending_missing) % cp.SEQUENCE_MODULUS
            self.gaps.append((len(self.frame_slots),
                              SampleGap(first, self.pending_missing, self.pending_missing * spf)))
        self.pending_missing = 0
        self.seen_data = True
        c["frames_good"] += 1
        self.frame_slots.append(slot)
        self.frame_sequences.append(sequence)
        self.lost = False


class StreamBuilder(object):
    """Builds the faulty stream and its Expected counts; see the module docstring."""

    def __init__(self, seed, n_frames):
        self.seed = seed
        self.n_frames = n_frames
        self.rng = np.random.RandomState(seed)
        self.rnd = random.Random(seed)
        self.expected = Expected()
        self.long_headers = []                   # (offset, body length): CRC must fail
        self._make_templates()

    def _make_templates(self):
        rng = self.rng
        shapes = [(rng.randint(1, 5), rng.randint(1, 5)) for _ in range(290)]
        shapes += [(20, 16), (1, 64), (255, 1), (10, 32)] * 2 + [(255, 64)]   # default, wide, long, maximal
        self.template_spf = []
        self.template_payload = []
        self.template_head = []                  # sync + envelope header
        self.template_head_crc = []              # CRC-32 of the header after the sync word
        self.template_geometry = []
        for spf, n_channels in shapes:
            samples = rng.randint(-32768, 32768, size=(spf, n_channels)).astype("<i2")
            head = cp.HEADER.pack(SYNC, cp.PROTOCOL_VERSION, cp.FRAME_DATA, cp.data_body_size(n_channels, spf))
            self.template_spf.append(spf)
            self.template_payload.append(samples.tobytes())
            self.template_head.append(head)
            self.template_head_crc.append(zlib.crc32(head[len(SYNC):]))
            self.template_geometry.append((n_channels, spf))
        # Mostly small frames (the stream must fit in memory), the big ones rarely.
        n_small = 290
        weights = np.r_[np.full(n_small, 1.0), np.full(len(shapes) - n_small, 0.0005)]
        self.template_weights = weights / weights.sum()

    def _data_frame(self, template, sequence, slot, flags=0):
        n_channels, spf = self.template_geometry[template]
        body = cp.DATA_HEADER.pack(sequence, slot, n_channels, spf, flags, 0) + self.template_payload[template]
        crc = zlib.crc32(body, self.template_head_crc[template])
        return self.template_head[template] + body + cp.CRC.pack(crc)

    def payload_of_slot(self, slot):
        """Sample bytes sent in data frame slot ``slot`` (the clean tail uses template 0)."""
        return self.template_payload[self.slot_templates[slot] if slot < self.n_frames else 0]

    def _garbage(self, length):
        while True:
            data = bytearray(self.rng.randint(0, 256, size=length).astype(np.uint8).tobytes())
            if data[0] in SYNC_SUFFIX_STARTS:
                data[0] = 0
            if SYNC not in data:
                return bytes(data)

    def _check_bad_item(self, data):
        assert data.find(SYNC, 1) < 0, "generator bug: a sync word inside a bad item (seed {})".format(self.seed)
        return data

    def _damaged(self, frame):
        """Frame with one byte after the envelope header XORed, so its CRC fails."""
        while True:
            damaged = bytearray(frame)
            damaged[self.rnd.randrange(cp.HEADER_SIZE, len(frame))] ^= self.rnd.randint(1, 255)
            if damaged.find(SYNC, 1) < 0:
                return bytes(damaged)

    def _control_frame(self):
        rnd = self.rnd
        kind = rnd.choice(("ack", "nak", "command"))
        command, token = rnd.randint(0, 255), rnd.randint(0, 255)
        if kind == "ack":
            return "replies", cp.encode_ack(command, token, self._garbage(rnd.randint(1, 40))[:rnd.randint(0, 40)])
        if kind == "nak":
            return "replies", cp.encode_nak(command, token, rnd.randint(1, 255))
        return "commands", cp.encode_command(command, token, self._garbage(rnd.randint(1, 40))[:rnd.randint(0, 40)])

    def _false_sync(self):
        """A sync word followed by an impossible header (bad_headers)."""
        rnd = self.rnd
        variant = rnd.randrange(4)
        version, frame_type, length = cp.PROTOCOL_VERSION, cp.FRAME_DATA, 100
        if variant == 0:
            version = rnd.choice([0] + list(range(2, 256)))
        elif variant == 1:
            frame_type = rnd.choice([0] + list(range(5, 256)))
        elif variant == 2:
            length = rnd.choice([rnd.randint(0, cp.DATA_HEADER_SIZE + 1), rnd.randint(cp.MAX_DATA_BODY + 1, 65535)])
        else:
            frame_type = rnd.choice(sorted(CONTROL_MIN_BODY))
            length = rnd.choice([rnd.randint(0, CONTROL_MIN_BODY[frame_type] - 1),
                                 rnd.randint(cp.MAX_CONTROL_BODY + 1, 65535)])
        tail = self._garbage(rnd.randint(1, 24)) if rnd.random() < 0.7 else b""
        return self._check_bad_item(cp.HEADER.pack(SYNC, version, frame_type, length) + tail)

    def _long_header(self):
        """A plausible header whose body runs over the frames after it; its CRC fails."""
        rnd = self.rnd
        if rnd.random() < 0.7:
            frame_type, length = cp.FRAME_DATA, rnd.randint(cp.DATA_HEADER_SIZE + 2, cp.MAX_DATA_BODY)
        else:
            frame_type = rnd.choice(sorted(CONTROL_MIN_BODY))
            length = rnd.randint(CONTROL_MIN_BODY[frame_type], cp.MAX_CONTROL_BODY)
        tail = self._garbage(rnd.randint(1, 16)) if rnd.random() < 0.5 else b""
        return length, self._check_bad_item(cp.HEADER.pack(SYNC, cp.PROTOCOL_VERSION, frame_type, length) + tail)

    def _malformed(self):
        """A frame with a good CRC but an inconsistent body."""
        rnd = self.rnd
        variant = rnd.randrange(4)
        if variant == 0:     # body length disagrees with channels x samples
            n_channels, spf = rnd.randint(1, 8), rnd.randint(1, 8)
            extra = rnd.choice([-2, 2, 4, 1])
            n_bytes = max(2, 2 * n_channels * spf + extra)
            body = cp.DATA_HEADER.pack(rnd.getrandbits(32), 0, n_channels, spf, 0, 0) + self._garbage(n_bytes)
            frame = cp.encode_frame(cp.FRAME_DATA, body)
        elif variant == 1:   # zero channels or zero samples per frame
            n_channels, spf = rnd.choice([(0, rnd.randint(1, 9)), (rnd.randint(1, 9), 0), (0, 0)])
            body = cp.DATA_HEADER.pack(rnd.getrandbits(32), 0, n_channels, spf, 0, 0) + self._garbage(2)
            frame = cp.encode_frame(cp.FRAME_DATA, body)
        elif variant == 2:   # ACK with a non-zero status
            frame = cp.encode_frame(cp.FRAME_ACK, cp.REPLY_HEADER.pack(1, 1, rnd.randint(1, 255)))
        else:                # NAK with status OK
            frame = cp.encode_frame(cp.FRAME_NAK, cp.REPLY_HEADER.pack(1, 1, cp.STATUS_OK))
        if frame.find(SYNC, 1) >= 0:
            return self._malformed()
        return frame

    def build(self):
        """Return the stream (bytes); self.expected holds what the parser must count."""
        rng, rnd, exp = self.rng, self.rnd, self.expected
        n = self.n_frames
        fates = rng.random_sample(n)
        dropped = fates < DROP_PROBABILITY
        corrupted = (fates >= DROP_PROBABILITY) & (fates < DROP_PROBABILITY + CORRUPT_PROBABILITY)
        has_extra = rng.random_sample(n) < EXTRA_PROBABILITY
        templates = rng.choice(len(self.template_payload), size=n, p=self.template_weights)
        self.slot_templates = templates
        extra_kinds = rnd.choices(EXTRA_KINDS, weights=EXTRA_WEIGHTS, k=int(has_extra.sum()) + 1)
        blocks, pieces, offset = [], [], 0
        sequence = cp.SEQUENCE_MODULUS - n // 2      # the counter wraps half way through
        last_good_sequence = None
        extra_index = 0
        block_len = 0
        for slot in range(n):
            how = None
            if has_extra[slot]:
                kind = extra_kinds[extra_index]
                extra_index += 1
                item = None
                if kind == "garbage":
                    item = self._garbage(rnd.randint(1, 64) if rnd.random() < 0.95 else rnd.randint(65, 5000))
                    exp.bad(len(item))
                elif kind == "false_sync":
                    item = self._false_sync()
                    exp.counters["bad_headers"] += 1
                    exp.bad(len(item))
                elif kind == "long_header":
                    length, item = self._long_header()
                    self.long_headers.append((offset, length))
                    exp.counters["crc_errors"] += 1
                    exp.bad(len(item))
                elif kind == "malformed":
                    item = self._malformed()
                    exp.counters["malformed"] += 1
                    exp.bad(len(item))
                elif kind in ("reply", "command", "bad_control"):
                    counter, item = self._control_frame()
                    if kind == "bad_control":
                        item = self._damaged(item)
                        exp.counters["crc_errors"] += 1
                        exp.bad(len(item))
                    else:
                        exp.accepted_control(counter)
                elif kind == "stream_start":
                    how = "start"
                    sequence = 0
                elif kind == "backwards" and last_good_sequence is not None:
                    how = "backwards"
                    sequence = (last_good_sequence + 1 - rnd.randint(1, cp.SEQUENCE_MODULUS // 2)) % cp.SEQUENCE_MODULUS
                if item is not None:
                    pieces.append(item)
                    offset += len(item)
            template = templates[slot]
            if how is None and dropped[slot]:
                exp.pending_missing += 1
            else:
                frame = self._data_frame(template, sequence, slot, cp.FLAG_STREAM_START if how == "start" else 0)
                if how is None and corrupted[slot]:
                    frame = self._damaged(frame)
                    exp.pending_missing += 1
                    exp.counters["crc_errors"] += 1
                    exp.bad(len(frame))
                else:
                    exp.accepted_frame(slot, sequence, self.template_spf[template], how)
                    last_good_sequence = sequence
                pieces.append(frame)
                offset += len(frame)
            sequence = (sequence + 1) % cp.SEQUENCE_MODULUS
            if len(pieces) >= 20000:
                blocks.append(b"".join(pieces))
                pieces = []
        # A clean tail longer than the longest plausible body, so every long
        # header's CRC is decided before the stream ends; then a partial frame.
        tail_bytes = 0
        slot = n
        while tail_bytes <= 2 * MAX_FRAME_BYTES:
            frame = self._data_frame(0, sequence, slot)
            exp.accepted_frame(slot, sequence, self.template_spf[0], None)
            pieces.append(frame)
            tail_bytes += len(frame)
            sequence = (sequence + 1) % cp.SEQUENCE_MODULUS
            slot += 1
        self.n_slots = slot
        partial = self._data_frame(1, sequence, slot)[:rnd.randint(1, 20)]
        exp.bad(len(partial))
        pieces.append(partial)
        blocks.append(b"".join(pieces))
        stream = b"".join(blocks)
        for at, length in self.long_headers:
            crc_at = at + cp.HEADER_SIZE + length
            assert zlib.crc32(stream[at + len(SYNC):crc_at]) != struct.unpack_from("<I", stream, crc_at)[0], (
                "seed {}: a long header's CRC matched by chance (1 in 2**32); use another seed".format(self.seed))
        return stream


def control_frame_size(event):
    if isinstance(event, ChipReply):
        return cp.frame_size(cp.REPLY_HEADER.size + len(event.data))
    return cp.frame_size(cp.COMMAND_HEADER.size + len(event.args))


class Collector(object):
    """Consumes the parser's events: frames (device time, sequence), gaps with
    the index of the frame they precede, control frames, bytes accepted, and
    (given the builder) frames whose samples differ from what their slot sent."""

    def __init__(self, builder=None):
        self.builder = builder
        self.slots, self.sequences = array.array("q"), array.array("Q")
        self.gaps = []
        self.controls = {"replies": 0, "commands": 0}
        self.accepted_bytes = 0
        self.wrong_samples = []

    def take(self, events):
        slots, sequences = self.slots, self.sequences
        for event in events:
            kind = type(event)
            if kind is SampleFrame:
                slots.append(event.device_time_us)
                sequences.append(event.sequence)
                self.accepted_bytes += cp.frame_size(cp.data_body_size(event.n_channels, event.samples_per_frame))
                if self.builder is not None and event.samples.tobytes() != self.builder.payload_of_slot(
                        event.device_time_us):
                    self.wrong_samples.append(event.device_time_us)
            elif kind is SampleGap:
                self.gaps.append((len(slots), event))
            else:
                self.controls["replies" if kind is ChipReply else "commands"] += 1
                self.accepted_bytes += control_frame_size(event)


def parse_in_random_chunks(stream, seed, max_chunk, collector):
    """Feed ``stream`` in log-uniform random chunks of 1..max_chunk bytes, then flush."""
    rng = np.random.RandomState(seed + 1)
    parser = ChipParser()
    view = memoryview(stream)
    position, end = 0, len(stream)
    sizes = np.exp(rng.uniform(0.0, np.log(max_chunk + 1), size=1 << 16)).astype(np.int64)
    index = 0
    while position < end:
        step = int(sizes[index & 0xFFFF])
        index += 1
        collector.take(parser.feed(view[position:position + step]))
        position += step
    parser.flush()
    return parser


def check_run(n_frames, seed, max_chunk):
    builder = StreamBuilder(seed, n_frames)
    stream = builder.build()
    expected = builder.expected
    context = "seed {} (NEUROHAND_FUZZ_SEED={} reproduces), {} frames, {} bytes".format(
        seed, seed, n_frames, len(stream))
    seen = Collector(builder)
    parser = parse_in_random_chunks(stream, seed, max_chunk, seen)
    counters = dict(parser.counters)
    assert counters == expected.counters, "{}\nparser:   {}\nexpected: {}".format(
        context, counters, expected.counters)
    assert seen.controls == {"replies": expected.counters["replies"],
                             "commands": expected.counters["commands"]}, context
    assert seen.slots == expected.frame_slots, context
    assert seen.sequences == expected.frame_sequences, context
    assert seen.gaps == expected.gaps, context
    assert not seen.wrong_samples, "{}: slots {} carry samples that were not sent".format(
        context, seen.wrong_samples[:10])
    # Conservation: every byte is in an accepted frame or counted as discarded.
    assert seen.accepted_bytes + counters["bytes_discarded"] == len(stream), context
    assert parser.buffered_bytes == 0, context
    return builder


def test_million_frames_with_injected_faults_give_exact_counters():
    n_frames = fuzz_frames()
    builder = check_run(n_frames, fuzz_seed(), max_chunk=1 << 16)
    c = builder.expected.counters
    # The run must exercise every path (the rates are per frame slot).
    if n_frames >= 100000:
        for name in ("crc_errors", "bad_headers", "malformed", "resyncs", "frames_missing", "gaps",
                     "sequence_restarts", "stream_starts", "replies", "commands"):
            assert c[name] > 0, name


def test_small_chunks_give_the_same_exact_counters():
    # Chunk boundaries everywhere: inside sync words, headers, CRCs and garbage.
    check_run(20000, fuzz_seed() + 7, max_chunk=40)


def test_random_bytes_dense_with_sync_words_conserve_every_byte():
    """No structure at all: random bytes with sync words sprinkled in, so the
    header, length and CRC checks all run on nonsense.  Nothing may escape and
    every byte must end up either in an accepted frame or counted as discarded."""
    seed = fuzz_seed() + 11
    rng = np.random.RandomState(seed)
    data = bytearray(rng.randint(0, 256, size=3000000).astype(np.uint8).tobytes())
    for at in rng.randint(0, len(data) - 8, size=30000):
        data[at:at + 5] = SYNC + bytes([cp.PROTOCOL_VERSION])
        if rng.random_sample() < 0.5:
            data[at + 5] = int(rng.randint(1, 5))
    seen = Collector()
    parser = parse_in_random_chunks(bytes(data), seed, 1 << 14, seen)
    c = parser.counters
    assert seen.accepted_bytes + c["bytes_discarded"] == len(data), "seed {}".format(seed)
    assert c["bad_headers"] + c["crc_errors"] + c["malformed"] > 10000, "seed {}: {}".format(seed, c)
    assert c["bad_headers"] + c["crc_errors"] + c["malformed"] + c["frames_good"] + c["replies"] + c["commands"] <= data.count(SYNC)
