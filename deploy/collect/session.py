"""The collection loop of ``neurohand collect``: chip + glove + cues -> one recording.

    session = CollectSession(settings)     # stores settings, opens nothing
    outcome = session.run(signals)         # opens chip and glove, calibrates, cues, records; closes all

Steps (docs/collect.md):

1. Open the chip (:class:`~neurohand.firmware_bridge.chip.session.ChipSession`:
   GET_CONFIG, then START; its link's reader thread feeds a
   :class:`~neurohand.firmware_bridge.chip.receiver.ChipReceiver`, which stamps
   every chunk's arrival on ``time.monotonic()``) and the glove (``open_glove``).
   Both must send data within :data:`FIRST_DATA_TIMEOUT_S`.
2. Calibration: the poses of the protocol are cued; the glove's raw samples
   held in each (after ``settle_s``) fit a ``GloveCalibration``.  Nothing is
   recorded yet: the recording's header holds the calibration, so the file is
   created when it is known (``--continue`` reuses the previous one).
3. Trials: the recording starts (sample 0 = the chip sample at that moment).
   Per tick (:data:`TICK_S`): the chip's frames go to a pending list, the
   glove's samples are placed on the chip's sample axis (:mod:`.timeline`)
   and resampled to label rows; signal is written up to where its label rows
   are known, so the file never holds signal without labels; cues change by
   the chip's sample counter; events go with them; then the writer flushes.
   A ``kill -9`` therefore loses what arrived in the last tick, the glove's
   wait (:data:`GLOVE_WAIT_S`) and one glove period: well under 0.1 s.
4. The end (protocol done, SIGINT/SIGTERM, the glove or the chip stopping):
   the last rows are held to cover every sample written, the file is closed
   (complete), and a stopped device is reported after that, so nothing
   recorded is lost.

Events (sample = the recording's signal sample): ``repetition`` (its number,
where it changes), ``movement`` (id at a move cue, 0 at its rest), ``trial``
and ``trial_done`` (the trial's index in the protocol's order), ``cue`` (what
was shown: movement id, 0 rest, negative calibration poses), ``missing``
(chip samples lost, written as zeros), ``glove_gap`` (label rows held
because the glove was late or silent; value = rows).

Numpy and the standard library only (Python 3.6).
"""
import datetime
import math
import os
import time

import numpy as np

from neurohand.deploy.collect import schedule as sched
from neurohand.deploy.collect.protocol import FINGERS, Protocol
from neurohand.deploy.collect.quality import ChannelMonitor
from neurohand.deploy.collect.timeline import ArrivalClock, LabelResampler, SequenceUnwrapper
from neurohand.firmware_bridge.shared.errors import ConfigError, LinkError, NeurohandError, UsageError

#: The loop's period: chip frames taken, glove samples placed, rows and signal written, file flushed.
TICK_S = 0.025
#: How long a label row waits for the glove sample after it before the last value is held.
GLOVE_WAIT_S = 0.04
#: Label rows per second of the "glove" and "glove_raw" streams (the simulator's glove rate).
DEFAULT_LABEL_RATE = 100.0
#: Longest wait for the first chip frame and the first glove sample.
FIRST_DATA_TIMEOUT_S = 3.0
#: A glove silent this long ends the session (saved) with an error.
GLOVE_STOP_S = 2.0
#: A chip silent this long ends the session (saved) with an error (the link reconnects on its own
#: within this: a USB replug takes a second or two).
CHIP_STOP_S = 5.0
#: Frames and gaps the chip's reader thread may queue for the loop (a few seconds' worth).
FRAME_QUEUE_EVENTS = 4096
#: Recording's writer chunk size; the loop flushes every tick anyway.
WRITER_FLUSH_S = 0.1
COLLECT_VERSION = 1
#: ``--lsl-outlet NAME``: the cue markers' stream is NAME + this.
CUES_SUFFIX = "-cues"


class CollectError(NeurohandError):
    """A session ended by a device fault after what was recorded was saved (exit 2)."""


