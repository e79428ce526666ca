"""``neurohand run``, ``replay`` and ``demo`` (see neurohand.deploy.cli.main).

Standard library only at module level; the handlers import the runtime
(numpy, no torch) and, for ``demo`` only, the workstation's trainer.
"""
import argparse
import json
import sys

from neurohand.decoder.backend_registry import BACKEND_CHOICES
from neurohand.deploy.cli.virtual_chip import add_fault_arguments


def register(subparsers):
    """Add ``run``, ``replay`` and ``demo`` to the ``neurohand`` parser."""
    _add_run_parser(subparsers)
    _add_replay_parser(subparsers)
    _add_demo_parser(subparsers)


def _add_run_parser(subparsers):
    """``neurohand run``: the device's real-time loop (handler :func:`_run`)."""
    from neurohand.deploy.runtime.options import add_runtime_arguments

    parser = subparsers.add_parser(
        "run", help="decode the chip and drive the hand in real time (the device's main command)",
        description="Decode nerve signals from the neural-interface chip and drive the prosthetic hand, until "
                    "SIGINT/SIGTERM (or --duration). Loads and verifies BUNDLE, refuses to start unless "
                    "'neurohand selftest' passed on this device with the chosen backend, reads the chip's "
                    "configuration (channels, rate and its microvolts-per-count scale, which the decoder uses) and "
                    "refuses a chip configured differently from the bundle. The hand is held open until the "
                    "decoder has produced a few good windows, and goes to its safe posture on any fault and "
                    "on exit. See docs/runtime.md.",
        epilog="Example: neurohand run --bundle /opt/neurohand/bundles/current --chip /dev/neurohand-chip "
               "--hand psyonic:/dev/neurohand-hand --stats-json /var/lib/neurohand/stats.json")
    parser.add_argument("--bundle", required=True, metavar="BUNDLE", help="bundle directory ('neurohand bundle')")
    parser.add_argument("--chip", required=True, metavar="PORT",
                        help="serial port of the chip (device path or pseudo-terminal; pyserial URLs such as socket:// "
                             "are refused, docs/chip-protocol.md); or another signal source (the 'lab' extra, "
                             "docs/lab-streams.md): lsl:NAME or lsl:type=TYPE (a Lab Streaming Layer stream), "
                             "brainflow:BOARD[:PORT] (a BrainFlow board, e.g. brainflow:synthetic, "
                             "brainflow:cyton:/dev/ttyUSB0, brainflow:playback:FILE)")
    parser.add_argument("--hand", required=True, metavar="SPEC",
                        help="hand to drive: psyonic:PORT (PSYONIC Ability Hand), neurohand:PORT (neurohand "
                             "protocol), keys:MAPFILE (key presses bound to finger thresholds or to the movement classes of "
                             "a class head: docs/hand-protocol.md) or none (decode only)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="inference backend (default auto: TensorRT, then numpy, then ONNX Runtime); it must "
                             "have passed 'neurohand selftest' here")
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="stop after this many seconds, at most 1e6 (bench use; default: run until stopped)")
    parser.add_argument("--skip-selftest-check", action="store_true",
                        help="start even if the bundle has not passed its self-test on this device "
                             "(bench use only: never with a hand on a patient)")
    _add_lsl_arguments(parser)
    add_runtime_arguments(parser)
    parser.set_defaults(func=_run)


