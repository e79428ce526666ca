"""The virtual devices, simulate, bench and demo tried with hostile paths and ports (issue 14).

* A ``--port`` symlink never replaces what is not its own stale link, and only
  its own link is removed on exit (docs/chip-protocol.md, "Port symlinks").
* An output is replaced only with ``--force`` (or where that is the command's
  job), and only once the new one is complete: a failed or interrupted run
  leaves the old one and no temporary file.
* Odd output paths are one-line errors before any work, and a log that fills
  the disk mid-session is one warning line while the hand goes on.
* Chip and hand ports are device paths: pyserial URLs (``socket://`` ...) are
  refused before anything is opened, and no connection is ever made.
"""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from neurohand.deploy.cli import main as cli
from neurohand.firmware_bridge.shared.errors import NeurohandError, UsageError

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
RUN_DIR = os.path.join(os.path.dirname(__file__), "data", "replay_run")


def neurohand(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=kwargs.pop("timeout", 60), **kwargs)


def assert_one_line_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def vanished_pty():
    """A /dev/pts/N that does not exist: what a killed run's symlink points to."""
    return next("/dev/pts/{}".format(n) for n in range(999999, 0, -1) if not os.path.lexists("/dev/pts/{}".format(n)))


def snapshot(path):
    """What is at ``path``, to compare before and after: kind, link target or content."""
    if os.path.islink(path):
        return ("link", os.readlink(path))
    if os.path.isdir(path):
        return ("dir", sorted(os.listdir(path)))
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            return ("file", handle.read())
    return ("absent",)


def no_temporaries(folder):
    return [name for name in os.listdir(str(folder)) if name.endswith(".tmp") or ".previous-" in name
            or name.startswith(".neurohand-probe")]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    from neurohand.firmware_bridge.virtual.simulator import SimulatorConfig, write_recording
    path = str(tmp_path_factory.mktemp("hostile") / "short.nhr")
    write_recording(path, SimulatorConfig(seconds=0.5, n_channels=2, rate=2000.0, seed=1))
    return path


# --- 1. port symlinks ---------------------------------------------------------------------------

