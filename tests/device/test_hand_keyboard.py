"""Keyboard output: hysteresis, combinations and release on close, through a recording sink."""
import json
import os

import numpy as np
import pytest

from neurohand.firmware_bridge.shared.errors import ConfigError
from neurohand.firmware_bridge.hands import HandError, create_hand
from neurohand.firmware_bridge.hands import keyboard

from spec_blocks import read_blocks

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "hand-protocol.md")
#            thumb index middle ring little
OPEN = [0.0, 0.0, 0.0, 0.0, 0.0]


def write_mapping(tmp_path, document):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    return str(path)


@pytest.fixture
def doc_mapping(tmp_path):
    (document,) = read_blocks(SPEC, "keys-mapping")
    return write_mapping(tmp_path, document)


def keys_hand(path, n_outputs=5):
    sink = keyboard.RecordingKeySink()
    return create_hand("keys:" + path, n_outputs=n_outputs, sink=sink), sink


def actions(sink):
    return [(action, key) for _, action, key in sink.events]


def test_thumb_presses_forward_with_hysteresis(doc_mapping):
    hand, sink = keys_hand(doc_mapping)
    assert hand.keepalive_period_s is None
    for thumb in (0.3, 0.59, 0.6, 0.5, 0.41, 0.4, 0.39, 0.55, 0.61):
        hand.send(np.array([thumb, 0, 0, 0, 0]))
    # press at 0.6 (on), held down to 0.4 (off is "below 0.4"), released at 0.39, pressed again at 0.61
    assert actions(sink) == [("press", "KEY_W"), ("release", "KEY_W"), ("press", "KEY_W")]
    assert hand.pressed == ("KEY_W",)
    hand.close()
    assert actions(sink)[-1] == ("release", "KEY_W") and sink.closed


def test_fist_fires_and_releases_forward_first(doc_mapping):
    hand, sink = keys_hand(doc_mapping)
    hand.send(np.array([0.8, 0, 0, 0, 0]))        # thumb alone: walk
    hand.send(np.array([0.8, 0.8, 0.8, 0.8, 0.8]))  # fist: stop walking, fire
    hand.send(np.array([0.8, 0.8, 0.6, 0.8, 0.8]))  # middle eases to 0.6: still above off 0.5
    hand.send(np.array([0.8, 0.8, 0.45, 0.8, 0.8]))  # below off: fire released
    hand.send(np.array(OPEN))
    assert actions(sink) == [("press", "KEY_W"), ("release", "KEY_W"), ("press", "KEY_SPACE"),
                             ("release", "KEY_SPACE")]
    assert hand.counters["presses"] == 2 and hand.counters["releases"] == 2
    hand.close()
    assert actions(sink)[-1] == ("release", "KEY_SPACE")  # nothing extra: nothing was held


def test_unless_blocks_the_pinch_key(doc_mapping):
    hand, sink = keys_hand(doc_mapping)
    hand.send(np.array([0, 0.7, 0.7, 0.7, 0]))   # ring flexed: "use" (index+middle unless ring/little) blocked
    hand.send(np.array([0, 0.7, 0.7, 0.0, 0]))   # ring open: E pressed
    hand.send(np.array([0, 0.7, 0.7, 0.0, 0.65]))  # little flexes: E released
    assert actions(sink) == [("press", "KEY_E"), ("release", "KEY_E")]
    hand.close()


def test_shared_key_held_while_any_binding_holds_it(tmp_path):
    path = write_mapping(tmp_path, {"format": "neurohand-keys", "version": 1, "bindings": [
        {"fingers": ["thumb"], "on": 0.5, "off": 0.3, "key": "KEY_A"},
        {"fingers": ["index"], "on": 0.5, "off": 0.3, "key": "KEY_A"}]})
    hand, sink = keys_hand(path)
    for positions in ([0.6, 0, 0, 0, 0], [0.6, 0.6, 0, 0, 0], [0.0, 0.6, 0, 0, 0], [0, 0, 0, 0, 0]):
        hand.send(np.array(positions))
    assert actions(sink) == [("press", "KEY_A"), ("release", "KEY_A")]


def test_sixth_output_name_and_non_finite_refused(tmp_path):
    path = write_mapping(tmp_path, {"format": "neurohand-keys", "version": 1, "bindings": [
        {"fingers": ["thumb_rotation"], "on": 0.5, "off": 0.3, "key": "KEY_Q"}]})
    hand, sink = keys_hand(path, n_outputs=6)
    with pytest.raises(HandError):
        hand.send(np.array([0, 0, 0, 0, 0, np.nan]))
    hand.send(np.array([0, 0, 0, 0, 0, 0.9]))
    assert actions(sink) == [("press", "KEY_Q")]
    with pytest.raises(ConfigError, match="thumb_rotation"):
        keys_hand(path, n_outputs=5)


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "format"),
    ({"version": 2}, "version"),
    ({"bindings": []}, "bindings"),
    ({"bindings": [{"fingers": ["thumbs"], "on": 0.6, "off": 0.4, "key": "KEY_W"}]}, "did you|unknown finger"),
    ({"bindings": [{"fingers": ["thumb"], "on": 0.4, "off": 0.6, "key": "KEY_W"}]}, "below"),
    ({"bindings": [{"fingers": ["thumb"], "on": 1.5, "off": 0.4, "key": "KEY_W"}]}, "0..1"),
    ({"bindings": [{"fingers": ["thumb"], "on": 0.6, "off": 0.4, "key": "w"}]}, "key name"),
    ({"bindings": [{"fingers": ["thumb"], "on": 0.6, "off": 0.4, "key": "KEY_W", "of": 1}]}, "unknown field"),
    ({"bindings": [{"fingers": ["thumb"], "unless": ["thumb"], "on": 0.6, "off": 0.4, "key": "KEY_W"}]}, "both"),
])
def test_bad_mappings_name_the_problem(tmp_path, change, message):
    document = {"format": "neurohand-keys", "version": 1,
                "bindings": [{"fingers": ["thumb"], "on": 0.6, "off": 0.4, "key": "KEY_W"}]}
    document.update(change)
    with pytest.raises(ConfigError, match=message):
        keys_hand(write_mapping(tmp_path, document))


def test_unreadable_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        keys_hand(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        keys_hand(str(broken))


def test_uinput_without_evdev_is_a_clear_error(doc_mapping):
    try:
        import evdev  # noqa: F401
    except ImportError:
        with pytest.raises(HandError, match="evdev"):
            create_hand("keys:" + doc_mapping)
    else:
        pytest.skip("python-evdev is installed here; the missing-module message cannot be shown")
