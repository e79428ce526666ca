"""A virtual neural-interface chip on a pseudo-terminal (docs/chip-protocol.md).

It answers the command channel like the chip and streams samples from a
*source* at the source's true sample rate times ``speed``.  Parts, each
testable on its own:

* ``ArraySource`` / ``RecordingSource``: where the samples come from (an int16
  array in memory, or a recording read lazily in blocks).
* ``PacingScheduler``: when each frame is due, against an absolute start time on
  an injectable clock, so the rate cannot drift.
* ``FaultInjector``: seeded drops, corruption and garbage, with counters of what
  was injected and of what a receiver should therefore count.
* ``VirtualChip``: the command handling and the event loop (one thread,
  ``select``; no locks needed) on a pseudo-terminal (virtual/pty_device.py).

Standard library and numpy only (runs on the Jetson's Python 3.6 too).
"""
import math
import random
import time

import numpy as np

from neurohand.firmware_bridge.chip import protocol as cp
from neurohand.firmware_bridge.chip.parser import ChipCommand, ChipParser
from neurohand.firmware_bridge.shared.checks import check_int, check_number
from neurohand.firmware_bridge.shared.counters import new_counters
from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.virtual.pty_device import DrainWatch, PtyDevice

INT16_MAX = 32767
OUTPUT_LIMIT_BYTES = 256 * 1024     # a chip's transmit buffer: beyond this, whole frames are dropped
CHIP_ID = 0x4E480001                # "NH" + 1
MODEL = "NH-VIRTUAL"
MAX_SAMPLE_RATE_HZ = 30000


# --- sources -----------------------------------------------------------------
class ArraySource:
    """Samples held in memory.

    samples: int16 ndarray, shape (n_samples, n_channels), ADC counts.
    sample_rate_hz: samples per second per channel.  scale_uv: microvolts per count.
    """

    def __init__(self, samples, sample_rate_hz, scale_uv=1.0):
        samples = np.asarray(samples)
        if samples.ndim != 2 or samples.dtype != np.int16:
            raise UsageError("samples must be int16 with shape (n_samples, n_channels), got {} {}".format(
                samples.dtype, samples.shape))
        self.samples = samples
        self.sample_rate_hz = check_number("sample rate", sample_rate_hz, minimum=0, exclusive_minimum=True)
        self.scale_uv = check_number("scale", scale_uv, minimum=0, exclusive_minimum=True)

    @property
    def n_samples(self):
        return self.samples.shape[0]

    @property
    def n_channels(self):
        return self.samples.shape[1]

    def read(self, start, stop):
        """int16 ndarray (stop - start, n_channels)."""
        return self.samples[start:stop]


