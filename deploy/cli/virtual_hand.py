"""Subcommands of this area (see neurohand.deploy.cli.main).  Standard library only
at module level; handlers import what they need."""


def register(subparsers):
    """Add this area's subcommands to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "virtual-hand",
        help="serve a virtual prosthetic hand on a pseudo-terminal",
        description=(
            "Open a pseudo-terminal that behaves like a prosthetic hand: it checks every "
            "frame (framing, checksum/CRC), counts keep-alive timeouts, answers "
            "neurohand-protocol commands with telemetry, and logs every valid command "
            "with timestamps as JSON lines for scoring. The terminal's path is printed on "
            "the first line of stdout; give the runtime the hand spec "
            "PROTOCOL:PATH (e.g. neurohand:/dev/pts/7). Stop with Ctrl-C; counters are printed on exit."),
    )
    parser.add_argument("--protocol", required=True, metavar="{psyonic,neurohand}",
                        help="the protocol to speak: 'psyonic' (PSYONIC Ability Hand UART API) "
                             "or 'neurohand' (docs/hand-protocol.md)")
    parser.add_argument("--port", metavar="PATH", default=None,
                        help="also create a symlink PATH to the terminal, for a fixed name; only a "
                             "stale symlink to a vanished /dev/pts/N (left by a killed run) is replaced, "
                             "anything else at PATH is refused; on exit the symlink is removed if it "
                             "still points to this hand's terminal")
    parser.add_argument("--log", metavar="FILE", default=None,
                        help="append every valid command and every keep-alive timeout to FILE "
                             "as JSON lines (monotonic and wall time, positions 0..1, seq); an "
                             "existing FILE must be an earlier virtual-hand log (or empty), anything "
                             "else is refused; if FILE cannot be written any more (disk full) logging "
                             "stops with a warning and the hand goes on")
    parser.add_argument("--keepalive-timeout", metavar="SECONDS", default="0.3",
                        help="silence after a valid command that counts as a keep-alive timeout "
                             "(default: 0.3, the PSYONIC hand's API timeout)")
    parser.add_argument("--no-stuffing", action="store_true",
                        help="psyonic only: expect raw frames instead of PPP byte-stuffed ones")
    parser.set_defaults(func=run_virtual_hand)


def _parse_seconds(text):
    from neurohand.firmware_bridge.shared.checks import check_number
    from neurohand.firmware_bridge.shared.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        raise UsageError("--keepalive-timeout must be a number of seconds, got {!r}".format(text))
    return check_number("--keepalive-timeout", value, minimum=0.0, exclusive_minimum=True)


def check_log_path(name, path, port=None):
    """Refuse a --log FILE that cannot be appended to, or whose content is not a virtual-hand log.

    Appending is the log's documented job, so an earlier log is no reason to
    refuse; but appending JSON lines to anything else (a recording, a config,
    the --port itself) would spoil it, and there is nothing to ``--force``.
    """
    import json
    import os

    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path, describe_os_error

    if port is not None and path.strip() and os.path.abspath(path) == os.path.abspath(port):
        raise UsageError("{} {!r} is also the --port symlink; give two paths".format(name, path))
    # force: an existing file is appended to (checked below), never replaced.
    absolute = check_output_path(name, path, force=True)
    if not os.path.isfile(absolute):
        return absolute          # new, or the /dev/null sink
    try:
        with open(absolute, "rb") as stream:
            first = stream.readline(65536)
        with open(absolute, "ab"):
            pass
    except OSError as exc:
        raise UsageError("{} {!r}: cannot append to it ({})".format(name, path, describe_os_error(exc))) from None
    if not first.strip():
        return absolute
    try:
        record = json.loads(first.decode("utf-8"))
    except ValueError:
        record = None
    if not (isinstance(record, dict) and record.get("event") == "start"):
        raise UsageError("{} {!r} exists and is not a virtual-hand log (its first line is no 'start' "
                         "record); choose another file".format(name, path))
    return absolute


def run_virtual_hand(args):
    import signal
    import sys
    import threading

    from neurohand.firmware_bridge.shared import checks
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.virtual.hand import PROTOCOLS, VirtualHand
    from neurohand.firmware_bridge.virtual.port_link import check_port_link

    protocol = checks.check_option("--protocol", args.protocol, PROTOCOLS)
    timeout = _parse_seconds(args.keepalive_timeout)
    if args.no_stuffing and protocol != "psyonic":
        raise UsageError("--no-stuffing applies to --protocol psyonic only")
    if args.port is not None:
        check_port_link("--port", args.port)
    if args.log is not None:
        check_log_path("--log", args.log, port=args.port)

    def log_failed(message):
        print("neurohand virtual-hand: warning: {}".format(message), file=sys.stderr, flush=True)

    stop = threading.Event()
    hand = VirtualHand(protocol, link_path=args.port, log_path=args.log, keepalive_timeout_s=timeout,
                       stuffing=not args.no_stuffing, on_log_error=log_failed).start()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        print(hand.slave_path, flush=True)
        print("virtual hand ({}) on {}{}; Ctrl-C to stop".format(
            protocol, hand.slave_path, " (link {})".format(args.port) if args.port else ""),
            file=sys.stderr, flush=True)
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a virtual device is meant to be stopped
    finally:
        signal.signal(signal.SIGTERM, previous)
        hand.stop()
    print("virtual hand counters: " + ", ".join(
        "{}={}".format(k, v) for k, v in sorted(hand.counters.items())), file=sys.stderr, flush=True)
    return 0