class Settings(object):
    """What to collect; stores and checks values, opens nothing.

    chip : str, the chip's port;  glove : str, a glove spec (``serial:PORT`` ...)
    out : str, the recording to write (checked by the caller: ``check_output_path``)
    protocol : Protocol;  label_rate : float, Hz
    force : bool, replace an existing ``out``
    previous : dict or None, what ``--continue`` carries (:func:`previous_session`)
    recalibrate : bool, calibrate even where ``previous`` has a calibration
    calibration : dict or None, a stored glove calibration (``GloveCalibration.to_config()``) to use
        instead of calibrating (``--calibration``)
    subject : str or None;  decoder : deploy.session.Decoder or None (``--decode``)
    displays : list of display objects (``show(state)``, ``close()``)
    open_glove : callable(spec) -> GloveSource (the registry's; tests pass a fake)
    clock : callable () -> float, the monotonic clock
    lsl_outlet : str or None, publish the calibrated finger positions over LSL as this stream and the
        cues as string markers on ``NAME-cues`` (``--lsl-outlet``; needs pylsl)
    """

    def __init__(self, chip, glove, out, protocol, label_rate=DEFAULT_LABEL_RATE, force=False, previous=None,
                 recalibrate=False, subject=None, decoder=None, displays=(), open_glove=None,
                 clock=time.monotonic, glove_options=None, calibration=None, lsl_outlet=None):
        self.chip = chip
        self.glove = glove
        self.out = out
        self.protocol = protocol
        self.label_rate = float(label_rate)
        self.force = bool(force)
        self.previous = previous
        self.recalibrate = bool(recalibrate)
        self.subject = subject
        self.decoder = decoder
        self.displays = list(displays)
        self.open_glove = open_glove
        self.clock = clock
        self.glove_options = dict(glove_options or {})
        self.calibration = calibration
        self.lsl_outlet = lsl_outlet


def previous_session(path):
    """What ``--continue PATH`` needs of an interrupted session: its protocol, the trials it
    completed (and those completed before it), its calibration, chip, glove and subject.

    UsageError where PATH is no collect recording, or its protocol is complete."""
    from neurohand.firmware_bridge.recording.file_format import open_recording

    with open_recording(path) as recording:
        meta = recording.metadata
        collect = meta.get("collect") if isinstance(meta, dict) else None
        if not isinstance(collect, dict) or "protocol" not in meta:
            raise UsageError("--continue {!r} is not a recording made by 'neurohand collect'".format(path))
        protocol = Protocol.from_config(meta["protocol"], "the protocol of --continue {!r}".format(path))
        done = set(int(i) for i in collect.get("done_before", [])) | set(sched.done_trials(recording.events))
        info = {"path": os.path.abspath(path), "protocol": protocol, "done": sorted(done),
                "calibration": meta.get("glove_calibration"), "chip": meta.get("chip", {}),
                "glove": meta.get("glove", {}), "subject": meta.get("subject"),
                "label_rate": None, "complete": bool(recording.integrity["complete"])}
        stream = recording.label_streams.get("glove")
        if stream is not None:
            info["label_rate"] = float(stream.rate)
    if len(done) >= protocol.n_trials:
        raise UsageError("--continue {!r}: its protocol {!r} is complete ({} of {} trials); nothing is left to "
                         "record".format(path, protocol.name, len(done), protocol.n_trials))
    return info


class Outcome(object):
    """What a session did: ``path`` (None if nothing was recorded), ``stop_reason``, ``trials_done``
    (indices, this file), ``trials_total`` (protocol), ``done_before``, ``counters``, ``calibration``
    (config dict), ``error`` (a CollectError to raise after reporting, or None), ``samples``."""

    def __init__(self):
        self.path = None
        self.stop_reason = None
        self.trials_done = []
        self.trials_total = 0
        self.done_before = []
        self.counters = {}
        self.calibration = None
        self.error = None
        self.samples = 0
        self.signal_rate = None
        self.alignment = []


class _Chip(object):
    """The chip's frames as session events: the port, the receiver, the queue."""

    def __init__(self, url, clock):
        from neurohand.deploy.runtime.queues import BatchQueue
        from neurohand.deploy.runtime.stats import RuntimeStats
        from neurohand.firmware_bridge.chip.parser import ChipParser
        from neurohand.firmware_bridge.chip.receiver import ChipReceiver
        from neurohand.firmware_bridge.chip.session import ChipSession, chip_scale_uv

        self.url = url
        self.session = ChipSession(url).open()
        config = self.session.chip_config
        self.n_channels = int(config.n_channels)
        self.rate = float(config.sample_rate_hz)
        self.scale = chip_scale_uv(url, config)
        self.samples_per_frame = int(config.samples_per_frame)
        if self.n_channels < 1 or not self.rate > 0:
            self.session.close()
            raise ConfigError("chip at {} reports {} channels at {} Hz; it cannot be recorded".format(
                url, config.n_channels, config.sample_rate_hz))
        self.queue = BatchQueue(FRAME_QUEUE_EVENTS)
        self.receiver = ChipReceiver(ChipParser(), self.queue, RuntimeStats(), clock, sample_rate=self.rate)

    def start(self):
        from neurohand.firmware_bridge.chip.session import check_chip_config

        n, rate, scale = self.n_channels, self.rate, [self.scale] * self.n_channels

        def same_as_at_start(config):
            # After a reconnect: a chip configured otherwise is never recorded into this file.
            check_chip_config(self.url, config, n, rate, scale)

        self.session.start_streaming(self.receiver, same_as_at_start)

    def metadata(self):
        return {"port": self.url, "n_channels": self.n_channels, "sample_rate_hz": self.rate,
                "scale_uv": self.scale, "samples_per_frame": self.samples_per_frame}

    @property
    def counters(self):
        counters = dict(self.receiver.counters)
        counters.update({"parser_" + k: v for k, v in self.receiver.parser.counters.items()})
        counters.update({"link_" + k: v for k, v in self.session.counters.items()})
        return counters

    def close(self):
        self.queue.close()
        self.session.close()