def _add_replay_parser(subparsers):
    """``neurohand replay``: a recording through the decoder, scored (handler :func:`_replay`)."""
    from neurohand.deploy.runtime.options import add_runtime_arguments

    parser = subparsers.add_parser(
        "replay", help="replay a recording through the decoder and score it against its labels",
        description="Decode RECORDING with BUNDLE and score the hand commands against the recording's labels "
                    "(R2 per output, scaled as in training, so comparable with 'neurohand evaluate'). "
                    "--fast (default) decodes on this machine as fast as the CPU allows, with no ports (the features are "
                    "computed in a second process where two CPUs are usable, see --jobs). --realtime streams the "
                    "recording through a virtual chip on a pseudo-terminal at its true rate, runs exactly the "
                    "loop of 'neurohand run' and drives a virtual hand on another pseudo-terminal; it also "
                    "reports latency and link counters. The first second (or until the runtime is ready) is "
                    "not scored. See docs/replay.md.",
        epilog="Example: neurohand replay my-bundle held-out.nhr --realtime --seconds 30 --json")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory ('neurohand bundle')")
    parser.add_argument("recording", metavar="RECORDING", help="recording with the bundle's channels and labels")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="mode", action="store_const", const="fast",
                      help="decode with no ports, as fast as possible (default; see --jobs)")
    mode.add_argument("--realtime", dest="mode", action="store_const", const="realtime",
                      help="stream through a virtual chip and a virtual hand on pseudo-terminals at the true rate")
    parser.set_defaults(mode="fast")
    parser.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="replay this much of the recording, 2 s or more (default: all of it; in real time "
                             "at most 600 s, and the last 0.5 s are kept in reserve)")
    parser.add_argument("--start", type=float, default=0.0, metavar="S",
                        help="start this many seconds into the recording (default 0)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="inference backend (default auto: TensorRT, then numpy, then ONNX Runtime)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (mean_r2, r2, lag_ms, latency_us, frames, safety_events, skips, "
                             "and classes where the bundle has a class head and the recording movement events)")
    parser.add_argument("--confusion-png", metavar="PATH",
                        help="with a bundle whose model has a movement-class head and a recording with movement "
                             "events: draw the confusion matrix of the decided classes to FILE (needs matplotlib, "
                             "i.e. a workstation)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="--fast only: 2 = a second process reads the recording and computes the features "
                             "one block ahead while this one decodes (the same numbers, about 1.2-1.4x faster "
                             "on 2 cores); 1 = everything in this process (default: 2 where two CPUs are usable "
                             "and processes can fork, as on Linux)")
    parser.add_argument("--devices", choices=("process", "thread"), default=None,
                        help="--realtime only: where the virtual chip and hand run: 'process' (default: each in a "
                             "process of its own, as hardware; the figure to quote for latency) or 'thread' "
                             "(threads of the decoding process, competing with it for the interpreter lock)")
    faults = parser.add_argument_group("faults injected by the virtual chip (--realtime only)")
    add_fault_arguments(faults)
    faults.add_argument("--disconnect-after", type=float, default=None, metavar="S",
                        help="unplug the virtual chip once after this many seconds, for 1 s")
    faults.add_argument("--seed", type=int, default=None, metavar="K",
                        help="random seed of the injected faults (default: different each time)")
    _add_lsl_arguments(parser, "--realtime only: ")
    add_runtime_arguments(parser)
    parser.set_defaults(func=_replay)


def _add_lsl_arguments(parser, prefix=""):
    """--lsl-outlet and --lsl-signals (the 'lab' extra; docs/lab-streams.md)."""
    group = parser.add_argument_group("Lab Streaming Layer (the 'lab' extra; docs/lab-streams.md)")
    group.add_argument("--lsl-outlet", metavar="NAME",
                       help=prefix + "publish the finger positions sent to the hand as the LSL stream NAME (type "
                                     "Control, one channel per finger, 0 = open .. 1 = flexed), stamped on LSL's "
                                     "clock with the arrival of their data; opens network sockets (off by default)")
    group.add_argument("--lsl-signals", action="store_true",
                       help=prefix + "with --lsl-outlet: also publish every decoded signal sample, in microvolts, "
                                     "as the stream NAME-signals (type ENG)")


def _add_demo_parser(subparsers):
    """``neurohand demo``: the whole pipeline on simulated data (handler :func:`_demo`)."""
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on simulated data: simulate, collect, train, bundle, self-test, replay",
        description="Run the whole pipeline on a fresh machine in a few minutes, with no hardware: simulate a "
                    "nerve recording with finger labels and a second, held-out one; collect a few seconds of the "
                    "first through a virtual chip and a virtual glove with 'neurohand collect' (collected.nh and "
                    "its quality report); train a decoder on the "
                    "first; bundle and self-test it; replay the held-out recording in real time through a "
                    "virtual chip and a virtual hand on pseudo-terminals; score what the hand received. Prints "
                    "a summary table and writes a report folder: summary.json, decoded.png (decoded against "
                    "true finger trajectories), latency.png (latency histogram), the training report and the "
                    "files of every stage. Needs the workstation install (torch).",
        epilog="Example: neurohand demo --out demo-output")
    parser.add_argument("--out", default="demo-output", metavar="DIR",
                        help="report folder (default ./demo-output); an earlier demo's folder there is replaced only "
                             "when the new demo succeeds (kept if it fails or is interrupted); any other "
                             "non-empty folder, a file or a symlink is refused")
    parser.add_argument("--seed", type=int, default=1, metavar="K",
                        help="seed of the simulated session (default 1); the held-out recording is its continuation, "
                             "later in time, not another seed")
    parser.add_argument("--difficulty", default="realistic", metavar="PRESET",
                        help="simulator preset (docs/simulator.md): realistic (default; decoding as hard as "
                             "published nerve implants) or easy (the clean signal of simulator version 1)")
    parser.add_argument("--max-minutes", type=float, default=2.0, metavar="MIN",
                        help="training time budget in minutes (default 2)")
    parser.add_argument("--backend", default="numpy", choices=BACKEND_CHOICES,
                        help="inference backend for the self-test and the replay (default numpy, the reference "
                             "that runs everywhere; auto = TensorRT, then numpy, then ONNX Runtime)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the baselines of 'neurohand evaluate' (Wiener and Kalman filters, movement-class LDA)")
    # Smaller settings for tests and slow machines; not part of the documented interface.
    parser.add_argument("--train-seconds", type=float, default=150.0, help=argparse.SUPPRESS)
    parser.add_argument("--heldout-seconds", type=float, default=40.0, help=argparse.SUPPRESS)
    parser.add_argument("--replay-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--channels", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=10000.0, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=_demo)


