"""Settings of the real-time runtime: validated once, loadable from JSON.

A :class:`RuntimeConfig` only stores values (scikit-learn style); nothing
here touches a port or a file except :func:`load_runtime_config`.  Per-finger
settings (smoothing, slew limit, calibration range) accept one number for
every finger or a list with one value per decoder output; they are expanded
to arrays by :meth:`RuntimeConfig.per_finger` once the number of outputs is
known, and a list of the wrong length is refused there.

JSON example (every key optional)::

    {"safe_posture": "open", "data_timeout_ms": 100, "writer_period_ms": 20,
     "recovery_windows": 5, "smoothing": "exponential", "smoothing_tau_ms": [0, 30, 30, 30, 30],
     "max_slew_per_s": 10, "calibration": {"lo": [0.05, 0, 0, 0, 0], "hi": 0.9}}

The settings of the smoothing not chosen (``smoothing_tau_ms`` for
``"one_euro"``, ``one_euro_*`` for ``"exponential"``) must keep their defaults:
set, they would do nothing, which is a mistake to say rather than to ignore.
"""
import numbers

from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import ConfigError, UsageError

#: Allowed safe postures: "open" = every finger at 0, "hold" = last good command.
SAFE_POSTURES = ("open", "hold")
#: Smoothing between calibration and slew limit (postprocess.py): a fixed time constant, or the
#: 1-euro filter, whose cut-off rises with the speed of the input (less lag for the same hold jitter).
SMOOTHING_KINDS = ("exponential", "one_euro")
#: Where a window is decoded (``decode_in``): in the reader thread, or in a decode thread of its own.
DECODE_IN = ("reader", "thread")
#: Settings that belong to one smoothing kind only.
SMOOTHING_SETTINGS = {"exponential": ("smoothing_tau_ms",),
                      "one_euro": ("one_euro_min_cutoff_hz", "one_euro_beta", "one_euro_d_cutoff_hz")}

#: Default values, with their units in the names.
DEFAULTS = {
    # Expected decoding stride; None = whatever the bundle's feature pipeline
    # uses.  Set, it must match the pipeline (checked at start-up).
    "stride_ms": None,
    "safe_posture": "open",
    # No trustworthy decoded command for this long -> safe posture (frames
    # missing, windows dropped for gaps or decoding too slow: docs/safety.md).
    "data_timeout_ms": 100.0,
    # The hand writer wakes at least this often (keep-alive, watchdog); the
    # hand driver's keep-alive period shortens it further when smaller.
    "writer_period_ms": 20.0,
    # Consecutive good windows needed to leave the safe posture.
    "recovery_windows": 5,
    # "exponential" or "one_euro" (SMOOTHING_KINDS).  The 1-euro filter at 4 Hz, beta 30 keeps holds
    # calmer for 0-10 ms of cross-correlation lag on NinaPro DB1 S2E1 and the simulator (docs/latency.md,
    # "Cutting the lag"); exponential smoothing at tau 0 (what this was before) passes positions through.
    "smoothing": "one_euro",
    # Exponential smoothing time constant per finger; 0 = off.
    "smoothing_tau_ms": 0.0,
    # 1-euro filter per finger: cut-off while the input is still, its rise per unit of input speed
    # (Hz per full range per second), and the cut-off of the speed estimate (docs/runtime.md).
    "one_euro_min_cutoff_hz": 4.0,
    "one_euro_beta": 30.0,
    "one_euro_d_cutoff_hz": 1.0,
    # Largest change of a finger position per second (full range = 1); None = off.
    "max_slew_per_s": 10.0,
    # Per-patient range: decoder output lo -> hand 0, hi -> hand 1 (per finger).
    "calibration": {"lo": 0.0, "hi": 1.0},
    # Where a window is decoded: "reader" (the chip link's reader thread parses, decodes and writes the
    # hand command itself: no hand-over between threads on the way) or "thread" (a decode thread between
    # the reader and the writer, queues in between; what it was before issue 18: docs/latency.md).
    "decode_in": "reader",
    # Reader -> decoder queue bound (parser events, decode_in "thread"); beyond it frames are
    # dropped, counted and treated as missing samples.
    "frame_queue_events": 2048,
    # At most this much raw data waits in memory for the recording thread.
    "record_backlog_ms": 100.0,
    # Status line on stderr every this many seconds; 0 = never.
    "status_interval_s": 5.0,
    # A bundle with a movement-class head (runtime/classes.py): the decided class is the most frequent
    # of the last this many windows' classes (1 = each window's own), and a window whose top class has
    # a softmax probability below class_min_confidence decides no class (0 = off).
    "class_vote_windows": 1,
    "class_min_confidence": 0.0,
}

#: Settings of the movement-class head: a bundle without one refuses them when they differ from DEFAULTS.
CLASS_SETTINGS = ("class_vote_windows", "class_min_confidence")