class CollectSession(object):
    """One session; see the module docstring.  :meth:`run` does everything and returns an :class:`Outcome`."""

    def __init__(self, settings):
        self.settings = settings
        self.outcome = Outcome()
        self._chip = None
        self._glove = None
        self._writer = None
        # The timeline: session sample counter (chip samples since START, gaps included).
        self.count = 0
        self._chip_clock = None
        self._glove_clock = None
        self._unwrap = SequenceUnwrapper()
        self._glove_timed = True
        self._last_glove = None          # (position, raw) of the newest placed glove sample
        self._last_chip_arrival = None
        self._pending = []               # [(session start, int16 block or None, n)] not yet written
        self._monitor = None
        self._calibration = None
        self._live_fingers = None
        self._raw_range = None
        self._decoded = None             # newest decoded positions (--decode)
        self._decode_parts = None
        self._decoded_history = []       # [(session sample, positions)] not yet written
        self._decoded_last = None
        self.counters = {"ticks": 0, "glove_samples": 0, "glove_sequence_lost": 0, "glove_restarts": 0,
                         "glove_rows_held": 0, "chip_samples_missing": 0, "chip_gaps": 0, "missing_recorded": 0,
                         "samples_written": 0, "rows_written": 0, "late_ticks": 0}
        self._glove_sink = None          # where placed glove samples go (calibration, then the resampler)
        self._next_tick = None
        self.alignment_log = None        # list of (glove count, sequence, arrival, position) when set (bench)
        self._lsl = None                 # _LslPublisher with --lsl-outlet

    # -- the whole session ------------------------------------------------------
    def run(self, signals=None):
        s = self.settings
        clock = s.clock
        try:
            self._open(signals)
            calibration = self._calibration_config()
            if calibration is None:
                self._calibrate(signals)
            else:
                self._use_calibration(calibration)
            if not self._stopped(signals):
                self._record(signals)
            elif self.outcome.stop_reason is None:
                self.outcome.stop_reason = signals.reason
        finally:
            self._close_all(clock)
        return self.outcome

    def _stopped(self, signals):
        return signals is not None and signals.reason is not None

    # -- opening ---------------------------------------------------------------------
    def _open(self, signals):
        s = self.settings
        if signals is not None:
            signals.raise_if_stopped()
        self._chip = _Chip(s.chip, s.clock)
        self._check_chip_against_previous()
        if s.decoder is not None:
            self._build_decoder()
        if signals is not None:
            signals.raise_if_stopped()
        opener = s.open_glove
        if opener is None:
            from neurohand.firmware_bridge.gloves.registry import open_glove as opener
        self._glove = opener(s.glove, **s.glove_options)
        glove = self._glove
        if not glove.sensor_names:
            raise ConfigError("glove {} reports no sensors".format(s.glove))
        self._glove_rate = float(glove.rate_hz) if glove.rate_hz else 100.0
        self._monitor = ChannelMonitor(self._chip.n_channels, self._chip.rate, self._chip.scale)
        self._chip_clock = ArrivalClock(self._chip.rate)
        self._glove_clock = ArrivalClock(self._glove_rate)
        if s.lsl_outlet is not None:
            self._lsl = _LslPublisher(s.lsl_outlet, self._glove_rate, s.clock).open()
        self._chip.start()
        self._wait_for_first_data(signals)

    def _check_chip_against_previous(self):
        previous = self.settings.previous
        if not previous:
            return
        chip, before = self._chip, previous.get("chip") or {}
        wanted = (before.get("n_channels"), before.get("sample_rate_hz"), before.get("scale_uv"))
        now = (chip.n_channels, chip.rate, chip.scale)
        if None not in wanted and (wanted[0] != now[0] or abs(float(wanted[1]) - now[1]) > 1e-6 * now[1]
                                   or abs(float(wanted[2]) - now[2]) > 1e-6 * abs(now[2])):
            raise ConfigError("chip at {} is configured for {} channels at {:g} Hz, {:g} uV per count; the session "
                              "to continue had {} channels at {:g} Hz, {:g} uV per count".format(
                                  chip.url, now[0], now[1], now[2], wanted[0], float(wanted[1]), float(wanted[2])))

    def _build_decoder(self):
        from neurohand.deploy.runtime.assemble import build_runtime
        from neurohand.deploy.runtime.config import RuntimeConfig
        from neurohand.firmware_bridge.chip.session import check_chip_config
        from neurohand.firmware_bridge.hands.base import NullHand

        decoder, chip = self.settings.decoder, self._chip
        pipeline = decoder.pipeline
        check_chip_config(chip.url, chip.session.chip_config, pipeline.n_channels, pipeline.signal_rate)
        n_positions = int(decoder.backend.n_positions)     # a class head's scores are not fingers
        if n_positions < len(FINGERS):
            raise ConfigError("--decode: the bundle's model has {} positions; the glove labels {} fingers".format(
                n_positions, len(FINGERS)))
        hand = NullHand(n_positions).open()
        self._decode_parts = build_runtime(pipeline, decoder.backend, hand, RuntimeConfig(),
                                           [chip.scale] * chip.n_channels, self.settings.clock)

    def _wait_for_first_data(self, signals):
        s, chip = self.settings, self._chip
        deadline = s.clock() + FIRST_DATA_TIMEOUT_S
        got_glove = False
        while s.clock() < deadline and not (self.count > 0 and got_glove):
            if self._stopped(signals):
                return
            self._take_chip(0.02)
            got_glove = self._take_glove() or got_glove
        if self.count == 0:
            counters = chip.counters
            raise LinkError("chip at {} sent no samples within {:g} s of START ({} bytes read, {} CRC errors)".format(
                chip.url, FIRST_DATA_TIMEOUT_S, counters.get("bytes", 0), counters.get("parser_crc_errors", 0)))
        if not got_glove:
            raise LinkError("glove {} sent no samples within {:g} s{}".format(
                s.glove, FIRST_DATA_TIMEOUT_S, _glove_hint(self._glove)))

    # -- reading the devices ---------------------------------------------------------
    def _take_chip(self, timeout_s):
        """Frames and gaps the reader queued: onto the session axis and the pending list."""
        from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap

        items = []
        self._chip.queue.take_all(items, timeout_s)
        if not items:
            return items
        period = 1.0 / self._chip.rate
        best = None          # the frame of this batch with the least delay: the one envelope point kept
        blocks = []
        for event, arrival in items:
            kind = type(event)
            if kind is SampleFrame:
                samples = event.samples
                if samples.ndim != 2 or samples.shape[1] != self._chip.n_channels:
                    continue    # the restarter refuses such a chip; never record it
                start = self.count
                self.count += samples.shape[0]
                residual = arrival - self.count * period
                if best is None or residual < best[0]:
                    best = (residual, self.count, arrival)
                self._pending.append((start, samples, samples.shape[0]))
                blocks.append(samples)
                self._last_chip_arrival = arrival
            elif kind is SampleGap:
                n = int(event.missing_samples)
                if n > 0:
                    self._pending.append((self.count, None, n))
                    self.count += n
                    self.counters["chip_samples_missing"] += n
                    self.counters["chip_gaps"] += 1
        if best is not None:
            # Only the batch's lowest point can be on the lower envelope: a tenth of the work per tick.
            self._chip_clock.add(best[1], best[2])
        if blocks:
            self._monitor.add(blocks[0] if len(blocks) == 1 else np.concatenate(blocks))
        self._chip_clock.update()
        if self._decode_parts is not None:
            self._decode(items)
        return items

    def _take_glove(self):
        """Place the glove's new samples on the chip's axis; True if there were any."""
        samples = self._glove.read(0.0)
        if not samples:
            return False
        clock = self._glove_clock
        counts = []
        for sample in samples:
            count, lost, restarted = self._unwrap.feed(sample.sequence)
            if sample.sequence is None:
                self._glove_timed = False
            if restarted:
                self.counters["glove_restarts"] += 1
                clock.reset()
            self.counters["glove_sequence_lost"] += lost
            clock.add(count, sample.arrival)
            counts.append(count)
        clock.update()
        self.counters["glove_samples"] += len(samples)
        if not self._chip_clock.ready:
            return True
        for sample, count in zip(samples, counts):
            # With sequence numbers the glove's own clock dates a sample better than its arrival.
            t = clock.time_of(count) if self._glove_timed else sample.arrival
            position = self._chip_clock.count_at(t)
            raw = np.asarray(sample.raw, dtype=np.float64)
            if raw.shape[0] != len(self._glove.sensor_names) or not np.all(np.isfinite(raw)):
                continue
            self._on_glove(position, raw)
            if self._lsl is not None and self._calibration is not None:
                self._lsl.positions(self._live_fingers, sample.arrival)
            if self.alignment_log is not None:
                self.alignment_log.append((count, sample.sequence, sample.arrival, position))
        return True

    def _on_glove(self, position, raw):
        if self._last_glove is not None and position <= self._last_glove[0]:
            position = self._last_glove[0] + 1e-6
        self._last_glove = (position, raw)
        if self._calibration is not None:
            self._live_fingers = self._calibration.apply(raw)[0]
        else:
            self._live_fingers = self._uncalibrated_fingers(raw)
        sink = self._glove_sink
        if sink is not None:
            sink(position, raw)

    def _uncalibrated_fingers(self, raw):
        # Before calibration the display shows each finger's sensors against the range seen so far.
        if self._raw_range is None:
            self._raw_range = [raw.copy(), raw.copy()]
        low, high = self._raw_range
        np.minimum(low, raw, out=low)
        np.maximum(high, raw, out=high)
        span = np.where(high > low, high - low, 1.0)
        unit = (raw - low) / span
        fingers = self._sensor_fingers()
        return np.array([float(np.mean(unit[fingers[f]])) for f in FINGERS])

    def _sensor_fingers(self):
        from neurohand.firmware_bridge.gloves.calibration import default_sensor_fingers
        glove = self._glove
        mapping = getattr(glove, "sensor_fingers", None)
        if mapping is None:
            mapping = default_sensor_fingers(glove.kind, len(glove.sensor_names))
        return mapping

    def _decode(self, items):
        outputs = []
        self._decode_parts.decode.process(items, outputs.append)
        for command in outputs:
            positions = np.asarray(command.positions, dtype=np.float64)[:len(FINGERS)]
            self._decoded = positions
            self._decoded_history.append((int(command.sample), positions))

    def _check_devices(self, now):
        """CollectError once the glove or the chip has been silent too long."""
        glove = self._glove
        silent = getattr(glove, "silent_s", None)
        if silent is not None and silent > GLOVE_STOP_S:
            raise CollectError("glove {} sent nothing for {:.1f} s{}".format(self.settings.glove, silent,
                                                                             _glove_hint(glove)))
        if self._last_chip_arrival is not None and now - self._last_chip_arrival > CHIP_STOP_S:
            raise CollectError("chip at {} sent nothing for {:.1f} s".format(self._chip.url,
                                                                             now - self._last_chip_arrival))

    # -- calibration -----------------------------------------------------------------
    def _calibration_config(self):
        if self.settings.calibration is not None:
            return self.settings.calibration
        previous = self.settings.previous
        if previous and previous.get("calibration") and not self.settings.recalibrate:
            return previous["calibration"]
        return None

    def _use_calibration(self, config):
        from neurohand.firmware_bridge.gloves.calibration import GloveCalibration
        try:
            calibration = GloveCalibration.from_config(config)
        except NeurohandError as exc:
            raise ConfigError("the stored glove calibration cannot be used ({})".format(exc)) from exc
        if calibration.n_sensors != len(self._glove.sensor_names):
            raise ConfigError("glove {} has {} sensors, the stored calibration {}; calibrate this glove "
                              "(--recalibrate with --continue)".format(self.settings.glove,
                                                                       len(self._glove.sensor_names),
                                                                       calibration.n_sensors))
        self._calibration = calibration
        self.outcome.calibration = calibration.to_config()

    def _calibrate(self, signals):
        from neurohand.firmware_bridge.gloves.calibration import GloveCalibration

        s = self.settings
        protocol = s.protocol
        plan = sched.Schedule(sched.calibration_steps(protocol))
        start = self.count
        settle = protocol.calibration["settle_s"]
        held = {pose: [] for pose in protocol.calibration["poses"]}

        def collect(position, raw):
            step, _ = plan.at((position - start) / self._chip.rate)
            if step is not None and step.kind == "calibrate" and (position - start) / self._chip.rate \
                    >= step.start_s + settle:
                held[step.pose].append(raw)

        self._glove_sink = collect
        shown = None
        try:
            while True:
                self._tick_devices(s.clock())
                elapsed = (self.count - start) / self._chip.rate
                index = plan.index_at(elapsed)
                if index != shown and index is not None and self._lsl is not None:
                    self._lsl.cue(plan.steps[index], s.clock())
                shown = index
                if index is None:
                    break
                self._show("calibration", plan, index, elapsed, done=0, total=len(held))
                if self._stopped(signals):
                    self.outcome.stop_reason = signals.reason
                    return
        finally:
            self._glove_sink = None
        poses = {}
        for pose, rows in held.items():
            if not rows:
                raise UsageError("glove calibration: no glove sample arrived while the {!r} pose was held".format(
                    pose))
            poses[pose] = np.array(rows)
        calibration = GloveCalibration.fit(poses, self._sensor_fingers(), sensor_names=self._glove.sensor_names)
        self._calibration = calibration
        self.outcome.calibration = calibration.to_config()

    def _tick_devices(self, now):
        """One tick: wait for its start, then take the chip's frames and the glove's samples.

        Paced by the clock, not by the data: a chip sends a frame every few ms, and
        waking for each would write a chunk per frame."""
        due = self._next_tick
        if due is None or now - due > TICK_S:
            if due is not None:
                self.counters["late_ticks"] += 1
            due = now
        elif due > now:
            time.sleep(due - now)
        self._next_tick = due + TICK_S
        self._take_chip(0.0)
        self._take_glove()
        self.counters["ticks"] += 1
        self._check_devices(self.settings.clock())

    # -- recording -------------------------------------------------------------------
    def _record(self, signals):
        from neurohand.firmware_bridge.recording.file_format import RecordingWriter

        s, chip, outcome = self.settings, self._chip, self.outcome
        previous = s.previous or {}
        done_before = list(previous.get("done", []))
        plan = sched.Schedule(sched.trial_steps(s.protocol, done_before))
        outcome.trials_total = s.protocol.n_trials
        outcome.done_before = done_before
        outcome.signal_rate = chip.rate
        glove = self._glove
        names = [str(n) for n in glove.sensor_names]
        streams = {"glove": {"rate": s.label_rate, "names": list(FINGERS)},
                   "glove_raw": {"rate": s.label_rate, "names": names}}
        if self._decode_parts is not None:
            streams["decoded"] = {"rate": s.label_rate, "names": list(FINGERS)}
        self._s0 = start = self.count
        self._writer = RecordingWriter(
            s.out, chip.rate, ["ch{:02d}".format(i) for i in range(chip.n_channels)], dtype="int16",
            scale_uv=[chip.scale] * chip.n_channels, metadata=self._metadata(plan, done_before),
            label_streams=streams, flush_interval_s=WRITER_FLUSH_S, overwrite=s.force)
        outcome.path = s.out
        writer = self._writer
        samples_per_row = chip.rate / s.label_rate
        resampler = LabelResampler(start, samples_per_row, len(names), GLOVE_WAIT_S * chip.rate)
        if self._last_glove is not None:
            resampler.add(*self._last_glove)
        self._glove_sink = resampler.add
        self._resampler = resampler
        self._written = start
        self._held_rows_seen = 0
        self._repetition = None
        shown = None
        done_here = []
        try:
            while True:
                now = s.clock()
                try:
                    self._tick_devices(now)
                except CollectError as exc:
                    outcome.error = exc
                    outcome.stop_reason = "device"
                    break
                elapsed = (self.count - start) / chip.rate
                index = plan.index_at(elapsed)
                if index != shown:
                    self._step_events(plan, shown, index, done_here)
                    shown = index
                self._write_ready(final=False)
                writer.flush()
                if index is None:
                    outcome.stop_reason = "complete"
                    break
                self._show("trials", plan, index, elapsed, done=len(done_before) + len(done_here),
                           total=s.protocol.n_trials)
                if self._stopped(signals):
                    outcome.stop_reason = signals.reason
                    break
        finally:
            self._glove_sink = None
            self._finish_recording(done_here)

    def _metadata(self, plan, done_before):
        s, chip, glove = self.settings, self._chip, self._glove
        protocol = s.protocol
        meta = {
            "source": "neurohand collect",
            "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "labels": "data-glove finger flexion of the mirrored intact hand, 0 = open .. 1 = flexed "
                      "(glove calibration); glove_raw: the glove's raw sensor values",
            "chip": chip.metadata(),
            "glove": {"spec": s.glove, "kind": getattr(glove, "kind", None), "sensor_names": list(glove.sensor_names),
                      "rate_hz": self._glove_rate},
            "glove_calibration": self._calibration.to_config(),
            "protocol": protocol.to_config(),
            "movements": [{"id": 0, "name": "rest"}] + [{"id": m.id, "name": m.name} for m in protocol.movements],
            "collect": {
                "version": COLLECT_VERSION,
                "trials_total": protocol.n_trials,
                "trials_scheduled": len(plan.trials),
                # Chip samples since START that precede the recording (calibration, start-up).
                "chip_sample_at_start": int(self._s0),
                "done_before": list(done_before),
                "cue_codes": dict({"rest": 0}, **{"calibrate_" + p: c for p, c in sched.POSE_CODES.items()}),
                "alignment": "chip sample counter is the master clock; glove samples placed by the lower "
                             "envelope of their arrivals (docs/collect.md)",
                "glove_wait_s": GLOVE_WAIT_S,
            },
        }
        if self._lsl is not None:
            meta["collect"]["lsl_outlet"] = {"positions": s.lsl_outlet, "cues": s.lsl_outlet + CUES_SUFFIX}
        if s.previous:
            meta["collect"]["continued_from"] = os.path.basename(s.previous["path"])
        subject = s.subject if s.subject is not None else (s.previous or {}).get("subject")
        if subject is not None:
            meta["subject"] = subject
        if s.decoder is not None:
            meta["decoder"] = s.decoder.metadata()
        return meta

    def _event(self, kind, value, session_sample=None):
        """An event at a session sample (default: now, the newest chip sample), on the recording's axis."""
        sample = self.count if session_sample is None else session_sample
        self._writer.add_event(max(0, int(sample) - self._s0), kind, int(value))

    def _step_events(self, plan, old, new, done_here):
        """Events for leaving step ``old`` and showing step ``new`` (indices; None = before / after)."""
        before = plan.steps[old] if old is not None else None
        after = plan.steps[new] if new is not None else None
        if before is not None and before.trial >= 0 and (after is None or after.trial != before.trial):
            self._event("trial_done", before.trial)
            done_here.append(before.trial)
        if self._lsl is not None:
            self._lsl.cue(after, self.settings.clock())
        if after is None:
            return
        self._event("cue", sched.cue_code(after))
        if after.kind == "move":
            self._event("trial", after.trial)
            if after.repetition != self._repetition:
                self._event("repetition", after.repetition)
                self._repetition = after.repetition
            self._event("movement", after.movement)
        elif after.kind == "rest":
            self._event("movement", 0)

    def _write_ready(self, final):
        """Label rows now known, then the signal they cover (every sample has its label row)."""
        writer, resampler = self._writer, self._resampler
        rows, held = resampler.take(self.count, final=final)
        if len(rows):
            first_row = resampler.next_row - len(rows)
            writer.append_labels("glove_raw", rows)
            writer.append_labels("glove", self._calibration.apply(rows))
            if self._decode_parts is not None:
                writer.append_labels("decoded", self._decoded_rows(first_row, len(rows)))
            self.counters["rows_written"] += len(rows)
            if held.any():
                self.counters["glove_rows_held"] += int(held.sum())
                # One event per run of held rows in this batch: sample of its first row, value = rows.
                edges = np.flatnonzero(np.diff(np.concatenate([[0], held.astype(np.int8), [0]])))
                for a, b in zip(edges[::2], edges[1::2]):
                    row = first_row + int(a)
                    self._event("glove_gap", int(b - a), int(math.ceil(resampler.row_position(row))))
        limit = self.count if final else self._s0 + int(math.ceil(
            resampler.next_row * resampler.samples_per_row - 1e-9))
        self._write_signal(min(limit, self.count))

    def _decoded_rows(self, first_row, n):
        """The newest decoded positions at or before each row's sample (NaN before the first window)."""
        resampler = self._resampler
        out = np.full((n, len(FINGERS)), np.nan)
        history = self._decoded_history
        for i in range(n):
            position = resampler.row_position(first_row + i)
            while history and history[0][0] <= position:
                self._decoded_last = history.pop(0)[1]
            if self._decoded_last is not None:
                out[i] = self._decoded_last
        return out

    def _write_signal(self, limit):
        """Write pending chip data of session samples [written, limit); gaps as zeros + ``missing``."""
        writer, pending = self._writer, self._pending
        blocks = []
        while pending and self._written < limit:
            start, samples, n = pending[0]
            stop = start + n
            if stop <= self._written:
                pending.pop(0)
                continue
            a = max(self._written, start)
            b = min(stop, limit)
            if samples is None:
                if blocks:
                    writer.append_signals(np.concatenate(blocks))
                    blocks = []
                self._event("missing", b - a, a)
                self.counters["missing_recorded"] += b - a
                zeros = np.zeros((min(b - a, 65536), self._chip.n_channels), dtype=np.int16)
                left = b - a
                while left > 0:
                    k = min(left, zeros.shape[0])
                    writer.append_signals(zeros[:k])
                    left -= k
            else:
                blocks.append(samples[a - start:b - start])
            self.counters["samples_written"] += b - a
            self._written = b
            if b >= stop:
                pending.pop(0)
        if blocks:
            writer.append_signals(np.concatenate(blocks) if len(blocks) > 1 else blocks[0])

    def _finish_recording(self, done_here):
        outcome, writer = self.outcome, self._writer
        outcome.trials_done = list(done_here)
        if writer is None or writer.closed:
            return
        try:
            self._write_ready(final=True)
        finally:
            writer.close()
        outcome.samples = writer.n_samples

    # -- displays --------------------------------------------------------------------
    def _show(self, phase, plan, index, elapsed, done, total):
        displays = self.settings.displays
        if not displays:
            return
        step, left = plan.at(elapsed)
        following = plan.next_step(index) if index is not None else None
        state = {
            "phase": phase,
            "elapsed_s": round(elapsed, 3),
            "step": None if step is None else {
                "index": index, "kind": step.kind, "label": step.label, "posture": list(step.posture),
                "movement": step.movement, "repetition": step.repetition, "trial": step.trial,
                "left_s": round(left, 3), "duration_s": step.duration_s, "start_s": step.start_s,
                "cue": sched.cue_code(step)},
            "next": None if following is None else {"label": following.label, "kind": following.kind},
            "progress": {"done": done, "total": total, "phase_total_s": round(plan.total_s, 3)},
            "fingers": list(FINGERS),
            "glove": None if self._live_fingers is None else [round(float(v), 3) for v in self._live_fingers],
            "decoded": None if self._decoded is None else [round(float(v), 3) for v in self._decoded],
            "channels": self._monitor.snapshot(),
            "counters": {"chip_samples_missing": self.counters["chip_samples_missing"],
                         "glove_lost": self.counters["glove_sequence_lost"],
                         "glove_rows_held": self.counters["glove_rows_held"]},
            "protocol": self.settings.protocol.name,
        }
        for display in displays:
            display.show(state)

    # -- closing ---------------------------------------------------------------------
    def _close_all(self, clock):
        counters = dict(self.counters)
        for name, thing in (("glove", self._glove), ("chip", self._chip)):
            if thing is None:
                continue
            try:
                counters.update({"{}_{}".format(name, k): v for k, v in dict(thing.counters).items()})
            except Exception:    # counters are a report; closing must still happen
                pass
            try:
                thing.close()
            except NeurohandError:
                pass
        if self._lsl is not None:
            counters.update({"lsl_" + k: v for k, v in self._lsl.counters().items()})
            self._lsl.close()
        if self._decode_parts is not None:
            counters.update({"decode_" + k: v for k, v in self._decode_parts.decode.counters.items()})
        for display in self.settings.displays:
            try:
                display.close()
            except Exception:
                pass
        self.outcome.counters = counters


