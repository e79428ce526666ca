"""Deploy bundles: a self-contained, verified directory a Jetson runs from.

Layout of BUNDLE/::

    manifest.json   format, versions that produced it, SHA-256 and size of every file below
    model.onnx      the exported decoder (one stateful step per call)
    config.json     DSP, features, normalisation, model and the I/O spec
    golden.npz      golden vectors: feature sequences and the numpy backend's outputs
    engine/         added on the device by ``neurohand build-engine`` (not in the manifest)
    selftest/       added on the device by ``neurohand selftest`` (not in the manifest)

Every load verifies the manifest before anything is parsed; a modified,
truncated or missing file is refused with a ``BundleError`` naming it.  Nothing
here unpickles: ``golden.npz`` is read member by member as plain numeric .npy
data, its sizes checked before anything is allocated.
"""
import io
import json
import os
import platform
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib

import numpy as np

from neurohand.deploy.version import __version__
from neurohand.firmware_bridge.shared.checks import load_json_file
from neurohand.firmware_bridge.shared.digest import sha256_of
from neurohand.firmware_bridge.shared.errors import BundleError, UsageError
from neurohand.firmware_bridge.shared.outputs import check_output_path

BUNDLE_FORMAT = "neurohand-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
CONFIG = "config.json"
GOLDEN = "golden.npz"
ENGINE = "model.plan"
#: The same model step without a GRU/LSTM node, for TensorRT 8.x (train/export.py: export_plain_onnx);
#: bundled where the training run wrote it.
PLAIN_MODEL = "model_plain.onnx"
BUNDLED_FILES = (MODEL, CONFIG, GOLDEN)
OPTIONAL_FILES = (PLAIN_MODEL,)

GOLDEN_SEQUENCES = 3
# 250 steps = 5 s at the default 20 ms stride: long enough for a reduced-precision (FP16) engine's
# error to build up through the recurrence, where it would show.
GOLDEN_STEPS = 250
GOLDEN_SEED = 20261128
# The least a self-test accepts as proof: bundles made before GOLDEN_STEPS was
# 250 hold 3 sequences of 100 steps and still self-test; fewer (down to zero
# steps, which compares nothing and "passes") is refused as no test at all.
MIN_GOLDEN_SEQUENCES = 2
MIN_GOLDEN_STEPS = 100
# golden.npz holds 3 x 250 steps of features and outputs (tens of kB); a member
# declaring more than this is damage, refused before it is read.
MAX_GOLDEN_MEMBER_BYTES = 64 << 20
# What reading a damaged zip can raise (zipfile reports most damage as
# BadZipFile, but not all: an unknown compression method, a cut deflate stream,
# an "encrypted" flag bit ...).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, OSError, EOFError,
               NotImplementedError, RuntimeError, struct.error, zlib.error)


class Bundle(object):
    """A verified bundle on disk.  Construct with :func:`load_bundle`."""

    def __init__(self, path, manifest, config):
        self.path = path
        self.manifest = manifest
        self.config = config

    @property
    def model_path(self):
        return os.path.join(self.path, MODEL)

    @property
    def io(self):
        """(n_features, n_outputs) of the model as the manifest records it; (None, None) if it does not."""
        io_spec = self.manifest.get("io")
        if io_spec is None:
            return None, None
        return io_spec["n_features"], io_spec["n_outputs"]

    @property
    def class_names(self):
        """The movement classes of the model's class head as the manifest records them (() without one)."""
        io_spec = self.manifest.get("io")
        return tuple(io_spec.get("class_names") or ()) if isinstance(io_spec, dict) else ()

    @property
    def label_names(self):
        """The names of the outputs (config.json labels.names), or None in a bundle without them."""
        labels = self.config.get("labels")
        names = labels.get("names") if isinstance(labels, dict) else None
        return None if names is None else [str(name) for name in names]

    @property
    def plain_model_path(self):
        """The loop-free export, or None in a bundle without one."""
        return os.path.join(self.path, PLAIN_MODEL) if PLAIN_MODEL in self.manifest["files"] else None

    @property
    def engine_dir(self):
        return os.path.join(self.path, "engine")

    @property
    def engine_path(self):
        """Where ``neurohand build-engine`` stores this device's TensorRT engine."""
        return os.path.join(self.engine_dir, ENGINE)

    def engine_digest(self):
        """SHA-256 of the built engine as its metadata records it, or None without one."""
        try:
            metadata = load_json_file(self.engine_path + ".json", "engine metadata", error=BundleError)
        except BundleError:
            return None
        return metadata.get("engine_sha256")

    @property
    def selftest_dir(self):
        return os.path.join(self.path, "selftest")

    @property
    def digest(self):
        """SHA-256 of the manifest: names this exact bundle content."""
        return sha256_of(os.path.join(self.path, MANIFEST))

    def golden_vectors(self):
        """Return (features, outputs): float32 arrays (n_seq, n_steps, n_features|n_outputs)."""
        path = os.path.join(self.path, GOLDEN)
        try:
            arrays = _read_npz(path, ("features", "outputs"))
        except _ZIP_ERRORS as exc:
            raise BundleError("golden vectors {!r} cannot be read: {}".format(
                path, str(exc) or type(exc).__name__)) from exc
        features = arrays["features"].astype(np.float32)
        outputs = arrays["outputs"].astype(np.float32)
        if features.ndim != 3 or outputs.ndim != 3 or features.shape[:2] != outputs.shape[:2]:
            raise BundleError("golden vectors {!r} have inconsistent shapes {} and {}".format(
                path, features.shape, outputs.shape))
        return features, outputs

    def golden_states(self):
        """The reference recurrent state at the end of each golden sequence, float32
        (n_seq, n_state_arrays, layers, 1, hidden); None in a bundle made before they were kept."""
        path = os.path.join(self.path, GOLDEN)
        try:
            arrays = _read_npz(path, (), optional=("states",))
        except _ZIP_ERRORS as exc:
            raise BundleError("golden vectors {!r} cannot be read: {}".format(
                path, str(exc) or type(exc).__name__)) from exc
        states = arrays.get("states")
        if states is not None and states.ndim != 5:
            raise BundleError("golden states in {!r} have the impossible shape {}".format(path, states.shape))
        return None if states is None else states.astype(np.float32)


