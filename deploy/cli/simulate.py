"""``neurohand simulate``: write a synthetic nerve recording with finger labels.

Standard library only at module level (see neurohand.deploy.cli.main); the handler
imports numpy and the simulator.
"""
import argparse
import contextlib
import signal
import sys

DESCRIPTION = """\
Write a synthetic intrafascicular peripheral-nerve recording with finger labels,
in the neurohand recording format (the built-in data for the demo and the tests).

What it contains:
  signals  int16 counts at 0.195 uV/count (as Intan RHD2000 chips), one column per
           channel: spikes of finger-tuned nerve fibres (flexor units fire more as
           their finger flexes, extensor units while it opens again; each fibre is
           seen on neighbouring channels with different amplitudes), amplifier noise
           of a few uV rms, mains interference with harmonics, slow baseline drift,
           and occasional motion artefacts, some large enough to clip the ADC.
  labels   stream "fingers" at 100 Hz: data-glove flexion of thumb, index, middle,
           ring, little (0 = open/rest .. 1 = fully flexed).
  events   "repetition" (value = repetition number) and "movement" (value =
           movement id at its start, 0 when it ends).
  metadata the movement protocol, the simulator's version and every setting.

The protocol mirrors clinical bilateral training: each repetition flexes thumb,
index, middle, ring, little alone (ids 1-5), then pinch, tripod and fist (6-8),
with rest between (in an order drawn per repetition with --difficulty realistic),
ramps and holds of varying speed and strength.  The same options and seed give a
byte-identical file.  See docs/simulator.md.

Days: --patient K (the same as --seed K) draws the patient's nerve fibres and
electrode array; --session N draws day N of that patient: the electrode has moved
a little along the nerve, some units are lost and others appear, each channel's
gain and noise differ, and the patient moves faster or slower, harder or softer.
Session 0 is the recording of --seed K without sessions, bit for bit.
"""

EXAMPLES = """\
examples:
  neurohand simulate --out demo.nh --seconds 120
  neurohand simulate --out us.nh --seconds 60 --channels 32 --rate 20000 --mains 60 --seed 7
  neurohand simulate --out clean.nh --seconds 60 --difficulty easy
  neurohand simulate --out p3-day2.nh --seconds 120 --patient 3 --session 2
"""


def register(subparsers):
    """Add ``simulate`` to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "simulate", help="write a synthetic nerve recording with finger labels",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="recording file to write, exactly this path; an existing file needs --force, and "
                             "is replaced only once the new recording is complete (an interrupted or failed "
                             "run leaves it as it was)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files")
    parser.add_argument("--seconds", required=True, metavar="S",
                        help="duration in seconds, > 0 and at most 86400 (about 36 s make one "
                             "repetition of the protocol)")
    parser.add_argument("--channels", default="16", metavar="N",
                        help="number of electrode channels, 1..256 (default: 16)")
    parser.add_argument("--rate", default="10000", metavar="HZ",
                        help="samples per second per channel, 1000..50000 (default: 10000)")
    parser.add_argument("--seed", default=None, metavar="K",
                        help="random seed, an integer >= 0; same seed, same file (default: 0)")
    parser.add_argument("--patient", default=None, metavar="K",
                        help="the patient, an integer >= 0: another name for --seed (give one of them)")
    parser.add_argument("--session", default="0", metavar="N",
                        help="the day, an integer 0..10000: sessions of one patient share the nerve and "
                             "electrode and differ as days of a chronic implant do; session 0 is the "
                             "recording without sessions (default: 0)")
    parser.add_argument("--mains", default="50", metavar="HZ",
                        help="mains frequency of the interference, 50 or 60 (default: 50)")
    parser.add_argument("--difficulty", default="realistic", metavar="PRESET",
                        help="realistic (default): physiology and confounds modelled on published "
                             "recordings (silent motor fibres at rest, nerve leading the glove, "
                             "1/f and electrode noise, EMG cross-talk, mixed fascicles), calibrated so a "
                             "decoder reaches published implant figures (r about 0.3-0.55; mirror mismatch and "
                             "electrode yield included, docs/simulator.md); easy: the clean "
                             "signal of simulator version 1, for tests")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing (no progress, no summary)")
    parser.set_defaults(func=run_simulate)


def _parse(kind, name, text):
    """Turn option text into an int or float, or raise UsageError naming the option."""
    from neurohand.firmware_bridge.shared.errors import UsageError
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise UsageError("{} must be {}, but got {!r}".format(name, expected, text)) from None


class _Progress(object):
    """Percentage on stderr: rewritten in place on a terminal, every 10 % otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = -1

    def __call__(self, fraction):
        percent = int(fraction * 100)
        step = 1 if self.tty else 10
        if percent // step == self.shown // step and percent != 100:
            return
        self.shown = percent
        if self.tty:
            self.stream.write("\rsimulating: {:3d}%".format(percent) + ("\n" if percent == 100 else ""))
        else:
            self.stream.write("simulating: {:3d}%\n".format(percent))
        self.stream.flush()


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``kill``, a stopping service) unwinds like Ctrl-C, so the temporary file is removed."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt()

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:          # not the main thread (simulate called from a test's thread): nothing to undo
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_simulate(args):
    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.atomic import atomic_path
    from neurohand.firmware_bridge.shared.errors import RecordingError
    from neurohand.firmware_bridge.shared.outputs import check_output_path, describe_os_error
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig, write_recording

    from neurohand.firmware_bridge.shared.errors import UsageError

    mains = checks.check_option("mains", args.mains, ("50", "60"))
    if args.seed is not None and args.patient is not None:
        raise UsageError("--patient and --seed name the same thing; give one of them")
    if args.patient is not None:
        seed = checks.check_int("patient", _parse(int, "patient", args.patient), minimum=0)
    else:
        seed = _parse(int, "seed", "0" if args.seed is None else args.seed)
    config = SimulatorConfig(
        seconds=_parse(float, "seconds", args.seconds),
        n_channels=_parse(int, "channels", args.channels),
        rate=_parse(float, "rate", args.rate),
        seed=seed, session=_parse(int, "session", args.session),
        mains_hz=int(mains), difficulty=args.difficulty)
    out = check_output_path("--out", args.out, force=args.force)
    progress = None if args.quiet else _Progress(sys.stderr)
    try:
        with _terminate_as_interrupt():
            # The old file stays until the new one is complete: written beside it, then renamed over it.
            with atomic_path(out) as temporary:
                sim = write_recording(temporary, config, progress=progress)
    except OSError as exc:
        raise RecordingError("cannot write {!r}: {}".format(args.out, describe_os_error(exc))) from exc
    if not args.quiet:
        print("wrote {}: {:g} s, {} channels at {:g} Hz, difficulty {}, patient {} session {}, finger labels at "
              "100 Hz, {} movements, {} events".format(args.out, config.seconds, config.n_channels, config.rate,
                                                       config.difficulty, config.seed, config.session,
                                                       sim.protocol.n_trials, len(sim.events())))