def _run(args):
    # First of all: a SIGTERM (systemd stop) while the bundle loads or the ports open must not kill
    # the process half-way; it is noted and ends the command cleanly (docs/safety.md).
    from neurohand.deploy.runtime.signals import StopSignals, StoppedDuringStartup

    with StopSignals() as signals:
        try:
            return _run_command(args, signals)
        except StoppedDuringStartup as stopped:
            print("neurohand run: stopped by {} during start-up; nothing was sent to the hand".format(
                stopped.reason), file=sys.stderr)
            return 0


def backend_for_run(bundle_path, requested, skip_selftest_check=False):
    """The backend ``run`` drives the hand with: ``auto`` means the first available backend that passed
    the self-test on this device for this bundle (not merely the first available one)."""
    if requested != "auto" or skip_selftest_check:
        return requested
    from neurohand.deploy.bundle import load_bundle
    from neurohand.deploy.selftest import selftested_backend
    return selftested_backend(load_bundle(bundle_path))


def _run_command(args, signals):
    from neurohand.deploy.runtime.options import config_from_args
    from neurohand.deploy.selftest import require_passed_selftest
    from neurohand.deploy.session import check_hand_classes, load_decoder, run_on_chip
    from neurohand.firmware_bridge.chip.session import check_chip_spec, source_kind
    from neurohand.firmware_bridge.shared.checks import check_number
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.hands import parse_hand_spec
    from neurohand.firmware_bridge.link import check_port

    duration = None if args.duration is None else check_number("--duration", args.duration, minimum=0.0,
                                                                exclusive_minimum=True, maximum=MAX_DURATION_S)
    # Refused here, before the bundle loads: the device path promises no network (docs/chip-protocol.md);
    # a source of the lab's tools must be spelt right (docs/lab-streams.md).
    check_chip_spec("--chip", args.chip)
    source = source_kind(args.chip)
    if source is not None and args.record is not None:
        raise UsageError("--record writes the chip's int16 counts; the samples of {} (microvolts) are not recorded "
                         "here: record the stream with LabRecorder, or the board with BrainFlow".format(args.chip))
    _check_lsl_options(args)
    hand_name, hand_target = parse_hand_spec(args.hand)
    if hand_name in ("psyonic", "neurohand"):
        check_port("--hand", hand_target)
    config = config_from_args(args)
    _check_outputs(args, [args.bundle])
    signals.raise_if_stopped()
    decoder = load_decoder(args.bundle, backend_for_run(args.bundle, args.backend, args.skip_selftest_check))
    try:
        signals.raise_if_stopped()
        if args.skip_selftest_check:
            print("neurohand run: WARNING: --skip-selftest-check: the {} backend has NOT been proven on this "
                  "device against the bundle's golden vectors. Never use this with a hand on a patient."
                  .format(decoder.backend.name), file=sys.stderr)
        else:
            require_passed_selftest(decoder.bundle, decoder.backend.name)
        config.check_classes(decoder.class_names)
        check_hand_classes(decoder, args.hand)
        outlets = _open_outlets(args, decoder)
    except BaseException:
        decoder.close()
        raise
    def announce(chip_config):
        if not args.quiet:
            if source is None:
                signal = "chip {} ({} channels, {} Hz, {:.6g} uV per count)".format(
                    args.chip, chip_config.n_channels, chip_config.sample_rate_hz, chip_config.scale_uv)
            else:
                signal = "{} ({} channels, {:g} Hz, microvolts)".format(
                    args.chip, chip_config.n_channels, chip_config.sample_rate_hz)
            print("neurohand run: bundle {} (backend {}) <- {} -> hand {}{}".format(
                args.bundle, decoder.backend.name, signal, args.hand,
                "" if outlets is None else "; LSL outlet {!r}".format(outlets.name)), file=sys.stderr)

    try:
        document = run_on_chip(decoder, args.chip, args.hand, config, record_path=args.record,
                               stats_path=args.stats_json, duration_s=duration, quiet=args.quiet, announce=announce,
                               signals=signals, outlets=outlets)
    finally:
        _close_outlets(outlets)
    if not args.quiet:
        latency = document["latency_us"]
        print("neurohand run: stopped ({}); {} commands sent, latency p50 {} us p99 {} us, {} safety events, "
              "{} frames missing".format(document["stop_reason"], document["commands_sent"],
                                        _us(latency.get("p50")), _us(latency.get("p99")),
                                        document["safety_events"]["count"], document["frames"]["missing"]),
              file=sys.stderr)
        classes = document.get("classes")
        if classes is not None:
            print("neurohand run: commands per decided movement class: {}".format(", ".join(
                "{} {}".format(name, count) for name, count in sorted(classes["counts"].items(),
                                                                     key=lambda item: -item[1]))),
                  file=sys.stderr)
    return 0


