"""The dependency rule of the source tree (README, "Layout"), checked on every import.

Layers, lowest first; a module may import from its own layer and the ones
below, never from a higher one, and no two packages import each other::

    shared      firmware_bridge/shared: errors, argument checks, atomic writes, backoff
    bridge      firmware_bridge: the serial link, the chip, the hands, the recording format
    virtual     firmware_bridge/virtual: simulator, virtual chip and hand (bench only)
    decoder     decoder: DSP, features, pipeline, inference backends
    runtime     deploy/runtime: the real-time loop
    product     deploy: bundles, self-test, the run session, replay, flashing
    train       train: the torch model, training, evaluation, importers, export
    top         deploy/cli, deploy/bench, deploy/demo: what a user starts

Every import counts, also one inside a function.  Which modules
``neurohand run`` really loads is checked on ``sys.modules`` in
test_run_replay.py.
"""
import ast
import importlib
import os

import pytest

PACKAGES = ("firmware_bridge", "decoder", "train", "deploy")

# (layer, module prefixes); a module belongs to the layer of its longest matching prefix.
LAYERS = (
    ("shared", ("neurohand.firmware_bridge.shared",)),
    ("bridge", ("neurohand.firmware_bridge",)),
    ("virtual", ("neurohand.firmware_bridge.virtual",)),
    ("decoder", ("neurohand.decoder",)),
    ("runtime", ("neurohand.deploy.runtime", "neurohand.deploy.version")),
    ("product", ("neurohand.deploy",)),
    ("train", ("neurohand.train",)),
    ("top", ("neurohand.deploy.cli", "neurohand.deploy.bench", "neurohand.deploy.demo",
             "neurohand.deploy.__main__")),
)
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
# Libraries the device never has, and where they may be imported.
WORKSTATION_LIBRARIES = ("torch", "scipy", "matplotlib", "onnx", "tqdm", "pynwb", "hdmf", "h5py", "nwbinspector", "pyxdf", "mne")
WORKSTATION_LAYERS = ("train", "top")
# Where scipy may appear below those: filter design (run on the workstation when a pipeline is made).
SCIPY_ALLOWED = ("neurohand.decoder.filter_design",)


def layer_of(module):
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (name, len(prefix))
    return best[0] if best else None


def package_of(module, modules):
    """The package a module lives in (``...chip.parser`` -> ``...chip``; a package's __init__ is the package)."""
    if modules[module].endswith("__init__.py"):
        return module
    return module.rsplit(".", 1)[0]


def source_modules():
    """{module name: file path} of every module of the four packages, as installed."""
    modules = {}
    for package in PACKAGES:
        root = importlib.import_module("neurohand." + package).__path__[0]
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(folder, filename), root)[:-3].replace(os.sep, ".")
                name = "neurohand.{}.{}".format(package, relative)
                if name.endswith(".__init__"):
                    name = name[:-len(".__init__")]
                modules[name] = os.path.join(folder, filename)
    return modules


def imports_of(module, path):
    """Absolute names of everything ``module`` imports (module or package level, relative resolved)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            # "from package import module" imports that module.
            for alias in node.names:
                found.add("{}.{}".format(target, alias.name))
    return found


@pytest.fixture(scope="module")
def graph():
    modules = source_modules()
    edges = {}
    for module, path in modules.items():
        edges[module] = {name for name in imports_of(module, path)
                         if name in modules or name.split(".")[0] in WORKSTATION_LIBRARIES}
    return modules, edges


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    assert len(modules) > 60
    assert [m for m in modules if layer_of(m) is None] == []


def test_no_module_imports_from_a_higher_layer(graph):
    _, edges = graph
    upward = ["{} ({}) imports {} ({})".format(module, layer_of(module), target, layer_of(target))
              for module, targets in sorted(edges.items()) for target in sorted(targets)
              if target.startswith("neurohand.") and RANK[layer_of(target)] > RANK[layer_of(module)]]
    assert upward == []


def test_workstation_libraries_stay_on_the_workstation(graph):
    _, edges = graph
    found = ["{} imports {}".format(module, target)
             for module, targets in sorted(edges.items()) for target in sorted(targets)
             if target.split(".")[0] in WORKSTATION_LIBRARIES and layer_of(module) not in WORKSTATION_LAYERS
             and not (target.split(".")[0] == "scipy" and module in SCIPY_ALLOWED)]
    assert found == []


def test_no_two_packages_import_each_other(graph):
    modules, edges = graph
    depends = {}
    for module, targets in edges.items():
        if module.endswith(".__main__"):
            continue    # ``python -m neurohand.deploy``: an entry point, imported by nobody
        for target in targets:
            if not target.startswith("neurohand."):
                continue
            source, destination = package_of(module, modules), package_of(target, modules)
            # A module importing its own parent package (its __init__) is not a second package.
            parent_init = modules[target].endswith("__init__.py") and source.startswith(target + ".")
            if source != destination and not parent_init:
                depends.setdefault(source, set()).add(destination)
    cycles = []
    for start in sorted(depends):
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in depends.get(node, ()):
                if nxt == start and len(path) > 1:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert cycles == []


def test_the_rule_catches_an_upward_import(tmp_path):
    # The scan itself: a decoder module importing the trainer is reported.
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from neurohand.train import trainer\n")
    found = imports_of("neurohand.decoder.bad", str(path))
    assert "neurohand.train.trainer" in found
    assert RANK[layer_of("neurohand.train.trainer")] > RANK[layer_of("neurohand.decoder.bad")]
    assert layer_of("neurohand.deploy.cli.run") == "top" and layer_of("neurohand.deploy.runtime.fast") == "runtime"
