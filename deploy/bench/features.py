"""``neurohand bench features``: our feature step, and our window features against LibEMG's.

One entry, two parts:

* our streaming feature step per 20 ms block
  (:func:`neurohand.deploy.bench.dsp.run_features`, its keys at the top level);
* ``libemg``: equality on MAV, RMS, WL, ZC, SSC and the speed ratio against
  LibEMG on the same windows (:func:`neurohand.deploy.bench.libemg.run`).

LibEMG 2.0.3 requires ``numpy<2.0`` while the workstation runs numpy 2.x, so
it normally lives in a venv of its own (deploy/bench/libemg.py says how to
make one).  Where that venv's interpreter is given (``--libemg-python PATH``
or the environment variable ``NEUROHAND_LIBEMG_PYTHON``) the comparison runs
there, as ``PATH -m neurohand.deploy bench libemg --json``, and the venv's
size is measured; where LibEMG imports in this interpreter it runs here;
otherwise ``libemg`` says why it was not measured, with the install cost
measured when it was installed for this project.
"""
import json
import os
import subprocess
import sys

LIBEMG_PYTHON_ENV = "NEUROHAND_LIBEMG_PYTHON"

# Measured on this project's workstation on 2026-11-28: a fresh Python 3.11 venv
# with `pip install libemg==2.0.3 pytest` (pytest is 4 of the distributions).
MEASURED_INSTALL = {
    "libemg_version": "2.0.3",
    "distributions": 72,
    "venv_bytes": 1033987071,
    "requires_numpy": "numpy<2.0",
    "measured": "2026-11-28, fresh Python 3.11 venv, pip install libemg==2.0.3 pytest",
}

# Prints what the LibEMG interpreter holds: prefix, numpy, distribution count, LibEMG's numpy pin.
_PROBE = """
import json, sys
from importlib.metadata import distributions, requires
import numpy
pins = [r for r in (requires('libemg') or []) if r.replace(' ', '').startswith('numpy')]
print(json.dumps({'prefix': sys.prefix, 'numpy': numpy.__version__, 'python': sys.version.split()[0],
                  'distributions': len(list(distributions())), 'requires_numpy': pins}))
"""


def libemg_python_from(option):
    """The LibEMG interpreter: ``option`` if given, else $NEUROHAND_LIBEMG_PYTHON, else None.

    Raises UsageError when the one given is not an executable file.
    """
    from neurohand.firmware_bridge.shared.errors import UsageError

    path = option or os.environ.get(LIBEMG_PYTHON_ENV) or None
    if path is None:
        return None
    where = "--libemg-python" if option else "${}".format(LIBEMG_PYTHON_ENV)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise UsageError("{} {!r} is not an executable file (give the python of a venv with libemg "
                         "installed, e.g. ~/libemg-venv/bin/python)".format(where, path))
    return path


def directory_bytes(path):
    """Total size in bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def _check_output(command, what):
    process = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if process.returncode != 0:
        tail = "\n".join(process.stderr.strip().splitlines()[-5:])
        raise RuntimeError("{} failed (exit {}): {}".format(what, process.returncode, tail))
    return process.stdout


def compare_in_venv(python, quick):
    """Run the LibEMG comparison with ``python`` (a LibEMG venv); returns its dict plus the venv's cost."""
    command = [python, "-m", "neurohand.deploy", "bench", "libemg", "--json"] + (["--quick"] if quick else [])
    output = _check_output(command, " ".join(command))
    try:
        result = json.loads(output)
    except ValueError as error:
        raise RuntimeError("{} printed no JSON document: {}".format(" ".join(command), error)) from error
    probe = json.loads(_check_output([python, "-c", _PROBE], "probing {}".format(python)))
    # Results are committed: name the venv, not its path on the measuring machine.
    venv_name = os.path.basename(os.path.normpath(probe["prefix"]))
    result["ran_in"] = "separate venv {} (Python {}, numpy {})".format(venv_name, probe["python"], probe["numpy"])
    result["install_cost"] = {
        "venv": venv_name, "venv_bytes": directory_bytes(probe["prefix"]),
        "distributions": probe["distributions"], "requires_numpy": probe["requires_numpy"],
        "numpy_in_venv": probe["numpy"],
        "explanation": "LibEMG pins {} and pulls {} distributions; measured in the venv it ran in".format(
            ", ".join(probe["requires_numpy"]) or "no numpy version", probe["distributions"]),
    }
    return result


def unavailable_cost(numpy_version):
    """Why LibEMG is not in this interpreter, with the measured install cost."""
    cost = dict(MEASURED_INSTALL)
    cost["numpy_here"] = numpy_version
    cost["explanation"] = (
        "LibEMG {libemg} requires {pin}, but this interpreter runs numpy {here} (the workstation constraints pin "
        "numpy 2.x for torch and onnxruntime), so it cannot share this venv; installed on its own it pulls {n} "
        "distributions, {gb:.2f} GB (measured {when}). Give a venv holding it with --libemg-python PATH or "
        "${env}; deploy/bench/libemg.py says how to make one.").format(
            libemg=cost["libemg_version"], pin=cost["requires_numpy"], here=numpy_version, n=cost["distributions"],
            gb=cost["venv_bytes"] / 1e9, when=cost["measured"], env=LIBEMG_PYTHON_ENV)
    return cost


def compare_with_libemg(quick, libemg_python):
    """The ``libemg`` part: in the given venv, in this interpreter, or why not (see the module docstring)."""
    from neurohand.deploy.bench import libemg as libemg_compare

    if libemg_python is not None:
        return compare_in_venv(libemg_python, quick)
    result = libemg_compare.run(quick)
    if result["libemg_importable"]:
        result["ran_in"] = "this interpreter ({})".format(sys.executable)
    else:
        import numpy
        result["install_cost"] = unavailable_cost(numpy.__version__)
    return result


def run(quick, libemg_python=None):
    """The ``features`` target: dsp_bench.run_features figures plus ``libemg`` (see the module docstring)."""
    from neurohand.deploy.bench import dsp as dsp_bench

    result = dsp_bench.run_features(quick)
    result["libemg"] = compare_with_libemg(quick, libemg_python)
    return result
