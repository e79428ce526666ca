"""``neurohand bench``: measurements on the current machine, printed as JSON.

Each target is a function ``run(quick) -> dict`` living next to the code it
measures; this module only names them.  ``quick`` asks for a shorter run
(used by tests to check the output's shape, never its speed).
"""
import json
import sys


def _parser(quick):
    from neurohand.firmware_bridge import chip_bench
    return chip_bench.run(quick)


def _dsp(quick):
    from neurohand.decoder import dsp_bench
    return dsp_bench.run_dsp(quick)


def _features(quick):
    from neurohand.decoder import dsp_bench
    return dsp_bench.run_features(quick)


def _backends(quick):
    from neurohand.decoder import backend_bench
    return backend_bench.run(quick)


def _simulate(quick):
    from neurohand.firmware_bridge import simulator_bench
    return simulator_bench.run(quick)


def _libemg(quick):
    from neurohand.decoder import libemg_compare
    return libemg_compare.run(quick)


def _footprint(quick):
    from neurohand.deploy import footprint_bench
    return footprint_bench.run(quick)


# Explicit registry: target name -> function.  Later targets (decoding,
# latency, footprint) are added here as they land.
TARGETS = {
    "parser": _parser,
    "dsp": _dsp,
    "features": _features,
    "backends": _backends,
    "simulate": _simulate,
    "libemg": _libemg,
    "footprint": _footprint,
}


def register(subparsers):
    parser = subparsers.add_parser(
        "bench", help="measure parser, DSP, features and backends on this machine",
        description="Measure on this machine and print the results. With one target and "
                    "--json, prints exactly one JSON object; with 'all', one object keyed by target.")
    parser.add_argument("target", nargs="?", default="all", choices=["all"] + sorted(TARGETS),
                        help="what to measure (default: all)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON only")
    parser.add_argument("--quick", action="store_true",
                        help="short run to check the set-up (figures are not meaningful)")
    parser.set_defaults(func=run_command)


def run_command(args):
    names = sorted(TARGETS) if args.target == "all" else [args.target]
    results = {}
    for name in names:
        if not args.json:
            print("measuring {} ...".format(name), file=sys.stderr)
        results[name] = TARGETS[name](args.quick)
    document = results[names[0]] if len(names) == 1 else results
    if args.json:
        print(json.dumps(document, sort_keys=True))
    else:
        print(json.dumps(document, indent=2, sort_keys=True))
