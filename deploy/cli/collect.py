"""``neurohand collect``: record a labelled training session from the chip and a data glove, with cues.

Standard library only at module level (see neurohand.deploy.cli.main); the
handler imports the collection code (numpy, no torch) and, for the quality
PNG only, matplotlib where it is installed.
"""
import argparse
import os
import sys

DESCRIPTION = """\
Record a training session of a patient: nerve signals from the chip, finger labels
from a data glove on the intact hand (mirrored bilateral movements), with cues on a
terminal or a local web page. Needs no trained decoder.

  1. calibration: open hand, fist, each finger alone (the protocol's poses), fitted
     into 0 (open) .. 1 (flexed) per finger; shown, and stored in the recording;
  2. trials: each movement of the protocol, repeated, in an order drawn from its
     seed: hold the target posture, then rest;
  3. the end: a quality report (per-channel noise, saturation, mains; the glove's
     range per finger; what was lost; trials done), as text and as a PNG where
     matplotlib is installed.

The recording (SESSION.nh, the crash-safe format that 'neurohand train' reads as it
is): the chip's raw signals; label streams "glove" (0..1 per finger) and
"glove_raw" (the glove's sensors), and "decoded" with --decode; events
"repetition" and "movement" (what train's leakage-free split uses), "trial",
"trial_done", "cue" (what was shown when), "missing", "glove_gap"; the protocol and
the calibration in its metadata. The chip's sample counter is the clock: glove
samples are placed on it from their arrival times. A kill -9 loses under 0.1 s;
Ctrl-C (or SIGTERM) ends the session cleanly; --continue PREVIOUS.nh records the
trials PREVIOUS did not complete into a new file (train takes both).

Exit status: 0 done (or stopped and saved), 1 the session is unusable (one line
says why; the file is kept), 2 a mistake or a device that stopped (what was
recorded is saved). See docs/collect.md.
"""

EXAMPLES = """\
examples:
  neurohand collect --chip /dev/neurohand-chip --glove cyberglove:/dev/ttyUSB0 --out p1-day1.nh
  neurohand collect --chip /dev/neurohand-chip --glove serial:/dev/ttyACM0 --out s.nh --protocol ninapro-e1 \\
      --display web              # then browse http://127.0.0.1:8765/ (ssh -L 8765:127.0.0.1:8765 jetson)
  neurohand collect --chip /dev/neurohand-chip --glove serial:/dev/ttyACM0 --out s2.nh --continue s.nh
  neurohand collect --chip /dev/neurohand-chip --glove serial:/dev/ttyACM0 --out r.nh --decode /opt/neurohand/current
  neurohand collect --chip /dev/neurohand-chip --glove lsl:type=Glove --out l.nh --lsl-outlet collect-p1
"""


