"""Collection protocols (deploy/collect/protocol.py): built-ins, the file format, one-line errors."""
import json

import pytest

from neurohand.deploy.collect.protocol import BUILTIN_NAMES, FINGERS, Protocol, load_protocol
from neurohand.firmware_bridge.shared.errors import UsageError

# NinaPro DB1 exercise 1 (Atzori et al. 2014): stimulus 1-12 in this order.
NINAPRO_E1 = ["index flexion", "index extension", "middle flexion", "middle extension", "ring flexion",
              "ring extension", "little finger flexion", "little finger extension", "thumb adduction",
              "thumb abduction", "thumb flexion", "thumb extension"]


def test_paper_protocol_is_five_fingers_pinch_tripod_fist_with_the_simulator_ids():
    from neurohand.firmware_bridge.virtual.movements import MOVEMENTS
    protocol = load_protocol("paper")
    names = [m.name for m in protocol.movements]
    assert names == ["thumb", "index", "middle", "ring", "little", "pinch", "tripod", "fist"]
    simulator = {name: (i, fingers) for i, name, fingers in MOVEMENTS}
    for movement in protocol.movements:
        movement_id, fingers = simulator[movement.name]
        assert movement.id == movement_id
        assert movement.posture == tuple(1.0 if f in fingers else 0.0 for f in FINGERS)
    assert protocol.n_trials == 80 and protocol.order == "random"


def test_ninapro_e1_has_the_twelve_finger_movements_as_recorded():
    protocol = load_protocol("ninapro-e1")
    assert [m.name for m in protocol.movements] == NINAPRO_E1
    assert [m.id for m in protocol.movements] == list(range(1, 13))
    assert (protocol.repetitions, protocol.hold_s, protocol.rest_s) == (10, 5.0, 3.0)
    assert protocol.blocks == "movement" and protocol.order == "fixed"
    flexion = protocol.movement(1).posture
    extension = protocol.movement(2).posture
    assert flexion[FINGERS.index("index")] == 1.0 and extension[FINGERS.index("index")] == 0.0
    assert flexion[FINGERS.index("middle")] == protocol.rest_posture[FINGERS.index("middle")] > 0


def test_every_builtin_round_trips_through_its_config():
    for name in BUILTIN_NAMES:
        protocol = load_protocol(name)
        again = Protocol.from_config(json.loads(json.dumps(protocol.to_config())))
        assert again.to_config() == protocol.to_config()


def test_a_minimal_file_gets_the_defaults(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"movements": [{"id": 3, "name": "point", "posture": {"index": 0.0, "thumb": 1}}],
                                "rest_posture": {"index": 0.5}}))
    protocol = load_protocol(str(path))
    assert protocol.repetitions == 10 and protocol.hold_s == 3.0 and protocol.calibration["poses"][:2] == [
        "open", "fist"]
    assert protocol.movements[0].posture == (1.0, 0.0, 0.0, 0.0, 0.0)
    assert protocol.rest_posture == (0.0, 0.5, 0.0, 0.0, 0.0)


BAD = [
    ({}, "movements: is missing"),
    ({"movements": []}, "movements: must be a non-empty list"),
    ({"movements": [{"id": 1, "name": "a", "posture": {"indx": 1}}]}, "movements[0].posture: unknown finger 'indx'; "
                                                                       "did you mean 'index'?"),
    ({"movements": [{"id": 1, "name": "a", "posture": {"index": 1.5}}]}, "movements[0].posture.index: must be at least"),
    ({"movements": [{"id": 0, "name": "a", "posture": {}}]}, "movements[0].id: must be between 1"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}, {"id": 1, "name": "b", "posture": {}}]},
     "movements[1].id: 1 is also the id of movements[0]"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}, {"id": 2, "name": "a", "posture": {}}]},
     "movements[1].name: 'a' is also the name"),
    ({"movements": [{"id": 1, "name": "a"}]}, "movements[0]: has no 'posture'"),
    ({"movements": [{"id": True, "name": "a", "posture": {}}]}, "movements[0].id: must be an integer"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "repetitons": 3}, "did you mean 'repetitions'?"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "hold_s": 0}, "hold_s: must be at least 0.2"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "rest_s": float("nan")}, "rest_s: must be a number"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "order": "shuffled"}, "order: must be one of"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "repetitions": 10 ** 6}, "repetitions: must be between"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "calibration": {"poses": ["fist"]}},
     "calibration.poses: must include 'open'"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "calibration": {"hold_s": 1, "settle_s": 1}},
     "calibration.settle_s: 1 s leaves nothing"),
    ({"movements": [{"id": 1, "name": "a", "posture": {}}], "format": "something"}, "format: must be"),
    ([1, 2], "must hold a JSON object"),
]


@pytest.mark.parametrize("config, message", BAD)
def test_a_bad_protocol_is_one_line_naming_the_field(tmp_path, config, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UsageError) as caught:
        load_protocol(str(path))
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert str(path) in text


def test_names_that_are_neither_builtin_nor_a_file(tmp_path):
    with pytest.raises(UsageError, match="neither a built-in protocol .* did you mean 'paper'"):
        load_protocol("papr")
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_protocol(str(path))