#: Longest --duration of ``run`` and --seconds / --start of ``replay`` (about 11.6 days):
#: beyond it a number is a typo, and far beyond it arithmetic on it overflows.
MAX_DURATION_S = 1e6


def _check_outputs(args, inputs):
    """--record and --stats-json: writable, never an input nor each other, replaced only with --force."""
    import os
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path

    checked = []
    for name, path in (("--record", args.record), ("--stats-json", args.stats_json)):
        if path is not None:
            checked.append((name, check_output_path(name, path, inputs=inputs, force=args.force)))
    if len(checked) == 2 and checked[0][1] != os.devnull and \
            os.path.realpath(checked[0][1]) == os.path.realpath(checked[1][1]):
        raise UsageError("--record and --stats-json are the same file {!r}; give each its own".format(
            args.record))


def _us(value):
    return "n/a" if value is None else "{:.0f}".format(value)


def _check_lsl_options(args):
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.streams.lsl_outlet import check_stream_name
    if args.lsl_outlet is not None:
        check_stream_name("--lsl-outlet", args.lsl_outlet)
    elif args.lsl_signals:
        raise UsageError("--lsl-signals publishes beside the positions: give --lsl-outlet NAME too")


def _open_outlets(args, decoder):
    """The opened LslOutlets of --lsl-outlet (None without it), named after the decoder's outputs and channels."""
    if args.lsl_outlet is None:
        return None
    from neurohand.firmware_bridge.streams.lsl_outlet import LslOutlets
    pipeline = decoder.pipeline
    return LslOutlets(args.lsl_outlet, decoder.label_names, float(pipeline.signal_rate) / pipeline.stride_samples,
                      channel_names=decoder.channel_names, signal_rate_hz=pipeline.signal_rate,
                      signals=args.lsl_signals).open()


def _close_outlets(outlets):
    """The command opened the outlets, so it closes them, after the run (None: nothing)."""
    if outlets is not None:
        outlets.close()


