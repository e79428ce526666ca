"""The ``neurohand`` command line.

Each area contributes its subcommands through a ``register(subparsers)``
function in a small command module listed below.  Those modules import only the standard
library at module level, so ``neurohand --help`` works on the Jetson without
torch; the heavy imports happen inside each command's handler.

A user mistake (``NeurohandError``) is printed as one line with exit status 2;
argparse reports bad flags the same way.  Any other exception is a bug and keeps
its traceback.
"""
import argparse
import importlib
import signal
import sys

from neurohand.deploy.version import __version__
from neurohand.firmware_bridge.shared.errors import NeurohandError

# Explicit, ordered registry of the modules that add subcommands.
COMMAND_MODULES = (
    "neurohand.deploy.cli.info",          # info
    "neurohand.deploy.cli.simulate",      # simulate
    "neurohand.deploy.cli.virtual_chip",  # virtual-chip
    "neurohand.deploy.cli.virtual_hand",  # virtual-hand
    "neurohand.deploy.cli.virtual_glove",  # virtual-glove
    "neurohand.deploy.cli.train",         # import, train, evaluate
    "neurohand.deploy.cli.interop",       # export (NWB); import nwb / xdf sources
    "neurohand.deploy.cli.bundle",        # bundle, build-engine, selftest, flash
    "neurohand.deploy.cli.recalibrate",   # recalibrate
    "neurohand.deploy.cli.run",           # run, replay, demo
    "neurohand.deploy.cli.collect",       # collect
    "neurohand.deploy.cli.bench",         # bench
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit 2) instead of the usage text."""

    def error(self, message):
        self.exit(EXIT_USAGE, "{}: error: {} (see '{} --help')\n".format(self.prog, message, self.prog))


def build_parser():
    parser = OneLineErrorParser(
        prog="neurohand",
        description=(
            "Decode finger movements from nerve signals and drive a prosthetic hand. "
            "Train a decoder on a workstation, bundle it, run it on a Jetson, and "
            "bench-test it by replaying recordings through virtual devices."),
        epilog="Run 'neurohand COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version",
                        version="neurohand {}".format(__version__))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _warnings_as_one_line(args.command)
    try:
        result = args.func(args)
    except NeurohandError as exc:
        print("neurohand {}: error: {}".format(args.command, exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neurohand {}: interrupted".format(args.command), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into e.g. `head` that closed early: not an error of ours.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        return 0
    return 0 if result is None else int(result)


def _warnings_as_one_line(command):
    """Python warnings print as ``neurohand CMD: warning: ...``, not as a file name and source line.

    A user of the CLI cannot act on our source line; the message is what counts.
    """
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        stream = sys.stderr if file is None else file
        try:
            stream.write("neurohand {}: warning: {}\n".format(command, " ".join(str(message).split())))
        except (OSError, ValueError):
            pass  # stderr gone: a warning is not worth dying for

    warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