def _hostile_things(tmp_path):
    """name -> a function that puts something not ours at a path (and returns what to compare)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    master, slave = os.openpty()        # a live terminal: another device's or a shell's
    live = os.ttyname(slave)

    def regular(path):
        with open(path, "w") as handle:
            handle.write("precious data")

    def directory(path):
        os.mkdir(path)
        with open(os.path.join(path, "inside.txt"), "w") as handle:
            handle.write("precious")

    things = {
        "regular file": regular,
        "empty file": lambda path: open(path, "w").close(),
        "directory": directory,
        "symlink to a file": lambda path: os.symlink(str(victim), path),
        "dangling symlink outside /dev/pts": lambda path: os.symlink(str(tmp_path / "gone"), path),
        "symlink to a live pty": lambda path: os.symlink(live, path),
        "symlink to /dev/null": lambda path: os.symlink("/dev/null", path),
        "fifo": lambda path: os.mkfifo(path),
    }
    return things, (master, slave)


HOSTILE_NAMES = ["regular file", "empty file", "directory", "symlink to a file", "dangling symlink outside /dev/pts",
                 "symlink to a live pty", "symlink to /dev/null", "fifo"]


@pytest.mark.parametrize("what", HOSTILE_NAMES)
def test_virtual_chip_port_never_replaces_what_is_not_its_stale_link(tmp_path, recording, what):
    things, fds = _hostile_things(tmp_path)
    try:
        port = str(tmp_path / "chip")
        things[what](port)
        before = snapshot(port)
        result = neurohand("virtual-chip", recording, "--port", port, "--autostart", "--speed", "20")
        assert_one_line_error(result, "--port", "refusing to replace")
        assert snapshot(port) == before
        assert snapshot(str(tmp_path / "victim.txt")) == ("file", b"keep me")
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("what", HOSTILE_NAMES)
def test_virtual_hand_port_never_replaces_what_is_not_its_stale_link(tmp_path, what):
    things, fds = _hostile_things(tmp_path)
    try:
        port = str(tmp_path / "hand")
        things[what](port)
        before = snapshot(port)
        result = neurohand("virtual-hand", "--protocol", "neurohand", "--port", port)
        assert_one_line_error(result, "--port", "refusing to replace")
        assert snapshot(port) == before
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("what", HOSTILE_NAMES)
def test_in_process_devices_refuse_too(tmp_path, what):
    from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip
    from neurohand.firmware_bridge.virtual.hand import VirtualHand

    things, fds = _hostile_things(tmp_path)
    try:
        port = str(tmp_path / "port")
        log = str(tmp_path / "hand.jsonl")
        things[what](port)
        before = snapshot(port)
        chip = VirtualChip(ArraySource(np.zeros((100, 2), np.int16), 2000.0), link_path=port)
        with pytest.raises(UsageError, match="refusing to replace"):
            chip.open()
        assert not chip.connected and snapshot(port) == before
        hand = VirtualHand("neurohand", link_path=port, log_path=log)
        with pytest.raises(UsageError, match="refusing to replace"):
            hand.start()
        assert snapshot(port) == before
        assert not os.path.exists(log)     # a refused hand leaves nothing behind
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("device", ["virtual-chip", "virtual-hand"])
def test_a_stale_link_of_a_killed_run_is_replaced_and_removed_on_exit(tmp_path, recording, device):
    port = str(tmp_path / "dev")
    os.symlink(vanished_pty(), port)
    if device == "virtual-chip":
        argv = [device, recording, "--port", port, "--loop", "--autostart"]
    else:
        argv = [device, "--protocol", "neurohand", "--port", port]
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy"] + argv, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
    try:
        slave = process.stdout.readline().strip()
        assert slave.startswith("/dev/pts/"), process.stderr.read() if process.poll() is not None else slave
        assert os.readlink(port) == slave
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert "Traceback" not in stderr, stderr
    assert not os.path.lexists(port)


@pytest.mark.parametrize("replacement", ["file", "foreign link", "another pty link"])
def test_on_exit_only_our_own_link_is_removed(tmp_path, replacement):
    from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip
    from neurohand.firmware_bridge.virtual.hand import VirtualHand

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    master, slave = os.openpty()
    other_pty = os.ttyname(slave)

    def replace(port):
        # Someone else takes the name while the device runs: the device must leave it alone.
        os.unlink(port)
        if replacement == "file":
            with open(port, "w") as handle:
                handle.write("theirs")
        elif replacement == "foreign link":
            os.symlink(str(victim), port)
        else:
            os.symlink(other_pty, port)

    port = str(tmp_path / "chip")
    chip = VirtualChip(ArraySource(np.zeros((100, 2), np.int16), 2000.0), link_path=port)
    chip.open()
    replace(port)
    after = snapshot(port)
    chip.close()
    assert snapshot(port) == after

    port = str(tmp_path / "hand")
    hand = VirtualHand("neurohand", link_path=port).start()
    replace(port)
    after = snapshot(port)
    hand.unplug()
    assert snapshot(port) == after
    os.unlink(port)
    hand.replug()
    assert os.readlink(port) == hand.slave_path
    replace(port)
    after = snapshot(port)
    hand.stop()
    assert snapshot(port) == after
    assert victim.read_text() == "keep me"
    os.close(master)
    os.close(slave)


@pytest.mark.parametrize("port, words", [
    ("", ["empty path"]), ("   ", ["empty path"]), ("/proc/x", ["/proc"]), ("/proc/self/fd/99", ["/proc"]),
    ("/sys/kernel/x", ["/sys"]), ("/no/such/dir/port", ["does not exist"]), ("/dev/null", ["refusing"]),
    ("/dev/full", ["refusing"]), ("nul\x00byte", []),
])
@pytest.mark.parametrize("device", ["virtual-chip", "virtual-hand"])
def test_odd_port_paths_are_one_line_errors_before_anything_runs(recording, device, port, words):
    if "\x00" in port or port.startswith("/dev/"):
        # A command line cannot carry a NUL; in-process it is refused all the same.  The real /dev nodes
        # are only ever checked, never given to a device: were the check broken, a test must not replace
        # /dev/null with a symlink on the machine running it (as root it could).
        from neurohand.firmware_bridge.virtual.port_link import check_port_link
        with pytest.raises(UsageError, match="NUL" if "\x00" in port else "refusing"):
            check_port_link("--port", port)
        return
    argv = [device, recording] if device == "virtual-chip" else [device, "--protocol", "neurohand"]
    assert_one_line_error(neurohand(*(argv + ["--port", port])), "--port", *words)


def test_a_read_only_folder_is_refused_before_the_device_starts(tmp_path, recording):
    if os.geteuid() == 0:
        folder = "/proc/self"       # root writes anywhere a mode allows; a kernel tree it cannot
    else:
        folder = str(tmp_path / "ro")
        os.mkdir(folder)
        os.chmod(folder, 0o500)
    for argv in (["virtual-chip", recording], ["virtual-hand", "--protocol", "psyonic"]):
        result = neurohand(*(argv + ["--port", os.path.join(folder, "port")]))
        assert_one_line_error(result, "--port")


# --- 2. outputs replaced only with --force, and only once complete --------------------------------

def test_simulate_needs_force_for_an_existing_out_and_keeps_it_on_refusal(tmp_path):
    out = tmp_path / "old.nhr"
    out.write_bytes(b"precious recording")
    result = neurohand("simulate", "--out", str(out), "--seconds", "1", "--channels", "2", "--quiet")
    assert_one_line_error(result, "--force")
    assert out.read_bytes() == b"precious recording"
    result = neurohand("simulate", "--out", str(out), "--seconds", "1", "--channels", "2", "--quiet", "--force")
    assert result.returncode == 0, result.stderr
    with open(str(out), "rb") as handle:
        assert handle.read(4) != b"prec"
    assert no_temporaries(tmp_path) == []


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_simulate_leaves_the_old_file_and_no_temporary(tmp_path, how):
    out = tmp_path / "old.nhr"
    out.write_bytes(b"precious recording")
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "simulate", "--out", str(out),
                                "--seconds", "600", "--channels", "32", "--force"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        # Wait until it is writing (its first progress line), then interrupt it.
        line = process.stderr.readline()
        assert "simulating" in line, line
        process.send_signal(how)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0 and "Traceback" not in stderr, stderr
    assert out.read_bytes() == b"precious recording"
    assert no_temporaries(tmp_path) == []


def _limit_file_size(limit):
    def apply():
        # A file system that fills up: writes past ``limit`` bytes fail with EFBIG
        # (Python ignores SIGXFSZ, so the write fails instead of killing the process).
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_simulate_that_fills_the_disk_keeps_the_old_file_in_one_line(tmp_path):
    out = tmp_path / "old.nhr"
    out.write_bytes(b"precious recording")
    result = neurohand("simulate", "--out", str(out), "--seconds", "10", "--channels", "4", "--quiet", "--force",
                       preexec_fn=_limit_file_size(100000))
    assert_one_line_error(result, "cannot write")
    assert out.read_bytes() == b"precious recording"
    assert no_temporaries(tmp_path) == []


@pytest.mark.parametrize("out, words", [
    ("", ["empty path"]), ("/proc/x", ["/proc"]), ("/sys/x", ["/sys"]), ("/dev/full", ["/dev"]),
    ("/dev/sda", ["/dev"]), ("/no/such/dir/r.nhr", ["does not exist"]), (".", ["directory"]),
    ("/proc/self/newfile", ["/proc"]),
])
def test_simulate_refuses_odd_outputs_before_simulating(tmp_path, out, words):
    result = neurohand("simulate", "--out", out, "--seconds", "1", "--channels", "2", cwd=str(tmp_path))
    assert_one_line_error(result, "--out", *words)
    assert "simulating" not in result.stderr


def test_simulate_to_dev_null_writes_through_and_leaves_the_device(tmp_path):
    result = neurohand("simulate", "--out", "/dev/null", "--seconds", "0.5", "--channels", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# --- the hand's log ---

def _write_hand_log(path):
    with open(path, "w") as handle:
        handle.write(json.dumps({"event": "start", "protocol": "neurohand", "port": "/dev/pts/1"}) + "\n")
        handle.write(json.dumps({"event": "stop", "counters": {}}) + "\n")


@pytest.mark.parametrize("content", [b"precious text\n", b"\x89NHR binary recording \x00\x01",
                                     b'{"bundle": "config"}\n', b"[1, 2, 3]\n",
                                     b'{"event": "command"}\n'])
def test_hand_log_refuses_to_append_to_what_is_not_a_hand_log(tmp_path, content):
    log = tmp_path / "log.jsonl"
    log.write_bytes(content)
    result = neurohand("virtual-hand", "--protocol", "neurohand", "--log", str(log))
    assert_one_line_error(result, "--log", "not a virtual-hand log")
    assert log.read_bytes() == content


def test_hand_log_appends_to_an_earlier_log(tmp_path):
    log = str(tmp_path / "log.jsonl")
    _write_hand_log(log)
    with open(log) as handle:
        before = handle.read()
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "virtual-hand", "--protocol",
                                "neurohand", "--log", log], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
    try:
        assert process.stdout.readline().startswith("/dev/")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    with open(log) as handle:
        after = handle.read()
    assert after.startswith(before)
    events = [json.loads(line)["event"] for line in after.splitlines()]
    assert events == ["start", "stop", "start", "stop"]


@pytest.mark.parametrize("log, words", [
    ("", ["empty path"]), ("/proc/x", ["/proc"]), ("/sys/x", ["/sys"]), ("/dev/full", ["/dev"]),
    (".", ["directory"]), ("/no/such/dir/log", ["does not exist"]), ("/proc/self/newfile", ["/proc"]),
])
def test_hand_log_odd_paths_are_one_line_errors(tmp_path, log, words):
    result = neurohand("virtual-hand", "--protocol", "neurohand", "--log", log, cwd=str(tmp_path))
    assert_one_line_error(result, "--log", *words)


def test_hand_log_and_port_cannot_be_one_path(tmp_path):
    path = str(tmp_path / "same")
    result = neurohand("virtual-hand", "--protocol", "neurohand", "--log", path, "--port", path)
    assert_one_line_error(result, "--log", "--port")
    assert not os.path.lexists(path)


def test_a_hand_log_that_fills_the_disk_is_one_warning_and_the_hand_goes_on(tmp_path):
    from neurohand.firmware_bridge.hands import create_hand

    log = str(tmp_path / "hand.jsonl")
    link = str(tmp_path / "hand")
    process = subprocess.Popen([sys.executable, "-m", "neurohand.deploy", "virtual-hand", "--protocol",
                                "neurohand", "--port", link, "--log", log],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                               preexec_fn=_limit_file_size(1500))
    try:
        assert process.stdout.readline().startswith("/dev/")
        with create_hand("neurohand:" + link) as hand:
            for i in range(30):
                hand.send(np.full(5, (i % 3) / 2.0))
                time.sleep(0.01)
            deadline = time.monotonic() + 10
            while hand.counters["acks"] < 30 and time.monotonic() < deadline:
                time.sleep(0.01)
            acks = hand.counters["acks"]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert acks == 30                                      # the hand served every command
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot write the log" in warnings[0], stderr
    assert warnings[0].startswith("neurohand virtual-hand: warning: ")
    assert "valid_frames=30" in stderr and "log_errors=1" in stderr
    assert 0 < os.path.getsize(log) <= 1500


def test_an_in_process_hand_whose_log_fails_keeps_serving():
    from neurohand.firmware_bridge.hands import create_hand
    from neurohand.firmware_bridge.virtual.hand import VirtualHand

    messages = []
    virtual = VirtualHand("neurohand", log_path="/dev/full", on_log_error=messages.append).start()
    try:
        with create_hand("neurohand:" + virtual.slave_path) as hand:
            for i in range(5):
                hand.send(np.full(5, 0.5))
            assert virtual.wait_for(5, 10.0)
    finally:
        virtual.stop()
    assert len(messages) == 1 and "no space left" in messages[0]
    assert virtual.counters["log_errors"] == 1 and virtual.counters["valid_frames"] == 5


# --- bench results ---

def _bench_document(targets, quick=False):
    return {"format": "neurohand-bench-results", "version": 1, "command": "neurohand bench", "quick": quick,
            "complete": True, "target_order": list(targets), "machine": {},
            "targets": {name: {"status": "ok", "seconds": 1.0, "result": {"figure": 1}} for name in targets}}


def _bench(capsys, *argv):
    code = cli.main(["bench"] + list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("results_dir, words", [
    ("", ["empty path"]), ("/proc/x", ["/proc"]), ("/sys/x", ["/sys"]), ("/dev/x", ["/dev"]),
    ("/no/such/parent/dir", ["does not exist"]),
])
def test_bench_refuses_odd_results_dirs_before_measuring(capsys, results_dir, words):
    code, err = _bench(capsys, "parser", "--quick", "--results-dir", results_dir)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "measuring" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize("setup, words", [
    ("results.json is a directory", ["results.json", "directory"]),
    ("results.json is not bench results", ["not a neurohand benchmark results file"]),
    ("results.json is binary", ["not a neurohand benchmark results file"]),
    ("results.md alone", ["results.md"]),
    ("results of other targets", ["would drop", "--update"]),
    ("full results under --quick", ["full run", "--quick"]),
    ("the folder is a file", ["not a directory"]),
])
def test_bench_never_replaces_what_would_cost_a_measurement_without_force(tmp_path, capsys, setup, words):
    folder = tmp_path / "results"
    if setup == "the folder is a file":
        folder.write_text("precious")
    else:
        folder.mkdir()
    if setup == "results.json is a directory":
        (folder / "results.json").mkdir()
    elif setup == "results.json is not bench results":
        (folder / "results.json").write_text('{"my": "experiment"}')
    elif setup == "results.json is binary":
        (folder / "results.json").write_bytes(b"\xff\xfe\x00garbage")
    elif setup == "results.md alone":
        (folder / "results.md").write_text("# my notes")
    elif setup == "results of other targets":
        (folder / "results.json").write_text(json.dumps(_bench_document(["parser", "dsp"], quick=True)))
    elif setup == "full results under --quick":
        (folder / "results.json").write_text(json.dumps(_bench_document(["parser"], quick=False)))
    before = snapshot(str(folder)), snapshot(str(folder / "results.json")), snapshot(str(folder / "results.md"))
    code, err = _bench(capsys, "parser", "--quick", "--results-dir", str(folder))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "measuring" not in err, err
    for word in words:
        assert word in err, err
    after = snapshot(str(folder)), snapshot(str(folder / "results.json")), snapshot(str(folder / "results.md"))
    assert after == before


def test_bench_force_replaces_results_atomically(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "results.json").write_text('{"my": "experiment"}')
    code, err = _bench(capsys, "parser", "--quick", "--results-dir", str(folder), "--force")
    assert code == 0, err
    with open(str(folder / "results.json")) as handle:
        assert json.load(handle)["format"] == "neurohand-bench-results"
    assert no_temporaries(folder) == []


def test_bench_rewrites_its_own_results_of_the_same_targets(tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_bench_document(["parser"], quick=True)))
    code, err = _bench(capsys, "parser", "--quick", "--results-dir", str(folder))
    assert code == 0, err
    with open(str(folder / "results.json")) as handle:
        assert json.load(handle)["targets"]["parser"]["result"] != {"figure": 1}


# --- demo's folder ---

@pytest.mark.parametrize("what, words", [
    ("", ["empty path"]), ("/proc/x", ["/proc"]), ("/sys/x", ["/sys"]), ("/no/such/dir/out", ["does not exist"]),
    ("file", ["not a directory"]), ("user folder", ["not an earlier demo"]), ("symlink", ["symlink"]),
])
def test_demo_out_refuses_odd_and_foreign_paths_before_anything_runs(tmp_path, what, words):
    from neurohand.deploy.demo import demo_folder, prepare_out_dir

    out = what
    if what == "file":
        out = str(tmp_path / "out")
        with open(out, "w") as handle:
            handle.write("precious")
    elif what == "user folder":
        out = str(tmp_path / "out")
        os.mkdir(out)
        with open(os.path.join(out, "thesis.tex"), "w") as handle:
            handle.write("precious")
    elif what == "symlink":
        target = tmp_path / "real"
        target.mkdir()
        out = str(tmp_path / "out")
        os.symlink(str(target), out)
    before = snapshot(out) if out.strip() else None
    for check in (prepare_out_dir, lambda path: demo_folder(path).__enter__()):
        with pytest.raises(UsageError) as raised:
            check(out)
        for word in words:
            assert word in str(raised.value)
    if before is not None:
        assert snapshot(out) == before


def _earlier_demo(out):
    from neurohand.deploy.demo import MARKER
    os.mkdir(out)
    for name, text in ((MARKER, "marker"), ("summary.json", '{"old": true}')):
        with open(os.path.join(out, name), "w") as handle:
            handle.write(text)


@pytest.mark.parametrize("failure", [RuntimeError("training failed"), KeyboardInterrupt(), NeurohandError("no")])
def test_a_failed_demo_puts_the_earlier_demo_back(tmp_path, failure):
    from neurohand.deploy.demo import demo_folder

    out = str(tmp_path / "demo-output")
    _earlier_demo(out)
    before = snapshot(out), snapshot(os.path.join(out, "summary.json"))
    with pytest.raises(type(failure)):
        with demo_folder(out) as folder:
            assert folder == out and not os.path.exists(os.path.join(out, "summary.json"))
            with open(os.path.join(out, "train.nhr"), "w") as handle:
                handle.write("half")
            raise failure
    assert (snapshot(out), snapshot(os.path.join(out, "summary.json"))) == before
    assert no_temporaries(tmp_path) == []


def test_a_successful_demo_replaces_the_earlier_one_at_the_end(tmp_path):
    from neurohand.deploy.demo import MARKER, demo_folder

    out = str(tmp_path / "demo-output")
    _earlier_demo(out)
    with demo_folder(out) as folder:
        with open(os.path.join(folder, "summary.json"), "w") as handle:
            handle.write('{"new": true}')
        # Meanwhile the earlier demo is kept aside, not deleted.
        assert any(".previous-" in name for name in os.listdir(str(tmp_path)))
    assert sorted(os.listdir(out)) == sorted([MARKER, "summary.json"])
    with open(os.path.join(out, "summary.json")) as handle:
        assert json.load(handle) == {"new": True}
    assert no_temporaries(tmp_path) == []


# --- 4. ports are device paths, never URLs --------------------------------------------------------

@pytest.fixture
def listener():
    """A TCP server on localhost that counts the connections it gets."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    accepted = []

    def connections():
        try:
            while True:
                connection, _ = server.accept()
                accepted.append(connection)
        except (socket.timeout, OSError):
            pass
        return len(accepted)

    yield server.getsockname()[1], connections
    for connection in accepted:
        connection.close()
    server.close()