def _replay(args):
    from neurohand.deploy import replay
    from neurohand.deploy.runtime.options import config_from_args
    from neurohand.deploy.session import load_decoder
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.recording.file_format import open_recording

    faults, disconnect_after = _fault_options(args)
    if args.mode == "fast" and (faults is not None or disconnect_after is not None):
        raise UsageError("--drop-rate, --corrupt-rate, --garbage-bursts and --disconnect-after act on the virtual "
                         "chip: use them with --realtime")
    jobs = None
    if args.jobs is not None:
        if args.mode != "fast":
            raise UsageError("--jobs sets how --fast computes; --realtime runs as 'neurohand run' does")
        jobs = checks.check_int("--jobs", args.jobs, minimum=1, maximum=2)
        from neurohand.deploy.runtime.feature_worker import fork_available
        if jobs == 2 and not fork_available():
            raise UsageError("--jobs 2 needs processes that fork (Linux), which this system has not; use --jobs 1")
    if args.mode == "fast" and args.devices is not None:
        raise UsageError("--devices places the virtual chip and hand of --realtime: use it with --realtime")
    if args.mode == "fast" and (args.lsl_outlet is not None or args.lsl_signals):
        raise UsageError("--lsl-outlet and --lsl-signals publish in real time: use them with --realtime")
    _check_lsl_options(args)
    config = config_from_args(args)
    checks.check_file_exists("RECORDING", args.recording)
    _check_outputs(args, [args.bundle, args.recording])
    if args.confusion_png is not None:
        from neurohand.firmware_bridge.shared.outputs import check_output_path
        check_output_path("--confusion-png", args.confusion_png, inputs=[args.bundle, args.recording],
                          force=args.force)
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:     # a workstation library: said before the replay
            raise UsageError("--confusion-png needs matplotlib, which this system does not have (the "
                             "numbers are in --json: classes.confusion)")
    with open_recording(args.recording) as recording:
        replay_range = replay.ReplayRange(recording, args.start, args.seconds, args.mode)
        if faults is not None:
            faults = faults(recording)
        decoder = load_decoder(args.bundle, args.backend)
        if args.mode == "fast":
            outcome = replay.replay_fast(decoder, recording, replay_range, config, record_path=args.record,
                                         stats_path=args.stats_json, jobs=jobs)
        else:
            try:
                outlets = _open_outlets(args, decoder)
            except BaseException:
                decoder.close()
                raise
            try:
                outcome = replay.replay_realtime(decoder, recording, replay_range, config, faults=faults,
                                                 disconnect_after_s=disconnect_after, record_path=args.record,
                                                 stats_path=args.stats_json, quiet=args.quiet,
                                                 devices=args.devices or "process", outlets=outlets)
            finally:
                _close_outlets(outlets)
    if args.confusion_png is not None:
        _write_confusion_png(args.confusion_png, outcome.summary)
    if args.json:
        print(json.dumps(outcome.summary, sort_keys=True, allow_nan=False))
    else:
        print(replay.format_summary(outcome.summary))
    return 0


def _write_confusion_png(path, summary):
    """The confusion matrix of ``summary["classes"]`` as a PNG (UsageError where there is none)."""
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.train.classes import plot_confusion

    classes = summary.get("classes")
    if classes is None:
        raise UsageError("--confusion-png: nothing to draw: the bundle's model has no movement-class head, or the "
                         "recording has no movement events")
    plot_confusion(path, classes["confusion"], classes["class_names"],
                   title="replay {}: balanced accuracy {}".format(
                       summary["mode"], "n/a" if classes["balanced_accuracy"] is None
                       else "{:.3f}".format(classes["balanced_accuracy"])))


def _fault_options(args):
    """(factory(recording) -> FaultInjector, or None when no fault is asked; disconnect_after_s or None)."""
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import UsageError

    drop = checks.check_number("--drop-rate", args.drop_rate, minimum=0, maximum=1)
    corrupt = checks.check_number("--corrupt-rate", args.corrupt_rate, minimum=0, maximum=1)
    bursts = checks.check_number("--garbage-bursts", args.garbage_bursts, minimum=0)
    disconnect_after = None
    if args.disconnect_after is not None:
        disconnect_after = checks.check_number("--disconnect-after", args.disconnect_after, minimum=0,
                                               maximum=MAX_DURATION_S)
    if not (drop or corrupt or bursts):
        return None, disconnect_after

    def make(recording):
        from neurohand.firmware_bridge.chip import protocol as chip_protocol
        from neurohand.firmware_bridge.virtual.chip import FaultInjector
        frames_per_s = float(recording.signal_rate) / chip_protocol.DEFAULT_SAMPLES_PER_FRAME
        if bursts > frames_per_s:
            raise UsageError("--garbage-bursts {:g}/s is more than one burst per frame ({:g} frames/s)".format(
                bursts, frames_per_s))
        return FaultInjector(drop, corrupt, bursts / frames_per_s, seed=args.seed)

    return make, disconnect_after


def _demo(args):
    from neurohand.deploy import demo
    return demo.demo_command(args)