def open_bundle_backend(bundle, backend_name):
    """Create the backend a bundle runs on; TensorRT uses the bundle's engine.

    The opened model must take and give what the bundle says (its I/O spec and
    one output per label): a model giving more or fewer outputs than the hand
    has fingers would drive the wrong joints, whatever the backend.
    """
    from neurohand.decoder.backends import create_backend
    path = bundle.engine_path
    fp16 = False
    if os.path.isfile(path + ".json"):
        fp16 = bool(load_json_file(path + ".json", "TensorRT engine metadata", error=BundleError).get("fp16"))
    if backend_name in ("tensorrt", "auto"):
        backend = create_backend(backend_name, bundle.model_path, engine_path=path, fp16=fp16)
    else:
        backend, fp16 = create_backend(backend_name, bundle.model_path), False
    try:
        check_backend_io(bundle, backend)
    except BaseException:
        backend.close()
        raise
    return backend, fp16


def check_backend_io(bundle, backend):
    """BundleError unless ``backend`` takes the bundle's features and gives one output per label."""
    n_features, n_outputs = bundle.io
    labels = bundle.label_names
    if n_features is not None and int(backend.n_features) != n_features:
        raise BundleError("bundle {!r}: the {} backend's model takes {} features, the bundle says {}".format(
            bundle.path, backend.name, backend.n_features, n_features))
    if n_outputs is not None and int(backend.n_outputs) != n_outputs:
        raise BundleError("bundle {!r}: the {} backend's model gives {} outputs, the bundle says {}".format(
            bundle.path, backend.name, backend.n_outputs, n_outputs))
    class_names = tuple(getattr(backend, "class_names", ()) or ())
    if n_outputs is not None and class_names != bundle.class_names:
        raise BundleError("bundle {!r}: the {} backend's model has the movement classes {}, the bundle says {}".format(
            bundle.path, backend.name, list(class_names) or "none", list(bundle.class_names) or "none"))
    n_positions = int(backend.n_outputs) - len(class_names)
    if labels is not None and n_positions != len(labels):
        raise BundleError("bundle {!r}: the model gives {} finger positions but the bundle has {} labels ({}); "
                          "it was not trained for these labels".format(
                              bundle.path, n_positions, len(labels), ", ".join(labels)))