class RecordingSource:
    """Adapt a recording (neurohand.firmware_bridge.recording.file_format) to a source, lazily.

    Int16 recordings whose channels share one scale are sent as their raw counts.
    Otherwise (float32, or per-channel scales) samples are converted to
    microvolts and requantised with one scale, chosen by one pass over
    [start_sample, n_samples) in blocks so that the largest value fits in int16.
    Reads are served from a cached block of ``block_samples``.
    """

    def __init__(self, recording, start_sample=0, block_samples=4096):
        self.recording = recording
        self.sample_rate_hz = float(recording.signal_rate)
        self.n_samples = int(recording.n_samples)
        self.n_channels = int(recording.n_channels)
        self._block_samples = block_samples
        self._channel_scale = np.broadcast_to(np.asarray(recording.scale_uv, dtype=np.float64),
                                              (self.n_channels,))
        uniform = bool(np.all(self._channel_scale == self._channel_scale[0]))
        self._passthrough = recording.dtype == "int16" and uniform
        if self._passthrough:
            self.scale_uv = float(self._channel_scale[0])
        else:
            self.scale_uv = self._choose_scale(start_sample)
        self._cache_start = 0
        self._cache = np.zeros((0, self.n_channels), np.int16)

    def _choose_scale(self, start_sample):
        peak = 0.0
        for start in range(start_sample, self.n_samples, 65536):
            block = self.recording.read_signals(start, min(start + 65536, self.n_samples))
            if block.size:
                peak = max(peak, float(np.max(np.abs(block * self._channel_scale))))
        if not np.isfinite(peak):
            raise UsageError("recording contains non-finite samples; cannot stream it")
        if peak == 0.0:
            return 1.0
        # float32 on the wire (GET_CONFIG): round the scale up so the peak still fits.
        scale = np.float32(peak / INT16_MAX)
        while peak / float(scale) > INT16_MAX:
            scale = np.nextafter(scale, np.float32(np.inf))
        return float(scale)

    def _convert(self, raw):
        if self._passthrough:
            return np.asarray(raw, dtype=np.int16)
        counts = np.round(raw * (self._channel_scale / self.scale_uv))
        return np.clip(counts, -INT16_MAX - 1, INT16_MAX).astype(np.int16)

    def read(self, start, stop):
        """int16 ndarray (stop - start, n_channels), ADC counts of ``scale_uv``."""
        cache_stop = self._cache_start + self._cache.shape[0]
        if not (self._cache_start <= start and stop <= cache_stop):
            if stop - start > self._block_samples:
                return self._convert(self.recording.read_signals(start, stop))
            self._cache_start = start
            self._cache = self._convert(self.recording.read_signals(
                start, min(start + self._block_samples, self.n_samples)))
        return self._cache[start - self._cache_start:stop - self._cache_start]


# --- pacing ------------------------------------------------------------------
class PacingScheduler:
    """Frame k of a stream is due at ``t0 + k * frame_period_s`` on ``clock``.

    Due times are computed from the absolute start, never by adding periods, so
    sleep overshoot and a loaded machine delay frames but never change the rate.
    ``t0`` may lie in the future (``start(at=...)``): nothing is due before it.
    """

    def __init__(self, frame_period_s, clock=time.monotonic):
        self.frame_period_s = frame_period_s
        self._clock = clock
        self.t0 = None
        self.released = 0

    def start(self, at=None):
        """Frame 0 is due at ``at`` (a time on the clock; default: now)."""
        self.t0 = self._clock() if at is None else at
        self.released = 0

    def take_due(self, now=None):
        """Number of frames due by ``now`` (default: the clock's now) that were not
        taken yet (0 or more)."""
        if now is None:
            now = self._clock()
        # floor, not int(): before t0 the quotient is negative and must not round up to frame 0.
        due = int(math.floor((now - self.t0) / self.frame_period_s)) + 1
        count = due - self.released
        if count <= 0:
            return 0
        self.released = due
        return count

    def seconds_until_next(self):
        return self.t0 + self.released * self.frame_period_s - self._clock()


# --- fault injection ---------------------------------------------------------
#: What the injector did, and what a receiver that saw every byte (and flushed
#: at the end) should therefore count.  ``expected_frames_missing`` only
#: includes losses followed by an intact frame, as a receiver cannot see others.
FAULT_COUNTERS = ("frames_in", "frames_dropped", "frames_corrupted", "garbage_bursts", "garbage_bytes",
                  "expected_resyncs", "expected_bytes_discarded", "expected_frames_missing")


