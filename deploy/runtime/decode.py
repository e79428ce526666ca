"""The decoding stage: chip events in, timestamped hand commands out.

Pure and synchronous: no threads, no ports, no sleeping, and the clock is
injected, so exactly this code runs in all three settings:

* ``neurohand run`` and ``replay --realtime``: the decode thread drains the
  reader's queue and hands each batch to :meth:`DecodeStage.process`;
* ``replay --fast``: events are fed one at a time, in process, with a
  virtual clock, as fast as the CPU allows.

Per batch of events (``SampleFrame`` / ``SampleGap`` from the chip parser):
every frame is scaled to microvolts and pushed through the feature pipeline
(the DSP must see every sample); a gap is pushed as missing samples.  Then,
with ``catch_up="newest"`` (real time), only the newest completed window is
decoded and older windows completed in the same batch are counted as
skipped: when decoding falls behind it jumps to the newest data instead of
adding latency.  With ``catch_up="all"`` (fast replay) every window is
decoded.  Each decoded window is checked (finite outputs), post-processed and
emitted as a :data:`DecodedCommand`.

A model with a movement-class head gives ``n_positions`` finger positions and
then one score per class (onnx_weights.RnnWeights): the positions are
post-processed, the scores go to the :class:`~.classes.ClassDecider`, whose
decision rides on the command (``decided``).  While the supervisor is not
``ok`` the decider starts afresh and no class is decided.
"""
import collections

import numpy as np

from neurohand.firmware_bridge.chip.parser import SampleFrame, SampleGap

CATCH_UP_MODES = ("newest", "all")

DecodedCommand = collections.namedtuple("DecodedCommand", "sample arrival_s decoded_s positions outputs decided")
# Commands built without a class (a model without a class head, tests) decide none.
DecodedCommand.__new__.__defaults__ = (None,)
DecodedCommand.__doc__ = """One window's command for the hand.

sample : int, index (since the run started) one past the window's last sample
arrival_s : float, monotonic time the bytes completing that sample arrived (fast
    replay: on the replay's timeline, for each window of a block)
decoded_s : float, monotonic time the command was ready
positions : ndarray (n_positions,), float64, post-processed hand positions in 0..1
outputs : ndarray (n_outputs,), float32/64, the backend's raw outputs (positions, then class scores)
decided : int or None, index of the decided movement class (runtime/classes.py); None without a
    class head, while the supervisor is not ok, or below the confidence
"""


