"""Runtime and deployment subcommands (see neurohand.deploy.cli.main).  Standard
library only at module level; handlers import what they need."""
import json
import os

from neurohand.decoder.backend_registry import BACKEND_CHOICES


def register(subparsers):
    """Add the runtime and deployment subcommands to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "bundle", help="package a trained run as a verified bundle for the device",
        description="Make a self-contained bundle directory from a training run: model.onnx, config.json "
                    "(DSP, features, normalisation, I/O spec), golden test vectors computed with the numpy "
                    "backend, and manifest.json with the SHA-256 of every file and the versions that "
                    "produced it. Every later load verifies the manifest. A model with a movement-class head "
                    "keeps it: the manifest's I/O spec names the classes, and the summary line lists them.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output directory of 'neurohand train'")
    parser.add_argument("--out", required=True, metavar="BUNDLE",
                        help="bundle directory to create (new or empty; not the run directory nor inside it)")
    parser.add_argument("--force", action="store_true",
                        help="replace existing output files: an existing bundle at --out (never another folder)")
    parser.set_defaults(func=_bundle)

    parser = subparsers.add_parser(
        "build-engine", help="build the TensorRT engine of a bundle on this device",
        description="Build a TensorRT engine from the bundle's ONNX model with the installed TensorRT "
                    "(8.2 on JetPack 4.6, 10.x elsewhere) and store it in BUNDLE/engine/ with the TensorRT "
                    "version and GPU name. An engine built by another TensorRT, GPU or model is refused "
                    "later with a message to rebuild. Needs a GPU, TensorRT and pycuda.")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--fp16", action="store_true", help="build in half precision (self-test tolerance 1e-2)")
    parser.add_argument("--workspace-mb", type=int, default=256, metavar="N",
                        help="builder workspace in MiB (default 256; the Nano has 4 GB shared)")
    parser.add_argument("--graph", default="auto", choices=("auto", "rnn", "plain"),
                        help="which export to build from: rnn (model.onnx, GRU/LSTM nodes, which TensorRT 8.x "
                             "turns into a loop), plain (model_plain.onnx, the same step as plain arithmetic, no "
                             "loop), or auto (default): rnn, and plain where the rnn build fails")
    parser.set_defaults(func=_build_engine)

    parser = subparsers.add_parser(
        "selftest", help="check a backend against the bundle's golden vectors on this device",
        description="Run the bundle's golden feature sequences through a backend, compare with the "
                    "reference outputs, finger positions and any class scores alike (error at most 1e-4 "
                    "in FP32, 1e-2 in FP16; absolute within +-1, relative beyond, as an LSTM's cell state "
                    "grows large), print per-step latency, and record the result for this device. "
                    "'neurohand run' refuses a bundle that has not passed here. Exit status 1 on failure.")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="inference backend (default auto: TensorRT, then numpy, then ONNX Runtime)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=_selftest)

    register_flash(subparsers)
    register_doctor(subparsers)


def _bundle(args):
    from neurohand.deploy.bundle import make_bundle
    manifest = make_bundle(args.run_dir, args.out, force=args.force)
    for line in describe_bundle(args.out, manifest):
        print(line)


def describe_bundle(path, manifest):
    """Lines saying what the bundle at ``path`` holds: its inputs and outputs, and with a class head
    how the outputs divide into finger positions and class scores, and the classes in output order
    (the names and indices a ``keys:MAP`` class binding takes)."""
    io_spec = manifest["io"]
    classes = list(io_spec.get("class_names") or ())
    outputs = "{} outputs".format(io_spec["n_outputs"])
    if classes:
        n_positions = io_spec["n_outputs"] - len(classes)
        outputs += ": {} finger position{}, then {} class scores".format(
            n_positions, "" if n_positions == 1 else "s", len(classes))
    lines = ["bundle written to {} ({} inputs -> {}; files: {})".format(
        path, io_spec["n_features"], outputs, ", ".join(sorted(manifest["files"])))]
    if classes:
        # The names come from the training recordings' metadata: shown as text only where printable.
        lines.append("classes (in output order, index 0 first): " + ", ".join(
            name if name.isprintable() else ascii(name) for name in classes))
    return lines


def _build_engine(args):
    from neurohand.deploy.bundle import load_bundle
    from neurohand.decoder.backends.tensorrt_backend import build_engine
    from neurohand.firmware_bridge.shared.checks import check_int
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path, describe_os_error
    workspace_mb = check_int("--workspace-mb", args.workspace_mb, minimum=16, maximum=65536)
    bundle = load_bundle(args.bundle)
    try:
        os.makedirs(bundle.engine_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError("cannot create the engine folder {!r}: {}".format(bundle.engine_dir,
                                                                           describe_os_error(exc))) from None
    # Replacing the engine is this command's job (atomically, on success): checked, not refused.
    for path in (bundle.engine_path, bundle.engine_path + ".json"):
        check_output_path("engine", path, inputs=(bundle.model_path, bundle.plain_model_path), force=True)
    metadata = build_engine(bundle.model_path, bundle.engine_path, fp16=args.fp16, workspace_mb=workspace_mb,
                            plain_path=bundle.plain_model_path, graph=args.graph)
    if metadata.get("fallback"):
        print("neurohand build-engine: note: {}".format(metadata["fallback"]))
    print("engine built with TensorRT {} for {} ({}, {} graph) -> {}".format(
        metadata["tensorrt_version"], metadata["gpu_name"], "fp16" if args.fp16 else "fp32", metadata["graph"],
        bundle.engine_path))


def _selftest(args):
    from neurohand.deploy.bundle import load_bundle, open_bundle_backend
    from neurohand.deploy.selftest import record_path, record_result, run_selftest
    from neurohand.firmware_bridge.shared.errors import UsageError
    from neurohand.firmware_bridge.shared.outputs import check_output_path, describe_os_error
    bundle = load_bundle(args.bundle)
    backend, fp16 = open_bundle_backend(bundle, args.backend)
    try:
        # The record is written after the steps: a bundle folder it cannot go in is refused before them.
        try:
            os.makedirs(bundle.selftest_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError("cannot create the self-test folder {!r}: {}".format(
                bundle.selftest_dir, describe_os_error(exc))) from None
        check_output_path("self-test record", record_path(bundle, backend.name), inputs=(bundle.model_path,),
                          force=True)
        report = run_selftest(bundle, backend, fp16=fp16 and backend.name == "tensorrt")
    finally:
        backend.close()
    report["record"] = record_result(bundle, report)
    if args.json:
        print(json.dumps(report, sort_keys=True, allow_nan=False))
    else:
        error = report["max_abs_error"]
        print("self-test {}: backend {}, {} steps, max error {} (tolerance {:g}), "
              "step latency p50 {:.0f} us, p99 {:.0f} us".format(
                  "PASSED" if report["passed"] else "FAILED", report["backend"], report["steps"],
                  "not finite (NaN outputs)" if error is None else "{:.3g}".format(error), report["tolerance"],
                  report["step_us"]["p50"], report["step_us"]["p99"]))
    return 0 if report["passed"] else 1


def register_flash(subparsers):
    parser = subparsers.add_parser(
        "flash", help="install a bundle and the service on Jetsons over SSH",
        description="Copy the bundle and the package to each device over SSH (keys only; no password is "
                    "asked or stored), install what is missing, build the TensorRT engine and self-test "
                    "there, install udev rules (/dev/neurohand-chip, /dev/neurohand-hand) and a hardened "
                    "systemd service running 'neurohand run' as an unprivileged user in the dialout group. "
                    "Several --host options or an --inventory file flash a fleet in parallel. Privileged "
                    "steps need root or passwordless sudo on the device.",
        epilog="Example: neurohand flash my-bundle --host jetson@192.0.2.7 --identity ~/.ssh/id_ed25519 "
               "--chip-usb 0483:5740 --hand-usb 0403:6015 --hand psyonic:/dev/neurohand-hand --max-performance")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory made by 'neurohand bundle'")
    parser.add_argument("--host", action="append", default=[], metavar="USER@HOST[:PORT]",
                        help="device to flash; repeat for several")
    parser.add_argument("--inventory", metavar="FILE", help="file with one USER@HOST[:PORT] per line ('#' comments)")
    parser.add_argument("--identity", metavar="KEYFILE", help="SSH private key (default: ssh's own choice)")
    parser.add_argument("--known-hosts", metavar="FILE", help="known-hosts file to use instead of ssh's default")
    parser.add_argument("--dry-run", action="store_true", help="print every remote command without running it")
    parser.add_argument("--jobs", type=int, default=4, metavar="N", help="devices flashed at once (default 4)")
    parser.add_argument("--install-dir", default="/opt/neurohand", metavar="DIR",
                        help="where the package, bundles and venv live on the device (default /opt/neurohand)")
    parser.add_argument("--system-root", default="/", metavar="DIR",
                        help="install system files (systemd unit, udev rules) under this root instead of / "
                             "(for staging images and tests; the service user is then not created)")
    parser.add_argument("--service-user", default="neurohand", metavar="USER",
                        help="unprivileged user the service runs as (default neurohand)")
    parser.add_argument("--remote-python", default="python3", metavar="PYTHON",
                        help="Python on the device (default python3: JetPack 4.6's 3.6.9)")
    parser.add_argument("--chip", default="/dev/neurohand-chip", metavar="PORT", help="chip port the service opens")
    parser.add_argument("--hand", default="psyonic:/dev/neurohand-hand", metavar="SPEC",
                        help="hand the service drives: psyonic:PORT, neurohand:PORT, keys:MAPFILE or none")
    parser.add_argument("--backend", default="tensorrt", choices=BACKEND_CHOICES,
                        help="backend the device self-tests and runs (default tensorrt)")
    parser.add_argument("--fp16", action="store_true", help="build the engine in half precision")
    parser.add_argument("--skip-engine", action="store_true",
                        help="do not build a TensorRT engine (devices without a GPU; use another --backend)")
    parser.add_argument("--chip-usb", metavar="VID:PID", help="USB id of the chip's serial adapter for the udev rule")
    parser.add_argument("--hand-usb", metavar="VID:PID", help="USB id of the hand's serial adapter for the udev rule")
    parser.add_argument("--max-performance", action="store_true",
                        help="set the Jetson's maximum-performance mode (nvpmodel -m 0, jetson_clocks)")
    parser.add_argument("--no-start", action="store_true", help="install the service but do not (re)start it")
    lab = parser.add_argument_group("Lab Streaming Layer (the 'lab' extra; docs/lab-streams.md)")
    lab.add_argument("--allow-lsl", action="append", default=None, metavar="ADDR",
                     help="let the service reach ADDR over the network for Lab Streaming Layer, nothing else "
                          "(its unit has no network otherwise): localhost, link-local, multicast or an IP network "
                          "such as 192.168.10.0/24 (never everything); repeat for several. Needed by --chip "
                          "lsl:NAME and --lsl-outlet")
    lab.add_argument("--lsl-outlet", metavar="NAME",
                     help="the service also publishes the finger positions as the LSL stream NAME (1 to 64 "
                          "letters, digits, '_', '.' or '-'; 'neurohand run --lsl-outlet'); needs --allow-lsl")
    parser.add_argument("--package", metavar="ARCHIVE",
                        help="pip-installable neurohand archive to copy (default: built from this source tree)")
    parser.set_defaults(func=_flash)


def _flash(args):
    from neurohand.deploy import flash
    from neurohand.firmware_bridge.shared.checks import check_int
    from neurohand.firmware_bridge.shared.errors import UsageError
    hosts = list(args.host)
    if args.inventory:
        hosts += flash.read_inventory(args.inventory)
    if not hosts:
        raise UsageError("give at least one --host USER@HOST or an --inventory file")
    if args.skip_engine and args.backend == "tensorrt":
        raise UsageError("--skip-engine needs another --backend (onnxruntime or numpy): tensorrt needs the engine")
    settings = flash.FlashSettings(
        install_dir=args.install_dir, system_root=args.system_root, service_user=args.service_user,
        remote_python=args.remote_python, chip_port=args.chip, hand=args.hand, backend=args.backend,
        fp16=args.fp16, skip_engine=args.skip_engine, max_performance=args.max_performance,
        chip_usb=flash.parse_usb_id("--chip-usb", args.chip_usb),
        hand_usb=flash.parse_usb_id("--hand-usb", args.hand_usb), start_service=not args.no_start,
        lsl_allow=None if args.allow_lsl is None else tuple(args.allow_lsl), lsl_outlet=args.lsl_outlet)
    outcomes = flash.flash(args.bundle, hosts, settings, identity=args.identity, known_hosts=args.known_hosts,
                           dry_run=args.dry_run, jobs=check_int("--jobs", args.jobs, minimum=1, maximum=64),
                           package=args.package)
    if args.dry_run:
        return 0
    print("\n{:<32} {:<8} {:>8}  {}".format("device", "outcome", "seconds", "failed step"))
    for outcome in outcomes:
        print("{:<32} {:<8} {:>8.1f}  {}".format(outcome.host, "ok" if outcome.ok else "FAILED", outcome.seconds,
                                                 outcome.failed_step or ""))
        if not outcome.ok:
            print("  " + outcome.log.strip().replace("\n", "\n  "))
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def register_doctor(subparsers):
    parser = subparsers.add_parser(
        "doctor", help="check this device end to end and write one report file to send back",
        description="Check this machine end to end with BUNDLE and write everything into one JSON report: "
                    "the system (JetPack, TensorRT, pycuda, GPU, power mode, which backends are available "
                    "and why not), trtexec on the bundle's model, build-engine, selftest on every available "
                    "backend, and a real-time replay through the virtual chip and hand with latency and "
                    "per-stage timings. Runs on a copy of the bundle: the installed one and its self-test "
                    "record are not changed. Each step has a time limit; one that fails or hangs is recorded "
                    "and the others go on. Run it on a Jetson after 'neurohand flash' and send the file back.",
        epilog="Example: neurohand doctor /opt/neurohand/current --seconds 60")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="report file to write (must not exist; default: "
                             "neurohand-doctor-HOST-DATE-TIME.json in the current folder)")
    parser.add_argument("--seconds", type=float, default=60.0, metavar="S",
                        help="length of the real-time replay, 2..600 s (default 60)")
    parser.add_argument("--recording", metavar="FILE", default=None,
                        help="recording with the bundle's channels, rate and labels for the replay (default: "
                             "one simulated for the bundle's channels and rate, which fits bundles trained on "
                             "simulated data)")
    parser.set_defaults(func=_doctor)


def _doctor(args):
    import sys
    from neurohand.deploy.doctor import default_report_path, run_doctor
    from neurohand.firmware_bridge.shared.checks import check_number
    seconds = check_number("--seconds", args.seconds, minimum=2, maximum=600)
    out = args.out or default_report_path()

    def progress(line):
        print(line, file=sys.stderr)

    report = run_doctor(args.bundle, out, seconds=seconds, recording=args.recording, progress=progress)
    for line in report["summary"]:
        print(line)
    print("report written to {}".format(out))
    failed = [name for name, step in report["steps"].items()
              if isinstance(step, dict) and step.get("status") == "failed"]
    failed += ["selftest " + name for name, step in (report["steps"].get("selftest") or {}).items()
               if step.get("status") == "failed"]
    return 1 if failed else 0
