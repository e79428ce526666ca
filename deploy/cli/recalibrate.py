"""``neurohand recalibrate`` (see neurohand.deploy.cli.main).  Standard library only at module
level; the handler imports what it needs."""
import json


def register(subparsers):
    """Add ``recalibrate`` to the ``neurohand`` parser."""
    parser = subparsers.add_parser(
        "recalibrate", help="re-fit a bundle to a new session on the device (numpy only)",
        description="Write a new bundle from BUNDLE re-fitted to a short labelled session: the feature "
                    "normalisation from the session's features, and the output layer by ridge regression "
                    "(toward the old layer) on the recurrent states, in closed form. The last 20 % of the "
                    "seconds used are held out to choose lambda and to report R2 before and after. The new "
                    "bundle gets fresh golden vectors and passes a numpy self-test before it appears at --out; "
                    "the old bundle is never modified (it is the rollback). Runs without torch or ONNX Runtime "
                    "(docs/recalibration.md).",
        epilog="Example: neurohand recalibrate /opt/neurohand/current today.nh --out /opt/neurohand/day2 "
               "--seconds 120")
    parser.add_argument("bundle", metavar="BUNDLE", help="the bundle to start from (only read)")
    parser.add_argument("recording", metavar="SESSION", help="a labelled recording of the same patient, with the "
                                                            "bundle's channels, rate and label stream")
    parser.add_argument("--out", required=True, metavar="NEW_BUNDLE",
                        help="bundle directory to create (new or empty; not BUNDLE, not inside it)")
    parser.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="use the first S seconds of the session (default: all; at least 20)")
    parser.add_argument("--ridge", default="auto", metavar="LAMBDA",
                        help="ridge strength toward the old output layer, a number > 0, or auto (default): "
                             "chosen on the held-out tail")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing bundle at --out (never another folder)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(func=_recalibrate)


def _recalibrate(args):
    from neurohand.deploy.recalibrate import recalibrate
    result = recalibrate(args.bundle, args.recording, args.out, seconds=args.seconds, ridge=args.ridge,
                         force=args.force, progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(_strict(result), sort_keys=True, allow_nan=False))
        return
    print("recalibrated bundle written to {} in {:.1f} s: {:.0f} s of session ({:.0f} s held out), lambda {:.3g}, "
          "held-out mean R2 {} -> {} (old bundle unchanged: {})".format(
              result["out"], result["elapsed_s"], result["seconds_used"], result["held_out_s"], result["lambda"],
              _number(result["r2_before"]), _number(result["r2_after"]), args.bundle))
    if result.get("kept_class_rows"):
        print("class-score rows of the output layer kept exactly as they were (only positions are re-fitted): "
              "{}".format(", ".join(result["kept_class_rows"])))
    if not result["patient"]["checked"]:
        print("patient not checked: {}".format(result["patient"]["note"]))
    if result["kept_outputs"]:
        print("outputs kept as they were (their labels do not move in the session): {}".format(
            ", ".join(result["kept_outputs"])))


def _number(value):
    return "n/a" if value != value else "{:.3f}".format(value)


def _strict(value):
    """``value`` with NaN floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and value != value:
        return None
    return value