def register(subparsers):
    """Add ``collect`` to the ``neurohand`` parser."""
    from neurohand.decoder.backend_registry import BACKEND_CHOICES

    parser = subparsers.add_parser(
        "collect", help="record a labelled training session from the chip and a data glove, with cues",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chip", required=True, metavar="PORT",
                        help="serial port of the chip (a device path or pseudo-terminal)")
    parser.add_argument("--glove", required=True, metavar="SPEC",
                        help="the data glove: cyberglove:PORT (CyberGlove II/III), serial:PORT (neurohand glove "
                             "protocol), virtual:PORT ('neurohand virtual-glove') or lsl:NAME / lsl:type=TYPE (a "
                             "glove or hand tracker publishing LSL; needs pylsl)")
    parser.add_argument("--out", required=True, metavar="SESSION.nh",
                        help="recording to write; an existing file needs --force (it is replaced when the recording "
                             "starts, after the calibration). The quality report goes next to it: "
                             "SESSION.quality.txt and SESSION.quality.png")
    parser.add_argument("--protocol", default=None, metavar="NAME|FILE",
                        help="built-in protocol 'paper' (default: five single fingers, pinch, tripod, fist) or "
                             "'ninapro-e1' (NinaPro DB1 exercise 1), or a protocol JSON file (docs/collect.md)")
    parser.add_argument("--display", default="terminal", choices=("terminal", "web", "none"),
                        help="terminal (default: full screen on a terminal, one line per cue otherwise), web (a "
                             "page on 127.0.0.1, see --web-port) or none")
    parser.add_argument("--web-port", type=int, default=8765, metavar="N",
                        help="port of the web page on 127.0.0.1 (default 8765; 0 = any free port)")
    parser.add_argument("--continue", dest="previous", default=None, metavar="PREVIOUS.nh",
                        help="continue the protocol of an interrupted session: the trials PREVIOUS (and the files "
                             "it continued) completed are skipped; its calibration is reused unless --recalibrate")
    parser.add_argument("--recalibrate", action="store_true",
                        help="with --continue: calibrate the glove again (it was taken off, or another glove)")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="use this glove calibration instead of calibrating: a recording made by collect (its "
                             "calibration) or a JSON file of one (docs/collect.md)")
    parser.add_argument("--decode", default=None, metavar="BUNDLE",
                        help="also run this decoder bundle on the chip's signals; its output is shown next to the "
                             "glove and recorded as the label stream 'decoded' (recalibration sessions)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="with --decode: inference backend (default auto)")
    parser.add_argument("--subject", default=None, metavar="ID",
                        help="subject identifier stored in the recording's metadata")
    parser.add_argument("--label-rate", type=float, default=100.0, metavar="HZ",
                        help="rows per second of the glove label streams (default 100)")
    parser.add_argument("--no-picture", action="store_true",
                        help="write the quality report as text only, without the PNG (matplotlib's start-up takes "
                             "seconds on a small machine)")
    parser.add_argument("--lsl-outlet", default=None, metavar="NAME",
                        help="also publish the calibrated finger positions over Lab Streaming Layer as stream NAME "
                             "and the cues as string markers on NAME-cues, for LabRecorder (needs pylsl; "
                             "docs/lab-streams.md)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --out and quality report")
    parser.set_defaults(func=run_collect)


def report_paths(out):
    """The quality report's text and PNG paths beside ``out``."""
    base = os.path.splitext(out)[0] if os.path.splitext(out)[1] else out
    return base + ".quality.txt", base + ".quality.png"


def run_collect(args):
    from neurohand.deploy.runtime.signals import StopSignals, StoppedDuringStartup

    with StopSignals() as signals:
        try:
            return _collect(args, signals)
        except StoppedDuringStartup as stopped:
            print("neurohand collect: stopped by {} during start-up; nothing was recorded".format(stopped.reason),
                  file=sys.stderr)
            return 0


def _collect(args, signals):
    from neurohand.deploy.collect.protocol import BUILTINS, load_protocol
    from neurohand.deploy.collect.session import CollectSession, Settings, previous_session
    from neurohand.firmware_bridge.chip.session import source_kind
    from neurohand.firmware_bridge.gloves.registry import parse_glove_spec
    from neurohand.firmware_bridge.link import check_port
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path

    if source_kind(args.chip) is not None:
        raise UsageError("--chip {!r}: collect records a chip's int16 counts; the microvolt samples of a lab "
                         "source cannot be recorded here".format(args.chip))
    check_port("--chip", args.chip)
    parse_glove_spec(args.glove)
    if args.lsl_outlet is not None:
        from neurohand.firmware_bridge.streams.lsl_outlet import check_stream_name
        check_stream_name("--lsl-outlet", args.lsl_outlet)
    label_rate = checks.check_number("--label-rate", args.label_rate, minimum=1.0, maximum=1000.0)
    port = checks.check_int("--web-port", args.web_port, minimum=0, maximum=65535)
    if args.recalibrate and args.previous is None:
        raise UsageError("--recalibrate goes with --continue (a new session always calibrates)")
    if args.recalibrate and args.calibration is not None:
        raise UsageError("--recalibrate calibrates anew; --calibration uses a stored calibration: give one")
    inputs = []
    calibration = None
    if args.calibration is not None:
        calibration = load_calibration(args.calibration)
        inputs.append(args.calibration)
    previous = None
    if args.previous is not None:
        checks.check_file_exists("--continue", args.previous)
        inputs.append(args.previous)
        previous = previous_session(args.previous)
        protocol = previous["protocol"]
        if args.protocol is not None:
            given = load_protocol(args.protocol)
            if given.to_config() != protocol.to_config():
                raise UsageError("--continue goes on with the protocol of {!r} ({!r}); leave out --protocol "
                                 "{!r}".format(args.previous, protocol.name, args.protocol))
        if previous["label_rate"] is not None and abs(previous["label_rate"] - label_rate) > 1e-9:
            raise UsageError("--label-rate {:g} differs from the {:g} Hz of {!r}; a continued session keeps "
                             "it".format(label_rate, previous["label_rate"], args.previous))
    else:
        protocol = load_protocol(args.protocol or "paper")
        if args.protocol is not None and args.protocol not in BUILTINS:
            inputs.append(args.protocol)
    if args.decode is not None:
        checks.check_dir_exists("--decode", args.decode)
        inputs.append(args.decode)
    out = check_output_path("--out", args.out, inputs=inputs, force=args.force)
    text_path, png_path = report_paths(args.out)
    for name, path in (("the quality report", text_path), ("the quality picture", png_path)):
        check_output_path(name, path, inputs=inputs + [args.out], force=args.force)
    signals.raise_if_stopped()

    decoder = None
    if args.decode is not None:
        from neurohand.deploy.session import load_decoder
        decoder = load_decoder(args.decode, args.backend)
    displays = []
    try:
        displays = _displays(args.display, port)
        settings = Settings(args.chip, args.glove, out, protocol, label_rate=label_rate, force=args.force,
                            previous=previous, recalibrate=args.recalibrate, subject=args.subject, decoder=decoder,
                            displays=displays, calibration=calibration, lsl_outlet=args.lsl_outlet)
        outcome = CollectSession(settings).run(signals)
    finally:
        for display in displays:
            display.close()
        if decoder is not None:
            decoder.close()
    return _report(args, outcome, text_path, png_path)


def load_calibration(path):
    """The glove calibration (a ``GloveCalibration.to_config()`` dict) in ``path``: a recording made by
    collect, or a JSON file holding one (alone, or as ``glove_calibration``).  UsageError otherwise."""
    from neurohand.firmware_bridge.gloves.calibration import GloveCalibration
    from neurohand.firmware_bridge.recording.file_format import MAGIC, open_recording
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError

    checks.check_file_exists("--calibration", path)
    with open(path, "rb") as handle:
        head = handle.read(len(MAGIC))
    if head == MAGIC:
        with open_recording(path) as recording:
            config = recording.metadata.get("glove_calibration") if isinstance(recording.metadata, dict) else None
        if config is None:
            raise UsageError("--calibration {!r} is a recording without a glove calibration".format(path))
    else:
        document = checks.load_json_file(path, "glove calibration", error=UsageError)
        config = document.get("glove_calibration", document)
    try:
        GloveCalibration.from_config(config)
    except NeurohandError as exc:
        raise UsageError("--calibration {!r}: {}".format(path, exc)) from None
    return config


def _displays(kind, port):
    if kind == "terminal":
        from neurohand.deploy.collect.display_terminal import TerminalDisplay
        return [TerminalDisplay()]
    if kind == "web":
        from neurohand.deploy.collect.display_web import WebDisplay
        web = WebDisplay(port).start()
        print("neurohand collect: the cues are at {} (from another machine: ssh -L {}:127.0.0.1:{} THIS-HOST)".format(
            web.url, web.port, web.port), file=sys.stderr, flush=True)
        return [web]
    return []


def _report(args, outcome, text_path, png_path):
    from neurohand.deploy.collect import quality
    from neurohand.firmware_bridge.shared.atomic import write_atomic

    if outcome.path is None:
        print("neurohand collect: stopped ({}) before the recording started; nothing was recorded".format(
            outcome.stop_reason), file=sys.stderr)
        if outcome.error is not None:
            raise outcome.error
        return 0
    done = len(outcome.done_before) + len(outcome.trials_done)
    print("neurohand collect: {}: {:.1f} s, {} trials in this file, {} of {} in the protocol ({})".format(
        outcome.path, outcome.samples / float(outcome.signal_rate), len(outcome.trials_done), done,
        outcome.trials_total, "complete" if outcome.stop_reason == "complete" else "stopped: {}".format(
            outcome.stop_reason)), file=sys.stderr)
    report = quality.analyse(outcome.path, outcome.counters, outcome.trials_total, outcome.done_before)
    text = quality.format_text(report)
    sys.stdout.write(text)
    sys.stdout.flush()
    write_atomic(text_path, text)
    if not args.no_picture:
        try:
            write_quality_png(report, png_path)
        except ImportError:
            print("neurohand collect: no quality picture: matplotlib is not installed (the text report is "
                  "{})".format(text_path), file=sys.stderr)
    if outcome.stop_reason != "complete" and done < outcome.trials_total:
        print("neurohand collect: {} of {} trials left; to record them: neurohand collect --chip {} --glove {} "
              "--continue {} --out NEW.nh".format(outcome.trials_total - done, outcome.trials_total, args.chip,
                                                   args.glove, outcome.path), file=sys.stderr)
    if outcome.error is not None:
        from neurohand.deploy.collect.session import CollectError
        raise CollectError("{}; what was recorded is saved in {}".format(outcome.error, outcome.path))
    if report["unusable"]:
        print("neurohand collect: unusable session: {} (the file {} is kept)".format(report["unusable"],
                                                                                  outcome.path), file=sys.stderr)
        return 1
    return 0


def write_quality_png(report, path):
    """The report's figures as a PNG (matplotlib, Agg), written atomically; ImportError without matplotlib."""
    # The object API, not pyplot: pyplot's import alone takes seconds on a small machine.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from neurohand.firmware_bridge.shared.atomic import atomic_path

    channels = report["channels"]
    names = [c["name"] for c in channels]
    figure = Figure(figsize=(11, 7))
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    axes[0][0].bar(names, [c["noise_uv"] or 0.0 for c in channels],
                   color=["#d62728" if c["flat"] else "#1f77b4" for c in channels])
    axes[0][0].set_title("noise per channel (uV, robust)")
    axes[0][1].bar(names, [100.0 * (c["saturation"] or 0.0) for c in channels], color="#ff7f0e")
    axes[0][1].set_title("saturated samples (%)")
    axes[1][0].bar(names, [100.0 * (c.get("mains_fraction") or 0.0) for c in channels], color="#9467bd")
    axes[1][0].set_title("mains power (% of the channel's power)")
    fingers = report["fingers"]
    axes[1][1].bar(list(fingers), [100.0 * (f["range"] or 0.0) for f in fingers.values()], color="#2ca02c")
    axes[1][1].set_ylim(0, 100)
    axes[1][1].set_title("glove range used per finger (%)")
    if len(names) > 8:
        for axis in (axes[0][0], axes[0][1], axes[1][0]):
            axis.tick_params(axis="x", labelrotation=60)
    figure.suptitle("{} - {:.0f} s, {} trials{}".format(os.path.basename(report["path"]), report["seconds"],
                                                         report["trials_done_here"],
                                                         " - UNUSABLE: " + report["unusable"] if report["unusable"]
                                                         else ""), fontsize=10)
    figure.subplots_adjust(hspace=0.45, wspace=0.25)
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=80)
