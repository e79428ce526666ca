"""Command-line options of the runtime, for ``neurohand run`` and ``replay``.

Standard library only (deploy/cli/main.py builds its parser without numpy), so a
command module can call :func:`add_runtime_arguments` from ``register``.
"""
from neurohand.deploy.runtime.config import (DEFAULTS, SAFE_POSTURES, SMOOTHING_KINDS, describe_range,
                                             load_runtime_config)


def add_runtime_arguments(parser):
    """Add the runtime's options (settings file, overrides, outputs) to an argparse parser."""
    group = parser.add_argument_group("runtime settings (override --runtime-config)")
    group.add_argument("--runtime-config", metavar="FILE",
                       help="JSON file of runtime settings (safe posture, timeouts, smoothing, slew limit, "
                            "per-patient calibration ranges, the class head's class_vote_windows and "
                            "class_min_confidence); see docs/runtime.md for each setting's range")
    group.add_argument("--safe-posture", choices=SAFE_POSTURES,
                       help="what the hand does when decoding cannot be trusted: 'open' = all fingers open, "
                            "'hold' = keep the last good command (default: {})".format(DEFAULTS["safe_posture"]))
    group.add_argument("--data-timeout-ms", type=float, metavar="MS",
                       help="no trustworthy decoded command for this long (chip data missing, windows dropped "
                            "for gaps, decoding too slow) -> safe posture; {} (default: {:g})".format(
                                describe_range("data_timeout_ms"), DEFAULTS["data_timeout_ms"]))
    group.add_argument("--smoothing", choices=SMOOTHING_KINDS,
                       help="smoothing of each finger's command: 'exponential' (a fixed time constant, "
                            "--smoothing-ms) or 'one_euro' (the 1-euro filter: smooths holds, follows movements "
                            "with less lag; its settings in --runtime-config, docs/runtime.md) "
                            "(default: {})".format(DEFAULTS["smoothing"]))
    group.add_argument("--smoothing-ms", type=float, metavar="MS",
                       help="exponential smoothing time constant for every finger, 0 = off (selects exponential "
                            "smoothing unless --smoothing says otherwise); {} (default: {:g})".format(
                                describe_range("smoothing_tau_ms"), DEFAULTS["smoothing_tau_ms"]))
    group.add_argument("--max-slew", type=float, metavar="PER_S",
                       help="largest change of a finger position per second, full range = 1; {} "
                            "(default: {:g})".format(describe_range("max_slew_per_s"), DEFAULTS["max_slew_per_s"]))
    group.add_argument("--status-interval", type=float, metavar="S",
                       help="seconds between status lines on stderr, 0 = none, else 0.1 to 86400 "
                            "(default: {:g})".format(DEFAULTS["status_interval_s"]))
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument("--record", metavar="FILE",
                         help="record the raw chip data, the decoded outputs and events to FILE "
                              "(neurohand recording format; a crash loses at most ~0.1 s)")
    outputs.add_argument("--stats-json", metavar="FILE",
                         help="write latency percentiles, stage timings, frame, skip and safety counts "
                              "as JSON to FILE on exit")
    outputs.add_argument("--quiet", action="store_true",
                         help="no status or safety lines on stderr (the stats JSON still has everything; a "
                              "recording that stops, which loses data, is still said)")
    outputs.add_argument("--force", action="store_true",
                         help="replace existing output files (--record, --stats-json)")
    return parser


def config_from_args(args):
    """The RuntimeConfig of parsed ``args``: the --runtime-config file, then the flags given."""
    overrides = {}
    for flag, key in (("safe_posture", "safe_posture"), ("data_timeout_ms", "data_timeout_ms"),
                      ("smoothing", "smoothing"), ("smoothing_ms", "smoothing_tau_ms"),
                      ("max_slew", "max_slew_per_s"), ("status_interval", "status_interval_s")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if "smoothing_tau_ms" in overrides and "smoothing" not in overrides:
        overrides["smoothing"] = "exponential"      # the flag says what it is
    if getattr(args, "quiet", False):
        overrides["status_interval_s"] = 0.0
    return load_runtime_config(getattr(args, "runtime_config", None), overrides)
