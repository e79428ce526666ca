"""Hostile values for ``neurohand flash`` (issue 14): nothing unchecked reaches a unit, a rule or a command.

systemd reads a unit line by line (a newline in a value starts a new directive:
a second ``User=`` wins over the first), splits ``ExecStart=`` on its own
quoting and expands ``%`` specifiers and ``$VARIABLES`` there; ssh reads an
argument starting with '-' as an option.  Every value is checked against a
whitelist before anything is built; each refusal is one line.
"""
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from neurohand.deploy import flash
from neurohand.deploy.bundle import make_bundle
from neurohand.firmware_bridge.shared.errors import BundleError, UsageError

HERE = os.path.dirname(__file__)

HOSTILE_TEXT = [
    "x\nUser=root", "x\rUser=root", "x\x00y", "x\n", "\n", "x'y", 'x"y', "x\\y", "x%hy", "%i", "x$USER", "${HOME}",
    "x y", "x\ty", "-oProxyCommand=touch /tmp/pwned", "--help", "x;rm -rf /", "x`id`", "x$(id)", "x|y", "x&y",
    "x>y", "x*", "x?", "x#y", "x\u00e9", "x\u202ey", "\uff0e\uff0e", "x\u2028y", "x\x1b[31m", "", " ", "a" * 5000,
]
HOSTILE_PATHS = HOSTILE_TEXT + [
    "relative/dir", "opt/neurohand", ".", "..", "/opt/../etc", "/opt/./neurohand", "/opt//neurohand",
    "/opt/neurohand/", "//opt", "/" + "a" * 300, "~/neurohand", "/opt/neurohand\n[Service]", "/opt/x y",
    "/opt/%n", "/opt/$X", "/opt/\u00e9", "-/opt",
]


def settings(**changes):
    values = dict(install_dir="/opt/neurohand", system_root="/", service_user="neurohand", remote_python="python3",
                  chip_port="/dev/neurohand-chip", hand="psyonic:/dev/neurohand-hand", backend="tensorrt",
                  fp16=False, skip_engine=False, max_performance=False, chip_usb=("0483", "5740"),
                  hand_usb=("0403", "6015"), start_service=True)
    values.update(changes)
    return flash.FlashSettings(**values)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-flash")
    run = root / "run"
    run.mkdir()
    shutil.copyfile(os.path.join(HERE, "..", "device", "data", "golden_gru.onnx"), str(run / "model.onnx"))
    (run / "config.json").write_text(json.dumps({"model": {"cell": "gru"}}))
    make_bundle(str(run), str(root / "bundle"))
    return str(root / "bundle")


def dry_run(bundle, hosts=("jetson@192.0.2.1",), identity=None, known_hosts=None, **changes):
    out = io.StringIO()
    flash.flash(bundle, list(hosts), settings(**changes), identity=identity, known_hosts=known_hosts, dry_run=True,
                package=os.devnull, out=out)
    return out.getvalue()


def assert_refused(call):
    with pytest.raises(UsageError) as error:
        call()
    message = str(error.value)
    assert message and "\n" not in message and "\r" not in message and len(message) < 2000, repr(message)
    return message


FIELDS = ["install_dir", "system_root", "chip_port", "remote_python"]


@pytest.mark.parametrize("field", FIELDS + ["service_user", "hand"])
@pytest.mark.parametrize("value", HOSTILE_PATHS, ids=[repr(v)[:30] for v in HOSTILE_PATHS])
def test_hostile_values_are_refused_before_anything_is_built(bundle, field, value):
    if field == "system_root" and value in ("",):
        pytest.skip("an empty system root is the real root (as '/')")
    if field == "hand":
        value = "psyonic:" + value
    assert_refused(lambda: dry_run(bundle, **{field: value}))
    assert_refused(lambda: flash.service_unit(settings(**{field: value})))


@pytest.mark.parametrize("value", ["relative/dir", "bin/python3"])
def test_a_relative_remote_python_path_is_refused(bundle, value):
    assert_refused(lambda: dry_run(bundle, remote_python=value))


@pytest.mark.parametrize("user", ["root", "0", " root", "root ", "00", "neurohand\nUser=root", "neurohand\rUser=root",
                                  "Neurohand", "1000", "a" * 33, "-neurohand", "neuro.hand", "neuro hand", "néurohand"])
def test_the_service_user_is_a_plain_unprivileged_name(bundle, user):
    assert_refused(lambda: dry_run(bundle, service_user=user))


@pytest.mark.parametrize("hand", ["keys:relative.json", "psyonic:", "psyonic:dev/ttyUSB0", "nonsense:/dev/x",
                                  "none:/dev/x", "psyonic:loop://", "neurohand:/dev/x\nUser=root"])
def test_hand_targets_are_absolute_paths(bundle, hand):
    assert_refused(lambda: dry_run(bundle, hand=hand))


@pytest.mark.parametrize("host", HOSTILE_TEXT + [
    "-oProxyCommand=id", "user@-oProxyCommand=id", "-l root host", "user@host:0", "user@host:65536", "user@host:-1",
    "user@host:\u00b2", "us er@host", "@host", "user@", "user@host name", "user@ho\nst", "a@b@c"])
