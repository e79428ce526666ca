"""`neurohand bench replay --quick`: the output's shape and the one-vs-two-process check (speed is not asserted)."""
import json
import subprocess
import sys


def test_quick_replay_bench_reports_every_run_and_equal_scores():
    output = subprocess.run([sys.executable, "-m", "neurohand.deploy", "bench", "replay", "--quick", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert output.returncode == 0, output.stderr[-2000:]
    result = json.loads(output.stdout)
    assert result["available"] and result["quick"] and result["goal_x"] == 100.0
    assert set(result["runs"]) == {"jobs1_auto", "jobs2_auto", "jobs1_numpy", "jobs2_numpy"}
    for name, run in result["runs"].items():
        assert run["jobs"] == int(name[4]) and run["speed_x"]["median"] > 0, name
        assert (run["feature_worker_dsp_s"] is None) == (run["jobs"] == 1), name
        assert run["commands"] > 900, name          # 20 s at a 20 ms stride: every window decoded
    assert result["same_scores"] is True
    assert result["runs"]["jobs1_numpy"]["backend"] == "numpy"
    assert result["met"] == (result["runs"][result["default"]]["speed_x"]["median"] >= 100.0)