def _read_npz(path, names, optional=()):
    """Arrays ``names`` of the .npz archive at ``path``, as a dict name -> ndarray.

    Not ``np.load``: on a damaged archive its NpzFile leaks the open file (and
    numpy 1.19 prints an error from ``NpzFile.__del__``).  Each member is read
    whole (the zip CRC is checked) and must be a numeric .npy whose header
    shape matches its data size, so a damaged header cannot make us allocate.
    Raises one of ``_ZIP_ERRORS`` (ValueError for anything found here).
    """
    arrays = {}
    with open(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
        present = set(archive.namelist())
        for name in tuple(names) + tuple(n for n in optional if n + ".npy" in present):
            info = archive.getinfo(name + ".npy")
            if info.file_size > MAX_GOLDEN_MEMBER_BYTES:
                raise ValueError("{}.npy declares {} bytes (at most {})".format(
                    name, info.file_size, MAX_GOLDEN_MEMBER_BYTES))
            arrays[name] = _npy_from_bytes(archive.read(info), name)
    return arrays


def _npy_from_bytes(data, name):
    """Parse a numeric .npy file held in ``data`` (bytes); ValueError if it is not one."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError("unsupported .npy version {}".format(version))
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ValueError("{}.npy has no valid .npy header: {}".format(name, exc)) from None
    if dtype.hasobject or dtype.kind not in "fiu":
        raise ValueError("{}.npy holds {} data, not numbers".format(name, dtype))
    count = 1
    for size in shape:
        count *= size
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("{}.npy holds {} bytes of data for shape {} of {}".format(
            name, len(data) - offset, shape, dtype))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _read_json(path, what):
    """A JSON object from ``path``; BundleError naming ``what`` and the path otherwise."""
    return load_json_file(path, what, error=BundleError)


def refuse_links(path):
    """BundleError if anything inside the bundle directory ``path`` is a symbolic link or not a file/folder.

    A link inside a bundle points at a file the manifest does not cover (read
    as if it were the bundle's), or at one a write (engine, self-test record)
    would then land on; copied to a device it dangles.  ``path`` itself may be
    a link (the device's ``current`` is one).
    """
    for folder, folders, files in os.walk(path, onerror=_raise_walk_error):
        for name in sorted(folders + files):
            entry = os.path.join(folder, name)
            try:
                mode = os.lstat(entry).st_mode
            except OSError as exc:
                raise BundleError("bundle {!r}: cannot inspect {!r}: {}".format(path, entry, exc.strerror)) from None
            if stat.S_ISLNK(mode):
                raise BundleError("bundle {!r} holds a symbolic link {!r}; a bundle holds only its own files "
                                  "(copy the file itself there)".format(path, os.path.relpath(entry, path)))
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError("bundle {!r} holds {!r}, which is neither a file nor a folder".format(
                    path, os.path.relpath(entry, path)))


def _raise_walk_error(exc):
    raise BundleError("bundle folder {!r} cannot be listed: {}".format(exc.filename, exc.strerror))


def verify_manifest(path):
    """Check every file listed in BUNDLE/manifest.json; return the manifest."""
    if not os.path.isdir(path):
        raise BundleError("bundle {!r} is not a directory".format(path))
    refuse_links(path)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise BundleError("bundle {!r} has no {} (not a bundle, or an incomplete copy)".format(path, MANIFEST))
    manifest = _read_json(manifest_path, "bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError("{!r} is not a neurohand bundle manifest".format(manifest_path))
    version = manifest.get("format_version")
    # bool is an int in Python (True == 1), and 1.0 == 1: both are refused.
    if type(version) is not int or version != BUNDLE_FORMAT_VERSION:
        raise BundleError("bundle {!r} has format version {!r}; this neurohand reads version {}".format(
            path, manifest.get("format_version"), BUNDLE_FORMAT_VERSION))
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(BUNDLED_FILES) <= set(files) <= set(BUNDLED_FILES + OPTIONAL_FILES):
        raise BundleError("bundle manifest {!r} must list exactly {} (and {} where the run has it)".format(
            manifest_path, ", ".join(BUNDLED_FILES), ", ".join(OPTIONAL_FILES)))
    for name in sorted(files):
        file_path = os.path.join(path, name)
        expected = files[name]
        if not isinstance(expected, dict):
            raise BundleError("bundle manifest {!r}: the entry of {} must be an object with sha256 and bytes, "
                              "but got {!r}".format(manifest_path, name, expected))
        if not os.path.isfile(file_path):
            raise BundleError("bundle file {!r} is missing".format(file_path))
        size = os.path.getsize(file_path)
        declared = expected.get("bytes")
        if type(declared) is not int or size != declared:
            raise BundleError("bundle file {!r} has {} bytes, the manifest says {} (truncated or modified)".format(
                file_path, size, expected.get("bytes")))
        if sha256_of(file_path) != expected.get("sha256"):
            raise BundleError("bundle file {!r} does not match its SHA-256 in the manifest (modified)".format(file_path))
    return manifest


def load_bundle(path):
    """Verify and open a bundle; raise BundleError naming the first bad file."""
    path = os.fspath(path)
    manifest = verify_manifest(path)
    config = _read_json(os.path.join(path, CONFIG), "bundle config")
    _check_io_spec(path, manifest, config)
    return Bundle(path, manifest, config)


def _positive_int(value):
    return type(value) is int and value > 0


def _check_io_spec(path, manifest, config, what="bundle"):
    """BundleError unless the manifest's I/O spec, config.json's and the labels agree."""
    io_spec = manifest.get("io")
    if io_spec is not None and not (isinstance(io_spec, dict) and _positive_int(io_spec.get("n_features"))
                                    and _positive_int(io_spec.get("n_outputs"))):
        raise BundleError("bundle manifest {!r}: io must be an object with positive integers n_features and "
                          "n_outputs, but got {!r}".format(os.path.join(path, MANIFEST), io_spec))
    classes = io_spec.get("class_names", []) if io_spec is not None else []
    if not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes) and (not classes or 2 <= len(classes) < io_spec["n_outputs"])):
        raise BundleError("bundle manifest {!r}: io class_names must be a list of at least 2 distinct names, fewer "
                          "than the outputs, but got {!r}".format(os.path.join(path, MANIFEST), classes))
    if io_spec is not None and "io" in config and config["io"] != io_spec:
        raise BundleError("{} {!r}: config.json's io {!r} differs from the manifest's {!r}".format(
            what, path, config["io"], io_spec))
    labels = config.get("labels")
    if labels is None:
        return
    names = labels.get("names") if isinstance(labels, dict) else None
    if not isinstance(labels, dict) or (names is not None and not (
            isinstance(names, list) and names and all(isinstance(name, str) for name in names))):
        raise BundleError("{} {!r}: config.json labels must be an object whose names is a list of "
                          "strings, but got {!r}".format(what, path, labels))
    # The labels name the finger positions: the outputs before the class scores.
    n_positions = None if io_spec is None else io_spec["n_outputs"] - len(classes)
    if names is not None and io_spec is not None and len(names) != n_positions:
        raise BundleError("{} {!r}: the model gives {} {} but there are {} labels ({}); it was "
                          "not trained for these labels".format(
                              what, path, n_positions, "finger positions" if classes else "outputs", len(names),
                              ", ".join(names)))


def _versions():
    versions = {"neurohand": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module_name in ("torch", "onnx", "onnxruntime"):
        module = __import__("sys").modules.get(module_name)
        if module is not None:
            versions[module_name] = getattr(module, "__version__", "unknown")
    return versions


def make_golden_vectors(onnx_path, sequences=GOLDEN_SEQUENCES, steps=GOLDEN_STEPS, seed=GOLDEN_SEED):
    """Feature sequences, the numpy backend's stateful outputs for them, and its final states.

    Normalised features are roughly standard normal, so the sequences are
    seeded standard-normal draws (plus one all-zero sequence, the rest input).
    """
    from neurohand.decoder.backends import create_backend
    backend = create_backend("numpy", onnx_path)
    try:
        rng = np.random.RandomState(seed)
        features = rng.standard_normal((sequences, steps, backend.n_features)).astype(np.float32)
        features[0] = 0.0
        outputs = np.empty((sequences, steps, backend.n_outputs), dtype=np.float32)
        finals = []
        for index in range(sequences):
            state = backend.initial_state()
            for step in range(steps):
                outputs[index, step], state = backend.step(features[index, step], state)
            finals.append(np.stack([np.asarray(a, dtype=np.float32) for a in backend.state_arrays(state)]))
        states = np.stack(finals)
        io_spec = {"n_features": int(backend.n_features), "n_outputs": int(backend.n_outputs)}
        if backend.class_names:
            # The outputs after the positions are class scores (onnx_weights.RnnWeights); kept out of
            # the spec without a head, so such bundles read as they always did.
            io_spec["class_names"] = list(backend.class_names)
    finally:
        backend.close()
    return features, outputs, states, io_spec


def make_bundle(run_dir, out, force=False):
    """Build BUNDLE ``out`` from a training run directory; return the manifest.

    Written as :func:`write_bundle` writes every bundle: ``out`` may exist as
    an empty directory; a non-empty one is replaced only with ``force`` and
    only if it is a bundle itself, never when the run directory is inside it.
    """
    run_dir = os.fspath(run_dir)
    for name in (MODEL, CONFIG):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UsageError("run directory {!r} has no {} (is it the output of 'neurohand train'?)".format(run_dir, name))
    files = {MODEL: os.path.join(run_dir, MODEL)}
    if os.path.isfile(os.path.join(run_dir, PLAIN_MODEL)):
        files[PLAIN_MODEL] = os.path.join(run_dir, PLAIN_MODEL)
    return write_bundle(files, lambda: _read_json(os.path.join(run_dir, CONFIG), "run config"), out,
                        ("run directory", run_dir), force=force)


def check_bundle_output(out, source, inputs=(), force=False):
    """Check ``out`` may become a bundle made from ``source``; return True if it replaces an existing bundle.

    source : (noun, path) of what the bundle is made from (``("run directory",
        RUN)``, ``("bundle", OLD)``); ``out`` may be neither it nor inside it,
        nor (replacing) hold it.
    inputs : further paths the command reads (same rule).
    An existing non-empty ``out`` is replaced only with ``force`` and only if
    it is a bundle (``--force`` must not delete a folder of something else
    given by mistake).  UsageError (one line) otherwise.
    """
    noun, source_path = source
    check_output_path("--out", out, inputs=(source_path,) + tuple(inputs), force=force, directory=True)
    replacing = os.path.isdir(out) and bool(os.listdir(out))
    if replacing:
        real_out = os.path.realpath(out)
        for path, what in [(source_path, noun)] + [(path, "input") for path in inputs]:
            if path is not None and os.path.realpath(path).startswith(real_out.rstrip(os.sep) + os.sep):
                raise UsageError("--out {!r} holds the {} {!r}; replacing it would delete the {}".format(
                    out, what, path, what.split()[0]))
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            raise UsageError("--out {!r} exists and is not a bundle (it has no {}); --force replaces only a "
                             "bundle: choose a new path".format(out, MANIFEST))
    return replacing


def write_bundle(files, config, out, source, force=False, inputs=(), check=None):
    """Write BUNDLE ``out``: the model files, config.json, golden vectors, manifest; return the manifest.

    The one way a bundle is written (``neurohand bundle``, ``neurohand recalibrate``).

    files : dict, bundle file name (:data:`MODEL`, optionally
        :data:`PLAIN_MODEL`) -> a path to copy, or bytes to write
    config : dict for config.json (its ``io`` is set from the model), or a
        function returning it, called after the output checks
    source : (noun, path) of what the bundle is made from, for the output
        rules of :func:`check_bundle_output`; inputs: further paths read
    check : None, or ``check(staging_path)`` called once the complete bundle
        is written to its staging directory, before it moves into place; any
        exception it raises leaves nothing behind and replaces nothing
        (``recalibrate`` self-tests the new bundle there)

    Written to a temporary directory beside ``out`` and renamed into place, so
    an interrupted build never leaves something that looks like a bundle.
    Golden vectors come from the numpy backend (no ONNX Runtime needed).
    """
    out = os.fspath(out)
    if MODEL not in files or not set(files) <= set((MODEL, PLAIN_MODEL)):
        raise ValueError("files must hold {} (and {} at most), not {}".format(MODEL, PLAIN_MODEL, sorted(files)))
    replacing = check_bundle_output(out, source, inputs=inputs, force=force)
    parent = os.path.dirname(os.path.abspath(out))

    config = config() if callable(config) else dict(config)
    staging = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        bundled = list(BUNDLED_FILES)
        for name in (MODEL, PLAIN_MODEL):
            if name not in files:
                continue
            if isinstance(files[name], bytes):
                with open(os.path.join(staging, name), "wb") as handle:
                    handle.write(files[name])
            else:
                shutil.copyfile(files[name], os.path.join(staging, name))
            if name == PLAIN_MODEL:
                bundled.append(PLAIN_MODEL)
        features, outputs, states, io_spec = make_golden_vectors(os.path.join(staging, MODEL))
        config["io"] = io_spec
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "produced_by": _versions(),
            "io": io_spec,
        }
        _check_io_spec(source[1], manifest, config, what=source[0])
        with open(os.path.join(staging, CONFIG), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=1, sort_keys=True)
        with open(os.path.join(staging, GOLDEN), "wb") as handle:
            np.savez(handle, features=features, outputs=outputs, states=states)
        manifest["files"] = {name: {"sha256": sha256_of(os.path.join(staging, name)),
                                    "bytes": os.path.getsize(os.path.join(staging, name))}
                             for name in bundled}
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        if check is not None:
            check(staging)
        _move_into_place(staging, out, replacing)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _move_into_place(staging, out, replacing):
    """Rename ``staging`` to ``out``; an existing bundle there is moved aside first, then removed."""
    if not replacing:
        os.rename(staging, out)          # over an empty directory too
        return
    old = tempfile.mkdtemp(prefix=".bundle-old-", dir=os.path.dirname(os.path.abspath(out)))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