def test_hostile_hosts_are_refused(bundle, host):
    assert_refused(lambda: dry_run(bundle, hosts=[host]))
    assert_refused(lambda: flash.SshTarget(host))


@pytest.mark.parametrize("host", ["jetson@192.0.2.1", "jetson@192.0.2.1:2222", "root@jetson-01.lab", "jetson",
                                  "jetson@::1", "nano_2@10.0.0.7:22"])
def test_plain_hosts_pass_and_reach_ssh_after_double_dash(bundle, host):
    target = flash.SshTarget(host)
    command = target.ssh_command("true")
    assert command[-3:] == ["--", target.user_host, "true"]
    printed = dry_run(bundle, hosts=[host])
    assert " -- {} ".format(target.user_host) in printed


@pytest.mark.parametrize("name", ["known_hosts", "identity"])
@pytest.mark.parametrize("file_name", ["k%h", "k y", "k\nz", "k'q", "k$HOME"])
def test_ssh_file_options_are_refused_where_ssh_would_reinterpret_them(bundle, tmp_path, name, file_name):
    path = tmp_path / file_name
    path.write_text("")
    assert_refused(lambda: dry_run(bundle, **{name: str(path)}))


def test_a_plain_unit_has_each_directive_once_and_no_quoting(bundle):
    unit = flash.service_unit(settings(install_dir="/opt/neuro-hand_2.0", chip_port="/dev/serial/by-id/usb-FTDI_A1:0"))
    lines = unit.splitlines()
    keys = [line.split("=", 1)[0] for line in lines if "=" in line]
    assert len(keys) == len(set(keys))
    execs = [line for line in lines if line.startswith("ExecStart=")]
    assert execs == ["ExecStart=/opt/neuro-hand_2.0/venv/bin/neurohand run --bundle /opt/neuro-hand_2.0/current "
                     "--chip /dev/serial/by-id/usb-FTDI_A1:0 --hand psyonic:/dev/neurohand-hand --backend tensorrt "
                     "--stats-json /var/lib/neurohand/stats.json"]


def test_accepted_values_never_add_a_line_to_the_unit_or_the_rules():
    """Whatever passes the checks leaves the unit with exactly the directives it has with the defaults."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies

    default_keys = [line.split("=", 1)[0] for line in flash.service_unit(settings()).splitlines()]
    alphabet = strategies.characters(min_codepoint=0, max_codepoint=0x2030)

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(strategies.sampled_from(["install_dir", "chip_port", "service_user", "hand"]),
                      strategies.text(alphabet, max_size=40))
    def check(field, value):
        if field == "hand":
            value = "psyonic:" + value
        try:
            unit = flash.service_unit(settings(**{field: value}))
        except UsageError as error:
            assert "\n" not in str(error)
            return
        lines = unit.splitlines()
        assert [line.split("=", 1)[0] for line in lines] == default_keys
        assert all(c not in unit for c in "%$\\'\"\r\x00")
    check()


def test_usb_ids_that_did_not_come_through_parse_usb_id_are_refused(bundle):
    for usb_id in [("0483\n", "5740"), ("0483", "57400"), ("04 3", "5740"), "0483:5740", ("0483",), ("ABCD", "EF01")]:
        assert_refused(lambda: flash.udev_rules(settings(chip_usb=usb_id)))


def test_a_link_in_the_bundle_is_never_flashed(bundle, tmp_path):
    copy = str(tmp_path / "bundle")
    shutil.copytree(bundle, copy)
    os.symlink("/etc/hostname", os.path.join(copy, "extra"))
    with pytest.raises(BundleError, match="symbolic link"):
        dry_run(copy)
    # Even a link that appears after the bundle was verified is refused when the archive is made.
    os.remove(os.path.join(copy, "extra"))
    from neurohand.deploy.bundle import load_bundle
    loaded = load_bundle(copy)
    outside = str(tmp_path / "model.onnx")
    shutil.move(os.path.join(copy, "model.onnx"), outside)
    os.symlink(outside, os.path.join(copy, "model.onnx"))
    with pytest.raises(BundleError, match="not a regular file"):
        flash._bundle_archive(loaded, str(tmp_path / "bundle.tar.gz"))


def test_only_the_bundled_files_are_shipped(bundle, tmp_path):
    import tarfile
    from neurohand.deploy.bundle import load_bundle
    copy = str(tmp_path / "bundle")
    shutil.copytree(bundle, copy)
    with open(os.path.join(copy, "notes.txt"), "w") as handle:
        handle.write("not in the manifest")
    archive = flash._bundle_archive(load_bundle(copy), str(tmp_path / "bundle.tar.gz"))
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == ["config.json", "golden.npz", "manifest.json", "model.onnx"]
    assert all(m.isfile() for m in members)


@pytest.mark.parametrize("args", [
    ["--service-user", "neurohand\nUser=root"], ["--chip", "/dev/x\nExecStartPre=/bin/sh"], ["--install-dir", "opt"],
    ["--hand", "psyonic:/dev/x%n"], ["--system-root", "../root"], ["--remote-python", "-c"],
])
def test_the_command_line_says_each_refusal_in_one_line(bundle, args):
    result = subprocess.run([sys.executable, "-m", "neurohand.deploy", "flash", bundle, "--host", "j@192.0.2.1",
                             "--dry-run", "--package", os.devnull] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