class FaultInjector:
    """Seeded faults applied to encoded frames, one frame at a time.

    drop_rate, corrupt_rate: probability per frame.  garbage_probability:
    probability per frame of a burst of 1..garbage_max_bytes random bytes
    before the frame, never containing ``sync`` (the byte string a receiver
    resynchronises on, or a tuple of them), so a burst never forges a frame
    start and every fault stays countable.  Corruption XORs one byte after
    the ``header_size``-byte envelope header with a non-zero value, so the
    receiver sees a plausible frame whose CRC fails.  The defaults are the
    chip's envelope (docs/chip-protocol.md); a glove passes its own.
    """

    def __init__(self, drop_rate=0.0, corrupt_rate=0.0, garbage_probability=0.0, garbage_max_bytes=64, seed=None,
                 sync=cp.SYNC, header_size=cp.HEADER_SIZE):
        self.drop_rate = check_number("drop rate", drop_rate, minimum=0, maximum=1)
        self.corrupt_rate = check_number("corrupt rate", corrupt_rate, minimum=0, maximum=1)
        self.garbage_probability = check_number("garbage probability", garbage_probability, minimum=0, maximum=1)
        self.garbage_max_bytes = check_int("garbage max bytes", garbage_max_bytes, minimum=1, maximum=65536)
        self.sync = (sync,) if isinstance(sync, bytes) else tuple(sync)
        if not self.sync or not all(isinstance(s, bytes) and s for s in self.sync):
            raise UsageError("sync must be a non-empty byte string or a tuple of them, got {!r}".format(sync))
        self.header_size = check_int("header size", header_size, minimum=0)
        self.seed = seed        # kept so a replay can rebuild the same injector in a device process
        self._random = random.Random(seed)
        self.counters = new_counters(FAULT_COUNTERS)
        self._pending_missing = 0       # frames lost since the last intact one
        self._in_bad_run = False        # inside a run of bytes the receiver will discard

    @property
    def active(self):
        return bool(self.drop_rate or self.corrupt_rate or self.garbage_probability)

    def apply(self, frame, protected=False):
        """Return the bytes to send for ``frame`` (possibly empty); a ``protected``
        frame (the first of a stream) is never dropped or corrupted."""
        rnd = self._random
        c = self.counters
        c["frames_in"] += 1
        out = b""
        if self.garbage_probability and rnd.random() < self.garbage_probability:
            out = self._garbage(rnd.randint(1, self.garbage_max_bytes))
            c["garbage_bursts"] += 1
            c["garbage_bytes"] += len(out)
            self._bad_bytes(len(out))
        if not protected and self.drop_rate and rnd.random() < self.drop_rate:
            c["frames_dropped"] += 1
            self._pending_missing += 1
            return out
        if not protected and self.corrupt_rate and rnd.random() < self.corrupt_rate:
            damaged = bytearray(frame)
            damaged[rnd.randrange(self.header_size, len(frame))] ^= rnd.randint(1, 255)
            c["frames_corrupted"] += 1
            self._pending_missing += 1
            self._bad_bytes(len(damaged))
            return out + bytes(damaged)
        self.intact_frame_passed()
        c["expected_frames_missing"] += self._pending_missing
        self._pending_missing = 0
        return out + frame

    def intact_frame_passed(self):
        """An intact frame reached the wire (from :meth:`apply`, or one the device sends
        past the faults, such as a glove's hello): a receiver resynchronises on it, so
        a run of discarded bytes ends there."""
        self._in_bad_run = False

    def stream_restarted(self):
        """A new stream starts (its first frame resets the receiver's sequence)."""
        self._pending_missing = 0

    def _bad_bytes(self, count):
        c = self.counters
        if not self._in_bad_run:
            self._in_bad_run = True
            c["expected_resyncs"] += 1
        c["expected_bytes_discarded"] += count

    def _garbage(self, length):
        while True:
            data = bytes(self._random.getrandbits(8) for _ in range(length))
            if not any(s in data for s in self.sync):
                return data


# --- the chip ----------------------------------------------------------------
CHIP_COUNTERS = ("frames_sent", "samples_sent", "frames_overflowed", "frames_lost_unplugged",
                 "frames_before_start", "commands", "naks", "disconnects", "loops")


