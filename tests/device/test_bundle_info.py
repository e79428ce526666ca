"""What `neurohand bundle` says about the bundle it wrote: inputs, outputs and, with a class head, the classes;
and the class-binding example of docs/hand-protocol.md against such a bundle's classes."""
import os

import pytest

from neurohand.deploy.bundle import load_bundle
from neurohand.deploy.cli import main as cli
from neurohand.deploy.cli.bundle import describe_bundle
from neurohand.firmware_bridge.hands import keyboard
from neurohand.firmware_bridge.shared.errors import ConfigError

from spec_blocks import read_blocks
from test_class_runtime import RUN_DIR, class_run

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "hand-protocol.md")
# The names a run trained on NinaPro DB1 E1 gives its classes (train/dataset.py class_names_for), shortened.
NINAPRO_CLASSES = ["rest", "1", "2", "3"]


def bundle_lines(capsys, run, out):
    assert cli.main(["bundle", run, "--out", out]) in (0, None)
    return capsys.readouterr().out.splitlines()


def test_a_bundle_without_a_class_head_is_described_as_before(tmp_path, capsys):
    lines = bundle_lines(capsys, RUN_DIR, str(tmp_path / "plain"))
    manifest = load_bundle(str(tmp_path / "plain")).manifest
    assert "class_names" not in manifest["io"]
    assert lines == ["bundle written to {} ({} inputs -> {} outputs; files: {})".format(
        tmp_path / "plain", manifest["io"]["n_features"], manifest["io"]["n_outputs"],
        ", ".join(sorted(manifest["files"])))]


def test_a_class_head_bundle_names_its_classes_in_output_order(tmp_path, capsys):
    names = ["rest", "fist", "point"]
    out = str(tmp_path / "classes")
    lines = bundle_lines(capsys, class_run(tmp_path, [0.0, 1.0, 2.0], class_names=names), out)
    io_spec = load_bundle(out).manifest["io"]
    assert io_spec["class_names"] == names
    n_positions = io_spec["n_outputs"] - len(names)
    assert "-> {} outputs: {} finger positions, then 3 class scores;".format(io_spec["n_outputs"], n_positions) \
        in lines[0]
    assert lines[1:] == ["classes (in output order, index 0 first): rest, fist, point"]


def test_class_names_that_are_not_printable_are_escaped():
    manifest = {"io": {"n_features": 4, "n_outputs": 7, "class_names": ["rest", "a\x1b[2Jb", "ok"]},
                "files": {"model.onnx": "0"}}
    lines = describe_bundle("b", manifest)
    assert len(lines) == 2 and "\x1b" not in lines[1] and "'a\\x1b[2Jb'" in lines[1]
    assert "7 outputs: 4 finger positions, then 3 class scores" in lines[0]
    one = describe_bundle("b", {"io": {"n_features": 4, "n_outputs": 3, "class_names": ["rest", "a"]}, "files": {}})
    assert "3 outputs: 1 finger position, then 2 class scores" in one[0]


def test_the_docs_class_binding_example_parses_against_a_bundles_classes(tmp_path):
    (document,) = read_blocks(SPEC, "keys-mapping-classes")
    out = str(tmp_path / "bundle")
    cli.main(["bundle", class_run(tmp_path, [0.0, 0.0, 1.0, 0.0], class_names=NINAPRO_CLASSES), "--out", out])
    class_names = load_bundle(out).class_names
    bindings = keyboard.parse_mapping(document, 5, "docs", class_names)
    decided = {b.name: b.class_name for b in bindings if isinstance(b, keyboard.ClassBinding)}
    # "1" is a name, 2 an index (the class named "2" here), "rest" index 0.
    assert decided == {"jump": "1", "crouch": "2", "stand still": "rest"}
    assert [b.name for b in bindings if isinstance(b, keyboard.Binding)] == ["fire"]
    # What the docs say of a name and an index that differ: classes rest, 1, 3.
    gaps = ("rest", "1", "3")
    three = dict(document, bindings=[{"class": "3", "key": "KEY_A"}])
    assert keyboard.parse_mapping(three, 5, "docs", gaps)[0].class_index == 2
    with pytest.raises(ConfigError, match="unknown movement class 3; the bundle's classes are rest, 1, 3"):
        keyboard.parse_mapping(dict(document, bindings=[{"class": 3, "key": "KEY_A"}]), 5, "docs", gaps)
    with pytest.raises(ConfigError, match="no class head"):
        keyboard.parse_mapping(document, 5, "docs", ())