class DecodeStage(object):
    """DSP, features, one RNN step per window, checks and post-processing.

    Parameters
    ----------
    stream : object
        A feature stream (``FeaturePipeline.stream()``):
        ``push(block_uv (n, n_channels) float) -> (features (k, n_features), ends (k,))``
        and ``push_gap(n_missing)``.
    backend : object
        ``initial_state()`` and ``step(features (n_features,) float32, state) -> (outputs, state)``.
    postprocessor : PostProcessor
    supervisor : SafetySupervisor
    stats : RuntimeStats
        Receives the ``dsp_features``, ``inference`` and ``postprocess`` timings.
    scale_uv : array-like, shape (n_channels,)
        Microvolts per ADC count, per channel.
    sample_rate : float
        Samples per second per channel.
    stride_samples : int
        Samples between windows (the post-processing step for the first window).
    n_features, n_outputs : int
        ``n_outputs`` is the backend's whole output vector.
    clock : callable () -> float seconds
        Time of events (safety decisions): time.perf_counter in real time, a
        virtual clock in fast replay.
    timer : callable () -> float seconds or None
        Clock for stage durations; None = ``clock`` (fast replay passes
        time.perf_counter so durations stay real).
    catch_up : {"newest", "all"}
    recorder : object or None
        ``on_frame(samples_int16)``, ``on_gap(first_sample, n_missing)``,
        ``on_window(sample, outputs, command)``; must not block.
    n_positions : int or None
        Finger positions among the outputs (the first ones); None = all of them.
    decider : ClassDecider or None
        Decides the class from ``outputs[n_positions:]`` (a model with a class head).
    """

    def __init__(self, stream, backend, postprocessor, supervisor, stats, scale_uv, sample_rate,
                 stride_samples, n_features, n_outputs, clock, timer=None, catch_up="newest",
                 recorder=None, n_positions=None, decider=None):
        if catch_up not in CATCH_UP_MODES:
            raise ValueError("catch_up must be one of {}, got {!r}".format(CATCH_UP_MODES, catch_up))
        self._stream = stream
        self._backend = backend
        self._post = postprocessor
        self._supervisor = supervisor
        self._dsp_timer = stats.stages["dsp_features"]
        self._inference_timer = stats.stages["inference"]
        # The recurrent half of the next step, computed once a command is on its way (Backend.prepare;
        # a test double without one does it all in its step).
        self._prepare = getattr(backend, "prepare", None)
        self._prepare_timer = stats.stages["prepare"]
        self._post_timer = stats.stages["postprocess"]
        self._scale = np.asarray(scale_uv, dtype=np.float64).reshape(-1)
        self.n_channels = self._scale.shape[0]
        self.sample_rate = float(sample_rate)
        self._stride_s = int(stride_samples) / self.sample_rate
        self.n_outputs = int(n_outputs)
        self.n_positions = self.n_outputs if n_positions is None else int(n_positions)
        self._decider = decider
        self._recorded_class = None     # the last class written as a "class" event
        if decider is not None and decider.n_classes != self.n_outputs - self.n_positions:
            raise ValueError("{} classes, but {} outputs after the {} positions".format(
                decider.n_classes, self.n_outputs - self.n_positions, self.n_positions))
        self._clock = clock
        self._timer = clock if timer is None else timer
        self._decode_all = catch_up == "all"
        self._recorder = recorder
        # Allocated once: µV block (grown only if a frame is larger than any
        # before) and the features of the newest window not decoded yet.
        self._block = np.zeros((64, self.n_channels), dtype=np.float64)
        self._features = np.zeros(int(n_features), dtype=np.float32)
        self._pending_end = None
        self._pending_arrival = 0.0
        self._last_decoded_end = None
        self._state = backend.initial_state()
        self.samples_seen = 0
        self.counters = {"frames": 0, "gaps": 0, "missing_frames": 0, "missing_samples": 0, "frames_rejected": 0,
                         "windows_decoded": 0, "windows_skipped": 0, "decoder_errors": 0,
                         "non_finite_outputs": 0}

    @property
    def stream_counters(self):
        """The feature stream's own counters (windows dropped for gaps, ...), if it has any."""
        return getattr(self._stream, "counters", {})

    def process(self, items, emit):
        """Process a batch of ``(event, arrival_s)`` pairs in stream order.

        ``emit(command)`` is called with each :data:`DecodedCommand` (at most
        one per batch with ``catch_up="newest"``).  Other event types (chip
        replies) are ignored.
        """
        for event, arrival_s in items:
            if isinstance(event, SampleFrame):
                self._push_frame(event, arrival_s, emit)
            elif isinstance(event, SampleGap):
                self.counters["missing_frames"] += event.missing_frames or 0
                self._push_gap(event.missing_samples)
        if self._pending_end is not None:
            self._decode_pending(emit)

    def _push_frame(self, frame, arrival_s, emit):
        samples = frame.samples
        n = samples.shape[0]
        if samples.ndim != 2 or samples.shape[1] != self.n_channels:
            # A chip configured differently from the bundle: never decode it.
            self.counters["frames_rejected"] += 1
            return
        if n > self._block.shape[0]:
            self._block = np.zeros((n, self.n_channels), dtype=np.float64)
        block = self._block[:n]
        start = self._timer()
        np.multiply(samples, self._scale, out=block)
        try:
            features, ends = self._stream.push(block)
        except Exception as exc:  # a DSP failure must reach the safe posture, not kill the loop
            self._fault("decoder_error", "feature pipeline failed: {!r}".format(exc))
            return
        self._dsp_timer.add(self._timer() - start)
        self.samples_seen += n
        self.counters["frames"] += 1
        self._supervisor.on_valid_data(arrival_s, self.samples_seen)
        if self._recorder is not None:
            self._recorder.on_frame(samples)
        k = len(ends)
        if k == 0:
            return
        if self._decode_all:
            # Fast replay: a block holds many windows, each of which arrived (on
            # the replay's timeline) as many samples before the block's last one
            # as it ends earlier; the watchdog judges every command by it.
            rate = self.sample_rate
            seen = self.samples_seen
            for row in range(k):
                self._set_pending(features[row], ends[row], arrival_s - (seen - int(ends[row])) / rate)
                self._decode_pending(emit)
            return
        if self._pending_end is not None:
            self.counters["windows_skipped"] += 1
        self.counters["windows_skipped"] += k - 1
        self._set_pending(features[k - 1], ends[k - 1], arrival_s)

    def _push_gap(self, n_missing):
        if n_missing <= 0:
            return
        try:
            self._stream.push_gap(n_missing)
        except Exception as exc:
            self._fault("decoder_error", "feature pipeline failed on a gap: {!r}".format(exc))
        if self._recorder is not None:
            self._recorder.on_gap(self.samples_seen, n_missing)
        self.samples_seen += n_missing
        self.counters["gaps"] += 1
        self.counters["missing_samples"] += n_missing

    def _set_pending(self, features_row, end, arrival_s):
        # Copied: the stream may reuse its output buffer on the next push.
        self._features[:] = features_row
        self._pending_end = int(end)
        self._pending_arrival = arrival_s

    def _decode_pending(self, emit):
        end = self._pending_end
        self._pending_end = None
        start = self._timer()
        try:
            outputs, self._state = self._backend.step(self._features, self._state)
        except Exception as exc:  # any backend failure -> safe posture, never a dead loop
            self._fault("decoder_error", "inference failed: {!r}".format(exc))
            return
        inferred = self._timer()
        self._inference_timer.add(inferred - start)
        outputs = np.asarray(outputs).reshape(-1)
        if outputs.shape[0] != self.n_outputs or not np.isfinite(outputs).all():
            self._fault("non_finite_output", "decoder output {!r} at sample {}".format(
                outputs.tolist(), end))
            return
        supervisor = self._supervisor
        # Fast replay decodes a whole block at once but hands each command over at
        # its window's own time (fast.py): that is when it is decided.
        now = self._pending_arrival if self._decode_all else self._clock()
        ok = supervisor.on_good_window(now, self._pending_arrival)
        last = self._last_decoded_end
        # Time since the previous decoded window: a multiple of the stride after
        # skipped windows or a gap, so smoothing and slew stay in real seconds.
        dt_s = (end - last) / self.sample_rate if last is not None and end > last else self._stride_s
        n_positions = self.n_positions
        positions = self._post.process(outputs[:n_positions], dt_s)
        decided = None
        decider = self._decider
        if decider is not None:
            if ok:
                decided = decider.decide(outputs[n_positions:])
            else:
                decider.reset()
        if not ok:
            # Not sending yet: keep the post-processing state at the posture the
            # hand holds, so the first command after recovery moves away from it
            # by at most one slew step.
            self._post.reset(supervisor.safe_posture())
        self._last_decoded_end = end
        decoded = self._timer()
        self._post_timer.add(decoded - inferred)
        self.counters["windows_decoded"] += 1
        command = DecodedCommand(end, self._pending_arrival, now if self._decode_all else self._clock(), positions,
                                 outputs.copy(), decided)
        if self._recorder is not None:
            self._recorder.on_window(end, command.outputs[:n_positions], positions if ok else supervisor.safe_posture())
            if decider is not None and decided != self._recorded_class:
                # The decided class, when it changes (-1: none), at the sample its window ends.
                self._recorder.on_event(end, "class", -1 if decided is None else decided)
                self._recorded_class = decided
        emit(command)
        if self._prepare is not None:
            start = self._timer()
            try:
                self._prepare(self._state)
            except Exception as exc:  # as a failed step: safe posture, clean state
                self._fault("decoder_error", "inference failed: {!r}".format(exc))
                return
            self._prepare_timer.add(self._timer() - start)

    def _fault(self, kind, reason):
        if kind == "decoder_error":
            self.counters["decoder_errors"] += 1
        else:
            self.counters["non_finite_outputs"] += 1
        self._supervisor.on_fault(kind, self._clock(), reason)
        if self._decider is not None:
            self._decider.reset()
        # The recurrent state may hold the NaN or the half-updated values that
        # caused this; decoding restarts from a clean state.
        self._state = self._backend.initial_state()