class VirtualChip(PtyDevice):
    """A chip on a pseudo-terminal, streaming ``source``.

    source: ArraySource, RecordingSource or anything with n_samples, n_channels,
    sample_rate_hz, scale_uv and read(start, stop) -> int16 (n, n_channels).
    speed: playback speed factor (frames are due every S / (rate * speed) s).
    loop: restart at ``start_sample`` at the end instead of stopping.
    autostart: stream from the first moment instead of waiting for START.
    faults: a FaultInjector or None.  disconnect_after_s: close the pty once after
    this many seconds, reopen a new one after ``reconnect_pause_s`` (the symlink
    ``link_path`` follows; only a stale link to a vanished terminal is replaced,
    anything else there is refused with UsageError, and only our own link is
    removed: see virtual/port_link.py).  on_port(path) is called with each new
    slave path.
    reset_on_unplug: the unplug powers the chip down, as a bus-powered chip:
    after the replug it waits for START again (unless ``autostart``), and the
    new stream starts at sequence 0 with STREAM_START.  The recording goes on
    in real time meanwhile (the nerve does not pause), so the samples due while
    unplugged or waiting for START are skipped (``frames_lost_unplugged``).
    False: a self-powered chip that keeps streaming across the unplug (its
    sequence numbers go on, so the host can count what it missed).
    clock: the chip's time, in seconds (``time.monotonic`` unless injected); the
    pacing, ``disconnect_after_s``, ``reconnect_pause_s`` and the drain at the end
    all read it, never the wall clock.
    start_at: a time on ``clock`` (for ``time.monotonic``, the same in every
    process of the machine) at which the stream's first sample is due, so that a
    chip and a virtual glove given the same time play one recording together.
    Frames due before the stream starts (before START) are skipped, as the
    nerve's signal does not wait (``frames_before_start``).  None: the stream's
    own start (START, or the open with ``autostart``).

    ``bytes_written``: bytes written to the terminal so far (replies and frames),
    so that a host can tell when it has read everything.  ``stream_started_at``:
    when the first frame of the latest stream was due (its pacing's t0, on
    ``clock``), None before a stream started.

    The constructor only stores configuration; :meth:`open` creates the pty and
    :meth:`serve` runs the loop (in the caller's thread).
    """

    def __init__(self, source, samples_per_frame=cp.DEFAULT_SAMPLES_PER_FRAME, speed=1.0, loop=False,
                 start_sample=0, autostart=False, faults=None, disconnect_after_s=None, reconnect_pause_s=1.0,
                 link_path=None, on_port=None, clock=time.monotonic, firmware=(0, 0, 0), reset_on_unplug=True,
                 start_at=None):
        PtyDevice.__init__(self, link_path)
        if source.n_channels > cp.MAX_CHANNELS:
            raise UsageError("the chip carries at most {} channels, the recording has {}".format(
                cp.MAX_CHANNELS, source.n_channels))
        self.source = source
        self.samples_per_frame = check_int("samples per frame", samples_per_frame, 1, cp.MAX_SAMPLES_PER_FRAME)
        self.speed = check_number("speed", speed, minimum=0, exclusive_minimum=True)
        self.loop = loop
        self.start_sample = check_int("start sample", start_sample, 0, max(0, source.n_samples - 1))
        self.autostart = autostart
        self.faults = faults
        self.disconnect_after_s = disconnect_after_s
        self.reconnect_pause_s = reconnect_pause_s
        self.start_at = None if start_at is None else check_number("start at", start_at)
        self.on_port = on_port
        self.firmware = firmware
        self.reset_on_unplug = bool(reset_on_unplug)
        self._clock = clock
        self.counters = new_counters(CHIP_COUNTERS)
        self.n_channels = source.n_channels
        self.streaming = False
        self.finished = False
        self._position = self.start_sample
        self._sequence = 0
        self._stream_samples = 0
        self._scheduler = None
        self.stream_started_at = None
        self._commands = ChipParser()
        self._connected_at = None
        self._replug_at = None
        self._unplugged_once = False
        self._powered_down = False      # reset by an unplug: the signal goes on, nothing is streamed

    # -- pty ------------------------------------------------------------------
    def open(self):
        """Create the pseudo-terminal (and symlink); return the slave path."""
        self._open_pty()
        self._connected_at = self._clock()
        self._commands = ChipParser()
        if self.autostart and not self.streaming and not self.finished:
            self._begin_stream()
        if self.on_port is not None:
            self.on_port(self.slave_path)
        return self.slave_path

    def close(self):
        self._close_pty()

    # -- streaming -------------------------------------------------------------
    @property
    def frame_period_s(self):
        return self.samples_per_frame / (self.source.sample_rate_hz * self.speed)

    def _begin_stream(self):
        """START (or autostart): a new stream, or the first one after a reset by an unplug."""
        if self._powered_down:
            self._restart_stream()
        else:
            self._start_stream()

    def _restart_stream(self):
        # Same pacing (the recording went on in real time while the chip was off);
        # a fresh stream on the wire.
        self._powered_down = False
        self.streaming = True
        self._sequence = 0
        self._stream_samples = 0
        if self.faults is not None:
            self.faults.stream_restarted()

    def _skip_due_frames(self):
        """Powered down: the samples due now pass unseen (as a nerve's signal does)."""
        for _ in range(self._scheduler.take_due()):
            if self._read_frame_samples() is None:
                self.finished = True
                return
            self.counters["frames_lost_unplugged"] += 1

    def _start_stream(self):
        self.streaming = True
        self._sequence = 0
        self._stream_samples = 0
        self._scheduler = PacingScheduler(self.frame_period_s, self._clock)
        self._scheduler.start(at=self.start_at)
        self.stream_started_at = self._scheduler.t0
        if self.faults is not None:
            self.faults.stream_restarted()
        if self.start_at is not None:
            # Started after start_at: the samples due meanwhile passed unseen.
            for _ in range(self._scheduler.take_due()):
                if self._read_frame_samples() is None:
                    self.streaming = False
                    self.finished = True
                    return
                self.counters["frames_before_start"] += 1

    def _read_frame_samples(self):
        spf, end = self.samples_per_frame, self.source.n_samples
        if self._position + spf <= end:
            samples = self.source.read(self._position, self._position + spf)
            self._position += spf
        elif self.loop:
            head = self.source.read(self._position, end)
            rest = spf - head.shape[0]
            samples = np.concatenate([head, self.source.read(self.start_sample, self.start_sample + rest)])
            self._position = self.start_sample + rest
            self.counters["loops"] += 1
        else:
            return None     # a trailing partial frame is not sent
        return samples[:, :self.n_channels]

    def _emit_frame(self):
        samples = self._read_frame_samples()
        if samples is None:
            self.streaming = False
            self.finished = True
            return
        rate = self.source.sample_rate_hz
        device_time_us = int(round(self._stream_samples * 1e6 / rate))
        first = self._sequence == 0
        frame = cp.encode_data_frame(self._sequence, device_time_us, samples,
                                     cp.FLAG_STREAM_START if first else 0)
        self._sequence = (self._sequence + 1) % cp.SEQUENCE_MODULUS
        self._stream_samples += samples.shape[0]
        if not self.connected:
            self.counters["frames_lost_unplugged"] += 1
            return
        data = frame if self.faults is None else self.faults.apply(frame, protected=first)
        if len(self._out) + len(data) > OUTPUT_LIMIT_BYTES:
            self.counters["frames_overflowed"] += 1
            return
        self._out += data
        self.counters["frames_sent"] += 1
        self.counters["samples_sent"] += samples.shape[0]

    # -- commands --------------------------------------------------------------
    def handle_command(self, command):
        """Carry out one ChipCommand; return the reply frame (bytes)."""
        self.counters["commands"] += 1
        code, token = command.command, command.token
        if code == cp.CMD_START:
            if not self.streaming and not self.finished:
                self._begin_stream()
            return cp.encode_ack(code, token)
        if code == cp.CMD_STOP:
            self.streaming = False
            return cp.encode_ack(code, token)
        if code == cp.CMD_CONFIGURE:
            args = cp.decode_configure_args(command.args)
            if args is None:
                return self._nak(code, token, cp.STATUS_BAD_ARGUMENT)
            if self.streaming:
                return self._nak(code, token, cp.STATUS_BUSY)
            n_channels, spf, rate = args
            if not (1 <= n_channels <= self.source.n_channels and 1 <= spf <= cp.MAX_SAMPLES_PER_FRAME
                    and rate == int(round(self.source.sample_rate_hz))):
                return self._nak(code, token, cp.STATUS_BAD_ARGUMENT)
            self.n_channels, self.samples_per_frame = n_channels, spf
            return cp.encode_ack(code, token)
        if code == cp.CMD_GET_IDENTITY:
            identity = cp.ChipIdentity(CHIP_ID, cp.MAX_CHANNELS, MAX_SAMPLE_RATE_HZ, MODEL)
            return cp.encode_ack(code, token, cp.encode_identity(identity))
        if code == cp.CMD_GET_VERSION:
            version = cp.FirmwareVersion(self.firmware[0], self.firmware[1], self.firmware[2], cp.PROTOCOL_VERSION)
            return cp.encode_ack(code, token, cp.encode_version(version))
        if code == cp.CMD_GET_CONFIG:
            config = cp.ChipConfig(self.n_channels, self.samples_per_frame, int(round(self.source.sample_rate_hz)),
                                   self.streaming, self.source.scale_uv)
            return cp.encode_ack(code, token, cp.encode_config(config))
        return self._nak(code, token, cp.STATUS_UNKNOWN_COMMAND)

    def _nak(self, code, token, status):
        self.counters["naks"] += 1
        return cp.encode_nak(code, token, status)

    # -- the loop --------------------------------------------------------------
    def serve(self, stop_event, drain_timeout_s=2.0):
        """Run until ``stop_event`` is set, or the source ended (without loop)
        and the host read everything (or ``drain_timeout_s`` passed): closing a
        pty discards what its reader has not read yet."""
        if not self.connected and self._replug_at is None:
            self.open()
        drain = DrainWatch(drain_timeout_s)
        while not stop_event.is_set():
            now = self._clock()
            self._maybe_unplug_or_replug(now)
            if self.streaming:
                for _ in range(self._scheduler.take_due()):
                    self._emit_frame()
                    if not self.streaming:
                        break
            elif self._powered_down and not self.finished:
                self._skip_due_frames()
            if self.finished and drain.over(now, not self._host_has_everything()):
                return
            timeout = 0.05
            if self.streaming or (self._powered_down and not self.finished):
                timeout = min(timeout, max(0.0, self._scheduler.seconds_until_next()))
            if not self.connected:
                if self._replug_at is not None:
                    timeout = min(timeout, max(0.0, self._replug_at - now))
                stop_event.wait(timeout)
                continue
            self._exchange(timeout, self._handle_host_bytes)

    def _maybe_unplug_or_replug(self, now):
        if self._replug_at is not None and now >= self._replug_at:
            if self.streaming:
                # Frames due before the replug died with the link, even when this loop
                # looks late (a loaded machine): what is lost depends on the clock only.
                for _ in range(self._scheduler.take_due(self._replug_at)):
                    self._emit_frame()
                    if not self.streaming:
                        break
            self._replug_at = None
            self.open()
        elif (self.connected and self.disconnect_after_s is not None and not self._unplugged_once
              and now - self._connected_at >= self.disconnect_after_s):
            self._unplugged_once = True
            self.counters["disconnects"] += 1
            if self.reset_on_unplug and self.streaming:
                self.streaming = False
                self._powered_down = True
                self._commands = ChipParser()
            self._unplug_pty()
            self._replug_at = now + self.reconnect_pause_s

    def _handle_host_bytes(self, data):
        for event in self._commands.feed(data):
            if isinstance(event, ChipCommand):
                self._out += self.handle_command(event)

    def summary(self):
        """Counters of the chip and of injected faults, and when the stream started, as one dict."""
        result = {"chip": dict(self.counters), "stream_started_at": self.stream_started_at}
        if self.faults is not None:
            result["faults"] = dict(self.faults.counters)
        return result

