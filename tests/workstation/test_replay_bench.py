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


# --- bench latency: the virtual devices in processes of their own and in threads ------------------------

def test_latency_bench_runs_the_replay_with_the_devices_asked_and_checks_it(tmp_path):
    import os

    import pytest

    from neurohand.deploy.bench import latency
    from neurohand.deploy.bundle import make_bundle
    from neurohand.deploy.demo import write_session_parts
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig

    run_dir = os.path.join(os.path.dirname(__file__), "..", "device", "data", "replay_run")
    with open(os.path.join(run_dir, "config.json")) as handle:
        fixture = json.load(handle)["fixture"]
    bundle, recording = str(tmp_path / "bundle"), str(tmp_path / "held-out.nhr")
    make_bundle(run_dir, bundle)
    start = fixture["train_s"]
    write_session_parts(SimulatorConfig(**fixture["session"]), [(recording, start, start + 4.0)])
    selftest = subprocess.run([sys.executable, "-m", "neurohand.deploy", "selftest", bundle, "--backend", "numpy"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert selftest.returncode == 0, selftest.stderr[-2000:]
    output = subprocess.run(latency.replay_command(bundle, recording, 3, "process"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert output.returncode == 0, output.stderr[-2000:]
    summary = latency.replay_summary(output.stdout, "process")
    assert summary["latency_us"]["count"] > 0 and summary["hand_received"] == summary["commands_sent"]
    with pytest.raises(RuntimeError, match="asked for the virtual devices as 'thread'"):
        latency.replay_summary(output.stdout, "thread")


def test_latency_bench_reports_each_mode_as_the_median_of_its_runs_with_the_spread():
    from neurohand.deploy.bench import latency

    def entry(p50, p99, maximum, skips, events):
        return {"latency_us": {"p50": p50, "p90": p50 + 100, "p99": p99, "max": maximum, "count": 1000},
                "skips": skips, "safety_events": events}

    runs = [entry(900, 2000, 5000, 0, 1), entry(1000, 2500, 9000, 4, 0), entry(1100, 3000, 6000, 1, 0)]
    mode = latency.summarise_devices(runs)
    assert mode["latency_us"]["p99"] == {"median": 2500, "min": 2000, "max": 3000}
    assert mode["latency_us"]["max"] == {"median": 6000, "min": 5000, "max": 9000}
    assert mode["skips"] == {"median": 1, "min": 0, "max": 4} and mode["runs"] is runs
    headline = latency.headline_latency(runs)
    assert headline == {"p50": 1000, "p90": 1100, "p99": 2500, "max": 9000, "count": 3000}


def test_compare_with_runs_the_other_checkouts_code_and_refuses_a_folder_that_is_not_one(tmp_path):
    import os

    import pytest

    from neurohand.deploy.bench import latency
    from neurohand.firmware_bridge.shared.errors import UsageError

    checkout = tmp_path / "old"
    for folder in latency.SOURCE_FOLDERS:
        (checkout / folder).mkdir(parents=True)
        (checkout / folder / "__init__.py").write_text("")
    (checkout / "decoder" / "marker.py").write_text("WHERE = 'the old checkout'\n")
    work = tmp_path / "work"
    work.mkdir()
    environment = latency.reference_environment(latency.check_checkout(str(checkout)), str(work))
    probe = subprocess.run([sys.executable, "-c", "import neurohand.decoder.marker as m; print(m.WHERE)"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=environment)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "the old checkout"
    # This interpreter's own neurohand is untouched.
    import neurohand.decoder.features
    assert not neurohand.decoder.features.__file__.startswith(str(tmp_path))
    (checkout / "deploy" / "__init__.py").unlink()
    (checkout / "deploy").rmdir()
    with pytest.raises(UsageError, match="not a neurohand checkout: it has no deploy/ folder"):
        latency.check_checkout(str(checkout))
    cli = subprocess.run([sys.executable, "-m", "neurohand.deploy", "bench", "latency", "--compare-with",
                          str(checkout), "--quick"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=120)
    assert cli.returncode != 0 and "not a neurohand checkout" in cli.stderr and "Traceback" not in cli.stderr
