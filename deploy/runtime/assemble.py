"""Wiring the pure stages of one run together, and the run's stats document.

:func:`build_runtime` checks that the model, the feature pipeline, the hand,
the chip's scales and the settings fit together (it refuses to start on
nonsense) and returns the :class:`RuntimeParts`; :mod:`.realtime` runs them
with threads on live links, :mod:`.fast` in one thread at CPU speed.

Outlets (``--lsl-outlet``) are given to :func:`build_runtime`; ``neurohand
run`` and ``replay --realtime`` pass them down through ``run_on_chip`` and
``run_realtime``.
"""

from neurohand.deploy.runtime.classes import ClassDecider
from neurohand.deploy.runtime.decode import DecodeStage
from neurohand.deploy.runtime.postprocess import PostProcessor
from neurohand.deploy.runtime.safety import SafetySupervisor
from neurohand.deploy.runtime.stats import Distribution, RuntimeStats, build_stats_document
from neurohand.deploy.runtime.writer import HandWriterStage
from neurohand.firmware_bridge.shared.atomic import write_json_atomic
from neurohand.firmware_bridge.shared.errors import ConfigError


class RuntimeParts(object):
    """The stage objects of one run, as :func:`build_runtime` wires them.

    Attributes
    ----------
    pipeline : FeaturePipeline;  backend : decoder backend;  hand : hand driver
    config : RuntimeConfig;  stats : RuntimeStats
    supervisor : SafetySupervisor;  postprocessor : PostProcessor
    decode : DecodeStage (chip events -> commands)
    writer : HandWriterStage (commands -> hand)
    recorder : RecordingSink / ThreadedRecorder or None
    writer_period_s : float, longest the writer waits between two steps
    n_outputs : int, the hand's positions (the model's outputs less its class scores)
    sample_rate : float (Hz);  stride_samples : int
    outlets : LslOutlets (bound to this run) or None
    class_names : tuple of str, the model's movement classes (() without a class head)
    """

    def __init__(self, pipeline, backend, hand, config, stats, supervisor, postprocessor, decode, writer,
                 recorder, writer_period_s, n_outputs, sample_rate, stride_samples, outlets=None, class_names=()):
        self.pipeline = pipeline
        self.backend = backend
        self.hand = hand
        self.config = config
        self.stats = stats
        self.supervisor = supervisor
        self.postprocessor = postprocessor
        self.decode = decode
        self.writer = writer
        self.recorder = recorder
        self.writer_period_s = writer_period_s
        self.n_outputs = n_outputs
        self.sample_rate = sample_rate
        self.stride_samples = stride_samples
        self.outlets = outlets
        self.class_names = tuple(class_names)