#: Accepted range of every numeric setting, (minimum, maximum), inclusive;
#: checked at start (docs/runtime.md lists them).  Outside them a setting is
#: no longer a choice but a mistake: a timeout that never fires, a writer
#: that spins, a queue that fills the Jetson's memory.
RANGES = {
    "stride_ms": (0.1, 1000.0),
    "data_timeout_ms": (10.0, 1000.0),
    "writer_period_ms": (1.0, 500.0),
    "recovery_windows": (1, 1000),
    "smoothing_tau_ms": (0.0, 10000.0),
    # 0.016 Hz is a time constant of 10 s, the exponential's longest; above ~8 Hz at a 20 ms stride the
    # filter passes everything, and 1000 Hz does at any stride down to 0.2 ms.
    "one_euro_min_cutoff_hz": (0.016, 1000.0),
    # 1000 Hz per unit of speed: the cut-off passes everything at a speed of a thousandth of the range/s.
    "one_euro_beta": (0.0, 1000.0),
    "one_euro_d_cutoff_hz": (0.016, 1000.0),
    "max_slew_per_s": (0.01, 1000.0),
    "calibration": (-1e6, 1e6),
    "frame_queue_events": (16, 65536),
    "record_backlog_ms": (20.0, 10000.0),
    "status_interval_s": (0.0, 86400.0),
    # 100 windows are 2 s at a 20 ms stride: a vote longer than that answers later than the user waits.
    "class_vote_windows": (1, 100),
    "class_min_confidence": (0.0, 1.0),
}
#: Narrowest calibration range |hi - lo|: a narrower one multiplies the
#: decoder's noise by more than a million.
MIN_CALIBRATION_SPAN = 1e-6
#: Shortest status interval other than 0 (off): the main loop wakes every 0.1 s.
MIN_STATUS_INTERVAL_S = 0.1


def describe_range(name):
    """The accepted values of setting ``name`` in a few words (for --help and errors)."""
    low, high = RANGES[name]
    return "{:g} to {:g}".format(low, high)


class RuntimeConfig(object):
    """Validated runtime settings.  Build with ``RuntimeConfig(**overrides)``.

    Raises UsageError (a NeurohandError) naming the setting for any bad
    value, a value outside :data:`RANGES`, or an unknown name.
    """

    def __init__(self, **settings):
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            checks.check_option("runtime setting", unknown[0], sorted(DEFAULTS))
        values = dict(DEFAULTS)
        values.update(settings)
        stride = values["stride_ms"]
        self.stride_ms = None if stride is None else _number("stride_ms", stride)
        self.safe_posture = checks.check_option("safe_posture", values["safe_posture"], SAFE_POSTURES)
        self.data_timeout_ms = _number("data_timeout_ms", values["data_timeout_ms"])
        self.writer_period_ms = _number("writer_period_ms", values["writer_period_ms"])
        if self.writer_period_ms > self.data_timeout_ms:
            # The safe posture follows a timeout within one writer period.
            raise UsageError("writer_period_ms ({:g}) must not exceed data_timeout_ms ({:g})".format(
                self.writer_period_ms, self.data_timeout_ms))
        self.recovery_windows = _integer("recovery_windows", values["recovery_windows"])
        self.smoothing = checks.check_option("smoothing", values["smoothing"], SMOOTHING_KINDS)
        self.smoothing_tau_ms = _scalar_or_list("smoothing_tau_ms", values["smoothing_tau_ms"])
        for name in SMOOTHING_SETTINGS["one_euro"]:
            setattr(self, name, _scalar_or_list(name, values[name]))
        _check_smoothing_settings(self)
        slew = values["max_slew_per_s"]
        self.max_slew_per_s = None if slew is None else _scalar_or_list("max_slew_per_s", slew)
        self.calibration = _check_calibration(values["calibration"])
        lo, hi = self.calibration["lo"], self.calibration["hi"]
        if not isinstance(lo, list) and not isinstance(hi, list):
            _check_span(0, lo, hi)   # refused now; per-finger lists once the outputs are known
        self.decode_in = checks.check_option("decode_in", values["decode_in"], DECODE_IN)
        self.frame_queue_events = _integer("frame_queue_events", values["frame_queue_events"])
        self.record_backlog_ms = _number("record_backlog_ms", values["record_backlog_ms"])
        self.status_interval_s = _number("status_interval_s", values["status_interval_s"])
        if 0.0 < self.status_interval_s < MIN_STATUS_INTERVAL_S:
            raise UsageError("status_interval_s must be 0 (off) or at least {:g}, but got {!r}".format(
                MIN_STATUS_INTERVAL_S, self.status_interval_s))
        self.class_vote_windows = _integer("class_vote_windows", values["class_vote_windows"])
        self.class_min_confidence = _number("class_min_confidence", values["class_min_confidence"])

    def to_dict(self):
        """Plain-JSON form; ``RuntimeConfig(**cfg.to_dict())`` rebuilds it."""
        return {name: getattr(self, name) for name in sorted(DEFAULTS)}

    def per_finger(self, name, n_outputs):
        """Setting ``name`` as a list of ``n_outputs`` floats (None stays None).

        Raises UsageError when a list has the wrong length.
        """
        if name in ("calibration_lo", "calibration_hi"):
            value = self.calibration[name[len("calibration_"):]]
        else:
            value = getattr(self, name)
        if value is None:
            return None
        if isinstance(value, list):
            if len(value) != n_outputs:
                raise UsageError("{} has {} values but the decoder has {} outputs".format(
                    name, len(value), n_outputs))
            return list(value)
        return [value] * n_outputs

    def check_outputs(self, n_outputs):
        """Refuse settings that do not fit a decoder with ``n_outputs`` outputs."""
        lo = self.per_finger("calibration_lo", n_outputs)
        hi = self.per_finger("calibration_hi", n_outputs)
        for index, (low, high) in enumerate(zip(lo, hi)):
            _check_span(index, low, high)
        for name in ("smoothing_tau_ms", "max_slew_per_s") + SMOOTHING_SETTINGS["one_euro"]:
            self.per_finger(name, n_outputs)

    def check_classes(self, class_names):
        """Refuse class settings changed from their defaults for a model without a class head (they would do
        nothing, which is a mistake to say rather than to ignore)."""
        if class_names:
            return
        for name in CLASS_SETTINGS:
            if getattr(self, name) != DEFAULTS[name]:
                raise UsageError("{} applies to a model with a movement-class head, and this bundle's model has "
                                 "none: leave {} out".format(name, name))

    def __repr__(self):
        return "RuntimeConfig({})".format(", ".join(
            "{}={!r}".format(k, v) for k, v in sorted(self.to_dict().items())))


