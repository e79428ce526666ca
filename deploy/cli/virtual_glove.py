"""Subcommands of this area (see neurohand.deploy.cli.main).  Standard library only
at module level; handlers import what they need."""


def register(subparsers):
    """Add this area's subcommands to the ``neurohand`` parser."""
    from neurohand.deploy.cli.virtual_chip import add_fault_arguments
    parser = subparsers.add_parser(
        "virtual-glove", help="play a recording's finger labels as a data glove on a pseudo-terminal",
        description=(
            "Open a pseudo-terminal that behaves like a data glove (docs/glove-protocol.md) and play the "
            "finger labels of RECORDING (0 = open .. 1 = flexed) through it, mapped linearly to raw sensor "
            "counts, label time t at start + t / --speed on the monotonic clock. --protocol serial streams "
            "neurohand glove frames (5 flex sensors); --protocol cyberglove answers a host's polls as a "
            "22-sensor CyberGlove. Prints the terminal's path on stdout (again after each simulated replug); "
            "on exit the counters of what was sent and injected are printed as one JSON line on stderr. "
            "Open it with 'neurohand collect --glove virtual:PATH'."),
        epilog=("Example: neurohand virtual-glove rec.nhr --port /tmp/glove --drop-rate 0.01 --seed 1. "
                "To start with a virtual chip: pass both the same --start-at, a few seconds ahead of "
                "python3 -c 'import time; print(time.monotonic())'."))
    parser.add_argument("recording", metavar="RECORDING", help="recording whose finger labels to play")
    parser.add_argument("--protocol", default="serial", metavar="{serial,cyberglove}",
                        help="the glove to be: serial (neurohand glove protocol, default) or cyberglove")
    parser.add_argument("--port", "--link", dest="port", metavar="PATH",
                        help="also create a symlink PATH to the pseudo-terminal (kept across replugs); only a "
                             "stale symlink to a vanished /dev/pts/N is replaced, anything else at PATH is "
                             "refused; on exit the symlink is removed if it still points to this glove")
    parser.add_argument("--stream", metavar="NAME", default=None,
                        help="label stream to play (default: the one whose columns are the five fingers)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="playback speed factor, e.g. 2 for twice real time (default 1)")
    parser.add_argument("--loop", action="store_true", help="start again at the first label after the last")
    parser.add_argument("--start-at", type=float, default=None, metavar="MONOTONIC",
                        help="the time.monotonic() (CLOCK_MONOTONIC, seconds; the same in every process of "
                             "this machine) at which label time 0 is played; until then the glove only says "
                             "hello (serial) or reports the first posture (cyberglove). Default: when the "
                             "terminal opens. Must not be in the past")
    add_fault_arguments(parser)
    parser.add_argument("--garbage-max-bytes", type=int, default=64, metavar="N",
                        help="longest garbage burst in bytes (default 64)")
    parser.add_argument("--disconnect-after", type=float, default=None, metavar="SECONDS",
                        help="after this many seconds close the terminal as if unplugged, then open a new one "
                             "(same --port symlink) after --reconnect-pause; like a bus-powered glove it "
                             "restarts (sequence 0, a new hello)")
    parser.add_argument("--reconnect-pause", type=float, default=1.0, metavar="SECONDS",
                        help="how long the simulated unplug lasts (default 1)")
    parser.add_argument("--stall-after", type=float, default=None, metavar="SECONDS",
                        help="this many seconds after the start the glove's firmware freezes: nothing is sent "
                             "and nothing answered (the port stays open)")
    parser.add_argument("--stall-for", type=float, default=None, metavar="SECONDS",
                        help="how long the freeze lasts (default: to the end)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for the injected faults (default: a different run each time)")
    parser.set_defaults(func=run_virtual_glove)


def run_virtual_glove(args):

    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
    from neurohand.deploy.cli.virtual_chip import check_start_at
    from neurohand.firmware_bridge.virtual.glove import PROTOCOLS, VirtualGlove, glove_faults, recording_labels

    protocol = checks.check_option("--protocol", args.protocol, PROTOCOLS)
    speed = checks.check_number("--speed", args.speed, minimum=0, exclusive_minimum=True)
    drop = checks.check_number("--drop-rate", args.drop_rate, minimum=0, maximum=1)
    corrupt = checks.check_number("--corrupt-rate", args.corrupt_rate, minimum=0, maximum=1)
    bursts = checks.check_number("--garbage-bursts", args.garbage_bursts, minimum=0)
    garbage_max = checks.check_int("--garbage-max-bytes", args.garbage_max_bytes, minimum=1, maximum=65536)
    pause = checks.check_number("--reconnect-pause", args.reconnect_pause, minimum=0)
    optional = {}
    for option in ("disconnect_after", "stall_after", "stall_for"):
        value = getattr(args, option)
        if value is not None:
            value = checks.check_number("--" + option.replace("_", "-"), value, minimum=0)
        optional[option] = value
    start_at = None
    if args.start_at is not None:
        start_at = check_start_at(args.start_at)
    if args.port is not None:
        from neurohand.firmware_bridge.virtual.port_link import check_port_link
        check_port_link("--port", args.port)
    checks.check_file_exists("RECORDING", args.recording)
    try:
        from neurohand.firmware_bridge.recording.file_format import open_recording
    except ImportError as exc:
        raise RecordingError("cannot read recordings here: {}".format(exc)) from exc

    with open_recording(args.recording) as recording:
        labels, rate, _stream = recording_labels(recording, args.stream)
    garbage_probability = bursts / rate
    if garbage_probability > 1:
        raise UsageError("--garbage-bursts {:g}/s is more than one burst per label ({:g} labels/s)".format(
            bursts, rate))
    faults = glove_faults(protocol, drop, corrupt, garbage_probability, garbage_max, seed=args.seed)
    if start_at is not None:
        start_at = check_start_at(start_at)         # again: reading the labels took time

    def announce(path):
        print(path, flush=True)

    glove = VirtualGlove(labels, rate, protocol=protocol, speed=speed, loop=args.loop, start_at=start_at,
                         faults=faults if faults.active else None, disconnect_after_s=optional["disconnect_after"],
                         reconnect_pause_s=pause, stall_after_s=optional["stall_after"],
                         stall_for_s=optional["stall_for"], link_path=args.port, on_port=announce)
    from neurohand.deploy.cli.virtual_chip import serve_until_stopped
    return serve_until_stopped(glove, faults)