URL_TEMPLATES = ["socket://127.0.0.1:{port}", "SOCKET://127.0.0.1:{port}", "rfc2217://127.0.0.1:{port}",
                 "spy://socket://127.0.0.1:{port}", "spy:///dev/null?file=/tmp/spied", "loop://", "Loop://",
                 "hwgrep://.*", "alt:///dev/null?class=Serial", "cp2110://0001:0002:00", "hwgrid://x",
                 "/tmp/odd://path"]


@pytest.mark.parametrize("template", URL_TEMPLATES)
def test_links_and_chip_sessions_refuse_urls_without_connecting(listener, template):
    from neurohand.firmware_bridge.chip.session import ChipSession, chip_opener, read_chip_config
    from neurohand.firmware_bridge.link import LinkProtocol, SerialLink, open_serial_port

    port, connections = listener
    url = template.format(port=port)
    attempts = [lambda: SerialLink(url, LinkProtocol()).open(),
                lambda: open_serial_port(url, 9600, 0.1, 0.1),
                lambda: ChipSession(url).open(),
                lambda: read_chip_config(url),
                lambda: chip_opener(url, 4, 2000.0)(None)]
    for attempt in attempts:
        with pytest.raises(UsageError, match="pyserial URL"):
            attempt()
    assert connections() == 0