def load_runtime_config(path=None, overrides=None):
    """Read ``path`` (JSON object) if given, apply ``overrides`` (dict), validate.

    Raises ConfigError naming the file for unreadable or invalid content.
    """
    settings = {}
    if path is not None:
        checks.check_file_exists("runtime config", path)
        settings = checks.load_json_file(path, "runtime config", error=ConfigError)
    settings.update(overrides or {})
    try:
        return RuntimeConfig(**settings)
    except UsageError as exc:
        if path is None:
            raise
        raise ConfigError("runtime config {!r}: {}".format(path, exc)) from exc


def _check_smoothing_settings(config):
    """Refuse a setting of the smoothing kind not chosen that differs from its default (it would do nothing)."""
    for kind, names in sorted(SMOOTHING_SETTINGS.items()):
        if kind == config.smoothing:
            continue
        for name in names:
            value = getattr(config, name)
            if any(v != DEFAULTS[name] for v in (value if isinstance(value, list) else [value])):
                raise UsageError("{} applies to smoothing '{}', but smoothing is '{}'{}: set \"smoothing\": "
                                 "\"{}\" to use it, or leave {} out".format(
                                     name, kind, config.smoothing,
                                     " (the default)" if config.smoothing == DEFAULTS["smoothing"] else "",
                                     kind, name))


def _check_span(index, low, high):
    if abs(high - low) < MIN_CALIBRATION_SPAN:
        raise UsageError("calibration of output {}: lo {!r} and hi {!r} are less than {:g} apart; "
                         "the range must not be empty".format(index, low, high, MIN_CALIBRATION_SPAN))


def _integer(name, value):
    low, high = RANGES[name]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) > 10 ** 18:
        # Not its 400 digits in the message: one line stays one line.
        raise UsageError("{} must be between {} and {}, but got an integer of {} digits".format(
            name, low, high, len(str(abs(int(value))))))
    return checks.check_int(name, value, minimum=low, maximum=high)


def _number(name, value, key=None):
    low, high = RANGES[key or name]
    return checks.check_number(name, value, minimum=low, maximum=high)


def _scalar_or_list(name, value, key=None):
    key = key or name
    if isinstance(value, (list, tuple)):
        if not value:
            raise UsageError("{} must be a number or a non-empty list of numbers".format(name))
        return [_number("{}[{}]".format(name, i), v, key) for i, v in enumerate(value)]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _number(name, value, key)
    raise UsageError("{} must be a number or a list of numbers, but got {!r}".format(name, value))


def _check_calibration(value):
    if not isinstance(value, dict):
        raise UsageError("calibration must be an object {{\"lo\": ..., \"hi\": ...}}, but got {!r}".format(
            value))
    unknown = sorted(set(value) - {"lo", "hi"})
    if unknown:
        checks.check_option("calibration key", unknown[0], ["lo", "hi"])
    merged = dict(DEFAULTS["calibration"])
    merged.update(value)
    return {"lo": _scalar_or_list("calibration.lo", merged["lo"], "calibration"),
            "hi": _scalar_or_list("calibration.hi", merged["hi"], "calibration")}