def build_runtime(pipeline, backend, hand, config, scale_uv, clock, timer=None, catch_up="newest",
                  recorder=None, measure_latency=True, stream=None, outlets=None, sent_classes=None):
    """Check that the pieces fit and build the stage objects.

    Parameters
    ----------
    pipeline : FeaturePipeline (with normalisation)
    backend : decoder backend (``n_features``, ``n_outputs``, ``initial_state``, ``step``; optional
        ``n_positions`` and ``class_names`` of a class head, onnx_weights.RnnWeights)
    hand : hand driver (``n_outputs`` = the model's positions, ``send``, optional ``keepalive_period_s``,
        ``set_class``, ``close``)
    config : RuntimeConfig
    scale_uv : sequence of float, µV per count, one per channel
    clock : callable, time of events (perf_counter, or a VirtualClock in fast replay)
    timer : callable or None, durations (None = clock)
    catch_up : "newest" (real time) or "all" (fast replay)
    recorder : RecordingSink / ThreadedRecorder or None
    stream : the feature stream, or None for ``pipeline.stream()`` (fast replay
        with a feature worker passes its PrefetchedStream)
    outlets : opened LslOutlets or None (nothing published), opened and closed by the caller;
        bound here to ``clock`` and the scales; each publish is timed in the
        ``publish`` (writer thread) and ``publish_signals`` (decode thread) stages
    sent_classes : list or None, given to the HandWriterStage (the class told with every command sent)

    Raises ConfigError when the model, the pipeline, the hand, the scales
    and the settings do not fit together (refuse to start on nonsense).
    """
    n_model_outputs = int(backend.n_outputs)
    # Everything that handles the hand's positions takes n_outputs = the positions only; the class
    # scores after them go to the ClassDecider.
    n_outputs = int(getattr(backend, "n_positions", n_model_outputs))
    class_names = tuple(getattr(backend, "class_names", ()) or ())
    if n_outputs + len(class_names) != n_model_outputs or n_outputs < 1:
        raise ConfigError("the model gives {} outputs, which are not {} positions and {} class scores".format(
            n_model_outputs, n_outputs, len(class_names)))
    if int(backend.n_features) != int(pipeline.n_features):
        raise ConfigError("the model takes {} features but the feature pipeline makes {}".format(
            backend.n_features, pipeline.n_features))
    hand_outputs = getattr(hand, "n_outputs", n_outputs)
    if int(hand_outputs) != n_outputs:
        raise ConfigError("the model has {} finger positions but the hand driver takes {}".format(
            n_outputs, hand_outputs))
    scale = [float(s) for s in scale_uv]
    if len(scale) != pipeline.n_channels or not all(s > 0 and s != float("inf") for s in scale):
        raise ConfigError("scale_uv needs {} finite positive values (one per channel), got {!r}".format(
            pipeline.n_channels, scale_uv))
    rate = float(pipeline.signal_rate)
    if config.stride_ms is not None:
        wanted = int(round(config.stride_ms * rate / 1000.0))
        if wanted != pipeline.stride_samples:
            raise ConfigError("runtime stride_ms {} ({} samples) differs from the bundle's feature pipeline "
                              "stride of {} samples ({:g} ms); build the pipeline with that stride".format(
                                  config.stride_ms, wanted, pipeline.stride_samples,
                                  1000.0 * pipeline.stride_samples / rate))
    stride_ms = 1000.0 * pipeline.stride_samples / rate
    if config.data_timeout_ms < 2 * stride_ms:
        # A window every stride is the normal pace: a timeout shorter than two
        # strides would trip on a window merely late.
        raise ConfigError("data_timeout_ms {:g} is shorter than two decoding strides of the bundle's "
                          "pipeline ({:g} ms each); raise it".format(config.data_timeout_ms, stride_ms))
    config.check_outputs(n_outputs)
    config.check_classes(class_names)
    decider = ClassDecider(class_names, config.class_vote_windows, config.class_min_confidence) \
        if class_names else None
    timer = clock if timer is None else timer
    stats = RuntimeStats()
    supervisor = SafetySupervisor.from_config(config, n_outputs, clock())
    postprocessor = PostProcessor.from_config(config, n_outputs)
    decode = DecodeStage(pipeline.stream() if stream is None else stream, backend, postprocessor, supervisor, stats, scale, rate,
                         pipeline.stride_samples, pipeline.n_features, n_model_outputs, clock, timer=timer,
                         catch_up=catch_up, recorder=recorder, n_positions=n_outputs, decider=decider)
    publish = None
    if outlets is not None:
        outlets.bind(clock, scale, n_outputs)
        publish = outlets.publish_positions
        stats.stages["publish"] = Distribution()
        if outlets.signals:
            stats.stages["publish_signals"] = Distribution()
    writer = HandWriterStage(hand, supervisor, stats, timer, n_outputs, measure_latency=measure_latency,
                             publish=publish, class_names=class_names, sent_classes=sent_classes)
    if recorder is not None:
        supervisor.listeners.append(recorder.on_safety_event)
    period = config.writer_period_ms / 1000.0
    keepalive = getattr(hand, "keepalive_period_s", None)
    if keepalive:
        # Half the hand's limit: a late wake-up must not let the hand time out.
        period = min(period, 0.5 * float(keepalive))
    return RuntimeParts(pipeline=pipeline, backend=backend, hand=hand, config=config, stats=stats,
                        supervisor=supervisor, postprocessor=postprocessor, decode=decode, writer=writer,
                        recorder=recorder, writer_period_s=period, n_outputs=n_outputs,
                        sample_rate=rate, stride_samples=pipeline.stride_samples, outlets=outlets,
                        class_names=class_names)


def run_document(parts, frames, writer_counters, extra, duration_s):
    """The stats document of a run (realtime or fast): timings, counters, safety, ``extra``."""
    recorder = parts.recorder
    more = {"duration_s": None if duration_s is None else round(duration_s, 3),
            "writer_period_s": parts.writer_period_s,
            "stride_ms": 1000.0 * parts.stride_samples / parts.sample_rate,
            "runtime_config": parts.config.to_dict(),
            "feature_stream": dict(getattr(parts.decode, "stream_counters", {}) or {}),
            "hand": dict(getattr(parts.hand, "counters", {}) or {}),
            "recording": recorder.summary() if hasattr(recorder, "summary") else None}
    if parts.outlets is not None:
        more["lsl_outlet"] = parts.outlets.summary()
    classes = parts.writer.class_summary()
    if classes is not None:
        more["classes"] = dict(classes, names=list(parts.class_names))
    more.update(extra)
    return build_stats_document(parts.stats, frames, parts.decode.counters, writer_counters,
                                parts.supervisor.summary(), more)


def write_stats_json(path, document):
    """Write the stats ``document`` to ``path`` atomically (strict JSON: no NaN)."""
    write_json_atomic(path, document)
