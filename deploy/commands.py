"""Runtime and deployment subcommands (see neurohand.deploy.cli).  Standard
library only at module level; handlers import what they need."""
import json
import os

BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime", "numpy", "torch")
ENGINE_FILE = "model.plan"


def register(subparsers):
    """Add the runtime and deployment subcommands to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "bundle", help="package a trained run as a verified bundle for the device",
        description="Make a self-contained bundle directory from a training run: model.onnx, config.json "
                    "(DSP, features, normalisation, I/O spec), golden test vectors computed with the numpy "
                    "backend, and manifest.json with the SHA-256 of every file and the versions that "
                    "produced it. Every later load verifies the manifest.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="output directory of 'neurohand train'")
    parser.add_argument("--out", required=True, metavar="BUNDLE", help="bundle directory to create (must not exist)")
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
    parser.set_defaults(func=_build_engine)

    parser = subparsers.add_parser(
        "selftest", help="check a backend against the bundle's golden vectors on this device",
        description="Run the bundle's golden feature sequences through a backend, compare with the "
                    "reference outputs (max abs error at most 1e-4 in FP32, 1e-2 in FP16), print per-step "
                    "latency, and record the result for this device. 'neurohand run' refuses a bundle "
                    "that has not passed here. Exit status 1 on failure.")
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="inference backend (default auto: TensorRT, then ONNX Runtime, then numpy)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.set_defaults(func=_selftest)


def _bundle(args):
    from neurohand.deploy.bundle import make_bundle
    manifest = make_bundle(args.run_dir, args.out)
    print("bundle written to {} ({} inputs -> {} outputs; files: {})".format(
        args.out, manifest["io"]["n_features"], manifest["io"]["n_outputs"], ", ".join(sorted(manifest["files"]))))


def engine_path(bundle):
    return os.path.join(bundle.engine_dir, ENGINE_FILE)


def _build_engine(args):
    from neurohand.deploy.bundle import load_bundle
    from neurohand.decoder.backends.tensorrt_backend import build_engine
    from neurohand.firmware_bridge.checks import check_int
    workspace_mb = check_int("--workspace-mb", args.workspace_mb, minimum=16, maximum=65536)
    bundle = load_bundle(args.bundle)
    os.makedirs(bundle.engine_dir, exist_ok=True)
    metadata = build_engine(bundle.model_path, engine_path(bundle), fp16=args.fp16, workspace_mb=workspace_mb)
    print("engine built with TensorRT {} for {} ({}) -> {}".format(
        metadata["tensorrt_version"], metadata["gpu_name"], "fp16" if args.fp16 else "fp32", engine_path(bundle)))


def open_bundle_backend(bundle, backend_name):
    """Create the backend a bundle runs on; TensorRT uses the bundle's engine."""
    from neurohand.decoder.backends import create_backend
    path = engine_path(bundle)
    fp16 = False
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as handle:
            fp16 = bool(json.load(handle).get("fp16"))
    if backend_name in ("tensorrt", "auto"):
        return create_backend(backend_name, bundle.model_path, engine_path=path, fp16=fp16), fp16
    return create_backend(backend_name, bundle.model_path), False


def _selftest(args):
    from neurohand.deploy.bundle import load_bundle
    from neurohand.deploy.selftest import record_result, run_selftest
    bundle = load_bundle(args.bundle)
    backend, fp16 = open_bundle_backend(bundle, args.backend)
    try:
        report = run_selftest(bundle, backend, fp16=fp16 and backend.name == "tensorrt")
    finally:
        backend.close()
    report["record"] = record_result(bundle, report)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print("self-test {}: backend {}, {} steps, max abs error {:.3g} (tolerance {:g}), "
              "step latency p50 {:.0f} us, p99 {:.0f} us".format(
                  "PASSED" if report["passed"] else "FAILED", report["backend"], report["steps"],
                  report["max_abs_error"], report["tolerance"], report["step_us"]["p50"], report["step_us"]["p99"]))
    return 0 if report["passed"] else 1
