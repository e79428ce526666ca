"""Subcommands of this area (see neurohand.deploy.cli.main).  Standard library only
at module level; handlers import what they need."""


def add_fault_arguments(parser):
    """The link faults the virtual chip injects (``virtual-chip``, ``replay --realtime``)."""
    parser.add_argument("--drop-rate", type=float, default=0.0, metavar="P",
                        help="probability that a frame is not sent (default 0)")
    parser.add_argument("--corrupt-rate", type=float, default=0.0, metavar="P",
                        help="probability that one byte of a frame is flipped so its CRC fails (default 0)")
    parser.add_argument("--garbage-bursts", type=float, default=0.0, metavar="RATE",
                        help="bursts of random bytes between frames, per second of recording (default 0)")


def register(subparsers):
    """Add this area's subcommands to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "virtual-chip", help="play a recording as the neural-interface chip on a pseudo-terminal",
        description=(
            "Open a pseudo-terminal that behaves like the neural-interface chip (docs/chip-protocol.md) "
            "and stream RECORDING through it at its true sample rate times --speed. Prints the "
            "terminal's path on stdout (again after each simulated replug). The chip answers the "
            "command channel (identity, version, configure, start, stop) and streams after the START "
            "command, or at once with --autostart. Faults can be injected reproducibly; on exit the "
            "counters of what was sent and injected are printed as one JSON line on stderr."),
        epilog="Example: neurohand virtual-chip rec.nhr --port /tmp/chip --autostart --drop-rate 0.001 --seed 1")
    parser.add_argument("recording", metavar="RECORDING", help="recording file to play")
    parser.add_argument("--port", metavar="PATH",
                        help="also create a symlink PATH to the pseudo-terminal (kept across replugs); only "
                             "a stale symlink to a vanished /dev/pts/N (left by a killed run) is replaced, "
                             "anything else at PATH is refused; on exit the symlink is removed if it still "
                             "points to this chip's terminal")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="playback speed factor, e.g. 2 for twice real time (default 1)")
    parser.add_argument("--loop", action="store_true",
                        help="start again from --start at the end of the recording instead of stopping")
    parser.add_argument("--start", type=float, default=0.0, metavar="SECONDS",
                        help="start this many seconds into the recording (default 0)")
    parser.add_argument("--autostart", action="store_true",
                        help="stream as soon as the port is open, without waiting for a START command")
    parser.add_argument("--start-at", type=float, default=None, metavar="MONOTONIC",
                        help="the time.monotonic() (CLOCK_MONOTONIC, seconds; the same in every process of this "
                             "machine) at which the first sample (at --start) is due, as 'virtual-glove --start-at', "
                             "so that a chip and a glove given the same time play one recording together; samples "
                             "due before the stream starts (before START) are skipped. Default: when the stream "
                             "starts. Must not be in the past. 'neurohand collect' gives the chip a few seconds "
                             "after its START to send the first sample: start it shortly before this time")
    parser.add_argument("--samples-per-frame", type=int, default=20, metavar="N",
                        help="samples per channel in each frame, 1..255 (default 20; a host can change it "
                             "with CONFIGURE)")
    add_fault_arguments(parser)
    parser.add_argument("--garbage-max-bytes", type=int, default=64, metavar="N",
                        help="longest garbage burst in bytes (default 64)")
    parser.add_argument("--disconnect-after", type=float, default=None, metavar="SECONDS",
                        help="after this many seconds close the terminal as if unplugged, then open a new "
                             "one (same --port symlink) after --reconnect-pause; like a real chip that resets "
                             "when unplugged, it then waits for a new START (unless --autostart) and starts a "
                             "new stream at sequence 0")
    parser.add_argument("--reconnect-pause", type=float, default=1.0, metavar="SECONDS",
                        help="how long the simulated unplug lasts (default 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for the injected faults (default: a different run each time)")
    parser.set_defaults(func=run_virtual_chip)


def check_start_at(value, name="--start-at"):
    """A time.monotonic() value not in the past (UsageError otherwise)."""
    import time

    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import UsageError

    value = checks.check_number(name, value)
    now = time.monotonic()
    if value < now:
        raise UsageError("{} {:.3f} is {:.3f} s in the past (time.monotonic() is {:.3f} now); give a time a few "
                         "seconds ahead".format(name, value, now - value, now))
    return value


def run_virtual_chip(args):

    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import RecordingError, UsageError
    from neurohand.firmware_bridge.virtual.chip import FaultInjector, RecordingSource, VirtualChip

    speed = checks.check_number("--speed", args.speed, minimum=0, exclusive_minimum=True)
    start_s = checks.check_number("--start", args.start, minimum=0)
    spf = checks.check_int("--samples-per-frame", args.samples_per_frame, minimum=1, maximum=255)
    drop = checks.check_number("--drop-rate", args.drop_rate, minimum=0, maximum=1)
    corrupt = checks.check_number("--corrupt-rate", args.corrupt_rate, minimum=0, maximum=1)
    bursts = checks.check_number("--garbage-bursts", args.garbage_bursts, minimum=0)
    garbage_max = checks.check_int("--garbage-max-bytes", args.garbage_max_bytes, minimum=1, maximum=65536)
    pause = checks.check_number("--reconnect-pause", args.reconnect_pause, minimum=0)
    disconnect_after = None
    if args.disconnect_after is not None:
        disconnect_after = checks.check_number("--disconnect-after", args.disconnect_after, minimum=0)
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

    recording = open_recording(args.recording)
    start_sample = int(round(start_s * float(recording.signal_rate)))
    if start_sample >= recording.n_samples:
        raise RecordingError("--start {:g} s is past the end of {} ({:g} s long)".format(
            start_s, args.recording, recording.n_samples / float(recording.signal_rate)))
    source = RecordingSource(recording, start_sample=start_sample)
    garbage_probability = bursts * spf / source.sample_rate_hz
    if garbage_probability > 1:
        raise UsageError("--garbage-bursts {:g}/s is more than one burst per frame ({:g} frames/s)".format(
            bursts, source.sample_rate_hz / spf))
    faults = FaultInjector(drop, corrupt, garbage_probability, garbage_max, seed=args.seed)

    def announce(path):
        print(path, flush=True)

    from neurohand.deploy.version import __version__
    firmware = tuple((int(p) if p.isdigit() else 0) for p in (__version__.split(".") + ["0", "0"])[:3])
    chip = VirtualChip(source, samples_per_frame=spf, speed=speed, loop=args.loop, start_sample=start_sample,
                       autostart=args.autostart, faults=faults if faults.active else None,
                       disconnect_after_s=disconnect_after, reconnect_pause_s=pause, link_path=args.port,
                       on_port=announce, firmware=firmware, start_at=start_at)
    return serve_until_stopped(chip, faults)


def serve_until_stopped(device, faults):
    """Open a virtual device (chip or glove), serve until SIGTERM or Ctrl-C, close it, and print its
    summary with the injected faults' counters as one JSON line on stderr; exit status 0."""
    import json
    import signal
    import sys
    import threading
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        device.open()
        try:
            device.serve(stop)
        except KeyboardInterrupt:
            pass      # Ctrl-C is how a looping device is normally stopped
    finally:
        device.close()
        signal.signal(signal.SIGTERM, previous)
        summary = device.summary()
        summary["faults"] = dict(faults.counters)
        print(json.dumps(summary, sort_keys=True), file=sys.stderr, flush=True)
    return 0