@pytest.mark.parametrize("driver", ["neurohand", "psyonic"])
@pytest.mark.parametrize("template", URL_TEMPLATES[:6])
def test_hand_drivers_refuse_urls_without_connecting(listener, driver, template):
    from neurohand.firmware_bridge.hands import create_hand

    port, connections = listener
    with pytest.raises(UsageError, match="pyserial URL"):
        create_hand("{}:{}".format(driver, template.format(port=port)))
    assert connections() == 0


def test_only_in_process_schemes_can_be_allowed_and_only_in_code(listener):
    from neurohand.firmware_bridge.link import LinkProtocol, SerialLink, allow_url_schemes

    port, connections = listener
    for scheme in ("socket", "rfc2217", "spy", "hwgrep", "alt"):
        with pytest.raises(ValueError):
            with allow_url_schemes("loop", scheme):
                pass
    with allow_url_schemes("loop"):
        SerialLink("loop://", LinkProtocol()).open().close()
        with pytest.raises(UsageError):
            SerialLink("socket://127.0.0.1:{}".format(port), LinkProtocol())
    with pytest.raises(UsageError):
        SerialLink("loop://", LinkProtocol())        # the allowance ends with its block
    assert connections() == 0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from neurohand.deploy.bundle import make_bundle
    path = str(tmp_path_factory.mktemp("hostile-bundle") / "bundle")
    make_bundle(RUN_DIR, path)
    assert cli.main(["selftest", path, "--backend", "numpy"]) == 0
    return path