class _LslPublisher(object):
    """``--lsl-outlet``: the calibrated fingers (lsl_outlet's positions stream, stamped with the glove
    sample's arrival) and the cues (string markers ``KIND:CODE:LABEL``, stamped when shown; ``end`` after
    the last).  A push only queues the sample in liblsl (sent by its own thread): the loop never waits
    on a consumer, and a failing push is counted, never raised."""

    def __init__(self, name, glove_rate, clock):
        from neurohand.firmware_bridge.streams.lsl_outlet import LslOutlets
        self.outlets = LslOutlets(name, FINGERS, glove_rate)
        self.clock = clock
        self.markers = None
        self._counters = {"cues_pushed": 0, "cue_push_errors": 0}

    def open(self):
        outlets = self.outlets.open()
        pylsl = outlets._pylsl
        info = pylsl.StreamInfo(outlets.name + CUES_SUFFIX, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string,
                                outlets.source_id + ":cues")
        info.desc().append_child("channels").append_child("channel").append_child_value("label", "cue")
        self.markers = pylsl.StreamOutlet(info)
        outlets.bind(self.clock, [1.0], len(FINGERS))
        return self

    def positions(self, fingers, arrival_s):
        self.outlets.publish_positions(fingers, arrival_s)

    def cue(self, step, now_s):
        marker = "end" if step is None else "{}:{}:{}".format(step.kind, sched.cue_code(step), step.label)
        try:
            self.markers.push_sample([marker], now_s + self.outlets.offset_s)
            self._counters["cues_pushed"] += 1
        except Exception:  # never the session's problem: counted
            self._counters["cue_push_errors"] += 1

    def counters(self):
        counters = dict(self.outlets.counters)
        counters.update(self._counters)
        return counters

    def close(self):
        self.outlets.close()
        self.markers = None


def _glove_hint(glove):
    """What the glove's counters say about why nothing came (garbage, or the wrong kind)."""
    if glove is None:
        return ""
    try:
        counters = dict(glove.counters)
    except Exception:
        return ""
    bad = counters.get("crc_errors", 0) + counters.get("resyncs", 0)
    if bad:
        return " ({} CRC errors, {} resyncs: garbage on the line, or not a {!r} glove)".format(
            counters.get("crc_errors", 0), counters.get("resyncs", 0), getattr(glove, "kind", "?"))
    return ""
