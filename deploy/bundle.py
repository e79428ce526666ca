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
here unpickles: ``golden.npz`` is read with ``allow_pickle=False``.
"""
import hashlib
import json
import os
import platform
import shutil
import tempfile

import numpy as np

from neurohand.deploy.version import __version__
from neurohand.firmware_bridge.errors import BundleError, UsageError

BUNDLE_FORMAT = "neurohand-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL = "model.onnx"
CONFIG = "config.json"
GOLDEN = "golden.npz"
ENGINE = "model.plan"
BUNDLED_FILES = (MODEL, CONFIG, GOLDEN)

GOLDEN_SEQUENCES = 3
GOLDEN_STEPS = 100
GOLDEN_SEED = 20261128


def sha256_of(path, chunk_bytes=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    def engine_dir(self):
        return os.path.join(self.path, "engine")

    @property
    def engine_path(self):
        """Where ``neurohand build-engine`` stores this device's TensorRT engine."""
        return os.path.join(self.engine_dir, ENGINE)

    def engine_digest(self):
        """SHA-256 of the built engine as its metadata records it, or None without one."""
        try:
            with open(self.engine_path + ".json") as handle:
                return json.load(handle).get("engine_sha256")
        except (OSError, ValueError):
            return None

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
            with np.load(path, allow_pickle=False) as data:
                features = np.asarray(data["features"], dtype=np.float32)
                outputs = np.asarray(data["outputs"], dtype=np.float32)
        except (KeyError, ValueError, OSError) as exc:
            raise BundleError("golden vectors {!r} cannot be read: {}".format(path, exc)) from exc
        if features.ndim != 3 or outputs.ndim != 3 or features.shape[:2] != outputs.shape[:2]:
            raise BundleError("golden vectors {!r} have inconsistent shapes {} and {}".format(
                path, features.shape, outputs.shape))
        return features, outputs


def _read_json(path, what):
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as exc:
        raise BundleError("{} {!r} is not valid JSON: {}".format(what, path, exc)) from exc
    except OSError as exc:
        raise BundleError("{} {!r} cannot be read: {}".format(what, path, exc)) from exc


def verify_manifest(path):
    """Check every file listed in BUNDLE/manifest.json; return the manifest."""
    if not os.path.isdir(path):
        raise BundleError("bundle {!r} is not a directory".format(path))
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise BundleError("bundle {!r} has no {} (not a bundle, or an incomplete copy)".format(path, MANIFEST))
    manifest = _read_json(manifest_path, "bundle manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError("{!r} is not a neurohand bundle manifest".format(manifest_path))
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError("bundle {!r} has format version {!r}; this neurohand reads version {}".format(
            path, manifest.get("format_version"), BUNDLE_FORMAT_VERSION))
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(BUNDLED_FILES):
        raise BundleError("bundle manifest {!r} must list exactly {}".format(manifest_path, ", ".join(BUNDLED_FILES)))
    for name in BUNDLED_FILES:
        file_path = os.path.join(path, name)
        expected = files[name]
        if not os.path.isfile(file_path):
            raise BundleError("bundle file {!r} is missing".format(file_path))
        size = os.path.getsize(file_path)
        if size != expected.get("bytes"):
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
    return Bundle(path, manifest, config)


def _versions():
    versions = {"neurohand": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for module_name in ("torch", "onnx", "onnxruntime"):
        module = __import__("sys").modules.get(module_name)
        if module is not None:
            versions[module_name] = getattr(module, "__version__", "unknown")
    return versions


def make_golden_vectors(onnx_path, sequences=GOLDEN_SEQUENCES, steps=GOLDEN_STEPS, seed=GOLDEN_SEED):
    """Feature sequences and the numpy backend's stateful outputs for them.

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
        for index in range(sequences):
            state = backend.initial_state()
            for step in range(steps):
                outputs[index, step], state = backend.step(features[index, step], state)
        io_spec = {"n_features": int(backend.n_features), "n_outputs": int(backend.n_outputs)}
    finally:
        backend.close()
    return features, outputs, io_spec


def make_bundle(run_dir, out):
    """Build BUNDLE ``out`` from a training run directory; return the manifest.

    Written to a temporary directory beside ``out`` and renamed into place, so
    an interrupted build never leaves something that looks like a bundle.
    """
    run_dir = os.fspath(run_dir)
    out = os.fspath(out)
    for name in (MODEL, CONFIG):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise UsageError("run directory {!r} has no {} (is it the output of 'neurohand train'?)".format(run_dir, name))
    if os.path.exists(out):
        raise UsageError("output {!r} already exists; choose a new path or remove it".format(out))
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError("output directory {!r} does not exist".format(parent))

    config = _read_json(os.path.join(run_dir, CONFIG), "run config")
    staging = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        shutil.copyfile(os.path.join(run_dir, MODEL), os.path.join(staging, MODEL))
        features, outputs, io_spec = make_golden_vectors(os.path.join(staging, MODEL))
        config["io"] = io_spec
        with open(os.path.join(staging, CONFIG), "w") as handle:
            json.dump(config, handle, indent=1, sort_keys=True)
        with open(os.path.join(staging, GOLDEN), "wb") as handle:
            np.savez(handle, features=features, outputs=outputs)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "produced_by": _versions(),
            "io": io_spec,
            "files": {name: {"sha256": sha256_of(os.path.join(staging, name)),
                             "bytes": os.path.getsize(os.path.join(staging, name))}
                      for name in BUNDLED_FILES},
        }
        with open(os.path.join(staging, MANIFEST), "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
