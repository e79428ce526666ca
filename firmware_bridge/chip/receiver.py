"""From the chip link's bytes to sample blocks for the decoder.

:class:`ChipReceiver` is the protocol object of the chip's serial link
(:mod:`neurohand.firmware_bridge.link`): the link's reader thread hands it
every chunk of bytes; it stamps the chunk's arrival, parses it
(:mod:`.parser`), and queues ``(SampleFrame | SampleGap, arrival_s)`` for the
decode stage.  Whatever it has to drop (a full queue, frames held after a
reconnect, the samples missed across a chip reset) reaches the decoder as a
``SampleGap``, so the decoder's time axis stays right.
"""
from neurohand.firmware_bridge.chip.parser import ChipReply, SampleFrame, SampleGap
from neurohand.firmware_bridge.chip.protocol import sequence_step


class ChipReceiver(object):
    """Protocol object for the chip link's reader thread (transport apart from protocol).

    The link calls :meth:`data_received` (alias :meth:`feed`) with each chunk
    of bytes it read, from its own thread.  Each chunk is stamped with the
    monotonic clock the moment it is handed over, parsed, and its sample
    frames and gaps are queued for the decoder with that stamp; chip replies
    go to ``on_reply`` (e.g. ``ChipCommandChannel.handle_reply``).

    Stage timings: ``parse`` is ``ChipParser.feed``; ``read`` is the rest of
    the reader thread's work per chunk (queueing), or, where the link reports
    it, the duration of its read call (``data_received(data, read_s=...)``).
    Waiting for bytes is idle time and is never counted.

    Reconnects: when the link reopens its port after a loss and
    ``on_reconnect`` is set (by ``chip_opener``), data frames are held back
    (dropped, counted in ``frames_held_after_reconnect``, and told to the
    decoder as a gap) until :meth:`release_frames`: the chip's configuration
    is checked again first, by another thread (``on_reconnect`` must return
    at once).  A chip that reset starts a new stream (STREAM_START, sequence
    0; or, if those first frames were flushed when the port reopened, a
    sequence that went backwards), so the samples it missed cannot be
    counted from sequence numbers; with
    ``sample_rate`` given, the receiver tells the decoder a gap estimated from
    the arrival clock (``stream_restarts``, ``restart_gap_samples``), so the
    DSP's time axis stays right.  ``on_fault(kind, reason)`` (set by the
    runner) reports a fault found on the link side (``chip_config``).

    ``on_chunk`` (set by a runner that decodes in the reader thread) is called
    after each chunk's events were handed to ``frames``, from the same thread:
    one call per read, so a backlog read at once is decoded at once.
    """

    def __init__(self, parser, frames, stats, clock, on_reply=None, sample_rate=None):
        self.parser = parser
        self._frames = frames
        self._parse_timer = stats.stages["parse"]
        self._read_timer = stats.stages["read"]
        self._clock = clock
        self.on_reply = on_reply
        self.on_reconnect = None
        self.on_fault = None
        self.on_chunk = None
        self.sample_rate = None if sample_rate is None else float(sample_rate)
        self._lost_frames = 0
        self._lost_samples = 0
        self._lost_first = None
        self._holding = False
        self._last_queued_s = None      # arrival of the last frame handed to the decoder
        self._last_sequence = None
        self.counters = {"chunks": 0, "bytes": 0, "frames_dropped_queue_full": 0,
                         "link_opens": 0, "link_losses": 0, "replies": 0,
                         "frames_held_after_reconnect": 0, "stream_restarts": 0, "restart_gap_samples": 0}

    def data_received(self, data, read_s=None):
        arrival = self._clock()
        events = self.parser.feed(data)
        parsed = self._clock()
        self._parse_timer.add(parsed - arrival)
        counters = self.counters
        counters["chunks"] += 1
        counters["bytes"] += len(data)
        for event in events:
            kind = type(event)
            if kind is SampleFrame:
                if self._holding:
                    self._last_sequence = event.sequence
                    self.counters["frames_held_after_reconnect"] += 1
                    self._lose(event, counter=None)
                    continue
                last, self._last_sequence = self._last_sequence, event.sequence
                went_back = last is not None and sequence_step(last, event.sequence) < 0
                if self._last_queued_s is not None and (event.stream_start or went_back):
                    # A new stream: flagged, or (its first frames flushed when the port was
                    # reopened) a sequence that went backwards.
                    self._stream_restarted(event, arrival)
                self._enqueue(event, arrival)
            elif kind is SampleGap:
                self._enqueue(event, arrival)
            elif kind is ChipReply:
                counters["replies"] += 1
                if self.on_reply is not None:
                    self.on_reply(event)
        self._read_timer.add(read_s if read_s is not None else self._clock() - parsed)
        if self.on_chunk is not None:
            self.on_chunk()

    feed = data_received

    def connection_made(self, link):
        """The link (re)opened its port.  On a reopen, hold frames and ask for a re-start."""
        self.counters["link_opens"] += 1
        on_reconnect = self.on_reconnect
        if self.counters["link_opens"] > 1 and on_reconnect is not None:
            self._holding = True
            on_reconnect()

    def release_frames(self):
        """The chip's configuration was checked again: decode its frames again (any thread)."""
        self._holding = False

    def report_fault(self, kind, reason):
        """A fault found on the link side (e.g. ``chip_config``); passed to ``on_fault``."""
        if self.on_fault is not None:
            self.on_fault(kind, reason)

    def _stream_restarted(self, frame, arrival):
        # A new stream after a chip reset: the samples missed since the last frame we
        # queued cannot be counted from sequence numbers, so estimate them from the
        # arrival clock (what is pending from dropped frames is part of that time).
        self.counters["stream_restarts"] += 1
        if self.sample_rate is None:
            return
        missing = int(round((arrival - self._last_queued_s) * self.sample_rate)) - frame.samples.shape[0]
        self._lost_frames = self._lost_samples = 0
        self._lost_first = None
        if missing > 0:
            self.counters["restart_gap_samples"] += missing
            self._lost_frames = None
            self._lost_samples = missing

    def connection_lost(self, exc=None):
        """The link lost the port (it may reconnect): a partial frame is discarded."""
        self.counters["link_losses"] += 1
        self.parser.flush()

    def _enqueue(self, event, arrival):
        frames = self._frames
        if self._lost_samples:
            # Samples dropped (full queue, held after a reconnect, a chip reset)
            # reach the decoder as a gap, first.
            gap = SampleGap(self._lost_first, self._lost_frames, self._lost_samples)
            if not frames.put((gap, arrival)):
                self._lose(event)
                return
            self._lost_frames = self._lost_samples = 0
            self._lost_first = None
        if not frames.put((event, arrival)):
            self._lose(event)
        elif type(event) is SampleFrame:
            self._last_queued_s = arrival

    def _lose(self, event, counter="frames_dropped_queue_full"):
        if type(event) is SampleGap:
            frames, samples, first = event.missing_frames, event.missing_samples, event.first_missing_sequence
        else:
            frames, samples, first = 1, event.samples.shape[0], event.sequence
            if counter is not None:
                self.counters[counter] += 1
        if self._lost_first is None:
            self._lost_first = first
        if self._lost_frames is not None and frames is not None:
            self._lost_frames += frames
        else:
            self._lost_frames = None        # a count of frames is unknown once an estimate is in
        self._lost_samples += samples
