"""The driver registry, the 'none' driver and the virtual-hand command line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError
from neurohand.firmware_bridge.hands import HAND_DRIVERS, HandError, create_hand, parse_hand_spec
from neurohand.firmware_bridge.hands import neurohand_protocol as nhp
from neurohand.firmware_bridge.hands.base import HandDriver


def test_registry_is_explicit():
    assert sorted(HAND_DRIVERS) == ["keys", "neurohand", "none", "psyonic"]
    assert all(issubclass(cls, HandDriver) for cls in HAND_DRIVERS.values())
    assert issubclass(HandError, NeurohandError)


@pytest.mark.parametrize("spec, expected", [
    ("psyonic:/dev/ttyUSB0", ("psyonic", "/dev/ttyUSB0")),
    ("neurohand:loop://", ("neurohand", "loop://")),
    ("keys:mapping.json", ("keys", "mapping.json")),
    ("none", ("none", None))])
def test_spec_parsing(spec, expected):
    assert parse_hand_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("psyonc:/dev/ttyUSB0", "did you mean 'psyonic'"), ("psyonic", "needs a target"),
    ("psyonic:", "needs a target"), ("none:x", "no target"), ("", "NAME:TARGET")])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        create_hand(spec)


def test_none_driver_validates_and_counts():
    hand = create_hand("none", n_outputs=6)
    hand.send(np.linspace(0, 1, 6))
    with pytest.raises(HandError, match="index 2"):
        hand.send(np.array([0, 0, np.nan, 0, 0, 0]))
    assert hand.counters["frames_sent"] == 1 and hand.counters["refused"] == 1
    assert hand.keepalive_period_s is None and hand.poll_telemetry() is None
    hand.keepalive()
    assert hand.counters["frames_sent"] == 2
    hand.close()


def test_keepalive_before_first_send_sends_nothing():
    hand = create_hand("none")
    hand.keepalive()
    assert hand.counters["frames_sent"] == 0


def test_loop_url_works_only_where_code_allows_it():
    from neurohand.firmware_bridge.link import allow_url_schemes
    with allow_url_schemes("loop"):
        with create_hand("neurohand:loop://") as hand:
            hand.send(np.full(5, 0.5))
            assert hand.counters["frames_sent"] == 1
    with pytest.raises(UsageError, match="pyserial URL"):
        create_hand("neurohand:loop://")


# -- command line ------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "virtual-hand"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=30)


def test_help_explains_every_option():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--protocol", "--port", "--log", "--keepalive-timeout", "--no-stuffing"):
        assert option in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--protocol", "psyonc"], "did you mean 'psyonic'"),
    (["--protocol", "neurohand", "--keepalive-timeout", "0"], "greater than 0"),
    (["--protocol", "neurohand", "--keepalive-timeout", "soon"], "number of seconds"),
    (["--protocol", "neurohand", "--no-stuffing"], "psyonic only"),
    (["--protocol", "neurohand", "--log", "/no/such/dir/log.jsonl"], "does not exist"),
    (["--protocol", "neurohand", "--port", "/no/such/dir/hand"], "does not exist")])
def test_bad_values_one_line_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_flag_exit_2_without_traceback():
    result = run_cli("--protocol", "neurohand", "--bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_port_refuses_to_replace_a_regular_file(tmp_path):
    existing = tmp_path / "hand"
    existing.write_text("keep me")
    result = run_cli("--protocol", "neurohand", "--port", str(existing))
    assert result.returncode == 2 and "not a symlink" in result.stderr
    assert existing.read_text() == "keep me"


def test_cli_serves_logs_and_prints_counters(tmp_path):
    link = str(tmp_path / "hand")
    log = str(tmp_path / "hand.jsonl")
    # A stale link from an earlier, killed run (to a terminal that is gone) is replaced.
    os.symlink(next("/dev/pts/{}".format(n) for n in range(999999, 0, -1)
                    if not os.path.lexists("/dev/pts/{}".format(n))), link)
    process = subprocess.Popen(
        [sys.executable, "-m", "neurohand.deploy", "virtual-hand", "--protocol", "neurohand",
         "--port", link, "--log", log],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        slave = process.stdout.readline().strip()
        assert slave.startswith("/dev/") and os.path.realpath(link) == os.path.realpath(slave)
        with create_hand("neurohand:" + link) as hand:
            for i in range(3):
                hand.send(np.full(5, i / 2.0))
            deadline = time.monotonic() + 5
            while hand.counters["acks"] < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert hand.counters["acks"] == 3
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "valid_frames=3" in stderr and "bad_checksums=0" in stderr
    assert not os.path.lexists(link)  # the symlink goes with the hand
    records = [json.loads(line) for line in open(log)]
    commands = [r for r in records if r["event"] == "command"]
    assert [c["seq"] for c in commands] == [0, 1, 2]
    np.testing.assert_allclose([c["positions"] for c in commands],
                               [[0.0] * 5, [0.5] * 5, [1.0] * 5], atol=1.0 / nhp.POSITION_FULL_SCALE)
    assert all(c["t_wall"] > 1e9 and c["t_monotonic"] > 0 for c in commands)
    assert records[0]["event"] == "start" and records[-1]["event"] == "stop"
    assert records[-1]["counters"]["valid_frames"] == 3