@pytest.mark.parametrize("template", ["socket://127.0.0.1:{port}", "rfc2217://127.0.0.1:{port}",
                                      "spy://socket://127.0.0.1:{port}"])
def test_neurohand_run_refuses_a_url_chip_or_hand_in_one_line_without_connecting(bundle, listener, template):
    from neurohand.firmware_bridge.virtual.chip import ArraySource, VirtualChip

    port, connections = listener
    url = template.format(port=port)
    result = neurohand("run", "--bundle", bundle, "--chip", url, "--hand", "none", "--backend", "numpy", "--quiet")
    assert_one_line_error(result, "pyserial URL")
    assert connections() == 0

    rng = np.random.RandomState(0)
    chip = VirtualChip(ArraySource(rng.randint(-2000, 2000, (40000, 4)).astype(np.int16), 2000.0, 0.195))
    chip_path = chip.open()
    stop = threading.Event()
    serving = threading.Thread(target=chip.serve, args=(stop,), daemon=True)
    serving.start()
    try:
        result = neurohand("run", "--bundle", bundle, "--chip", chip_path, "--hand", "neurohand:" + url,
                           "--backend", "numpy", "--quiet")
    finally:
        stop.set()
        serving.join(5.0)
        chip.close()
    assert_one_line_error(result, "pyserial URL")
    assert connections() == 0


@pytest.mark.parametrize("option, value", [
    ("--chip", "socket://127.0.0.1:9"), ("--chip", "rfc2217://localhost:7000"), ("--chip", "loop://"),
    ("--hand", "psyonic:socket://127.0.0.1:9"), ("--hand", "neurohand:spy://loop://"),
])
def test_run_refuses_url_ports_before_the_bundle_is_even_read(tmp_path, option, value):
    # The bundle does not exist: a URL port must be the error reported, so it was checked first.
    argv = ["run", "--bundle", str(tmp_path / "no-bundle"), "--chip", "/dev/pts/999", "--hand", "none"]
    argv[argv.index(option) + 1] = value
    result = neurohand(*argv)
    assert_one_line_error(result, option, "URL")
