"""neurohand flash against a real SSH server on 127.0.0.1 with a temporary key.

The "device" is this machine: the package is installed into a venv of the
Python 3.6 interpreter that stands in for JetPack's, the bundle is self-tested
there with the numpy backend, and system files go under a staging root.
Engine building is skipped explicitly: no GPU here.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from neurohand.deploy.bundle import load_bundle, make_bundle

HERE = os.path.dirname(__file__)
SSHD = "/usr/sbin/sshd"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    if not os.path.exists(SSHD) or os.geteuid() != 0:
        if os.environ.get("REQUIRE_SSHD"):
            pytest.fail("REQUIRE_SSHD is set but {} is missing or we are not root".format(SSHD))
        pytest.skip("needs Debian's openssh-server ({}) and root".format(SSHD))
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "client"):
        subprocess.check_call(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)])
    shutil.copyfile(str(keys / "client.pub"), str(keys / "authorized_keys"))
    port = free_port()
    config = keys / "sshd_config"
    config.write_text("\n".join([
        "Port {}".format(port), "ListenAddress 127.0.0.1", "HostKey {}".format(keys / "host"),
        "AuthorizedKeysFile {}".format(keys / "authorized_keys"), "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "PidFile {}".format(keys / "sshd.pid"), ""]))
    os.makedirs("/run/sshd", exist_ok=True)
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        server.kill()
        pytest.fail("sshd did not start: {}".format(server.stderr.read()))
    yield {"port": port, "identity": str(keys / "client"), "known_hosts": str(keys / "known_hosts")}
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def bundle(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(os.path.join(HERE, "..", "device", "data", "golden_gru.onnx"), str(run / "model.onnx"))
    (run / "config.json").write_text(json.dumps({"model": {"cell": "gru"}}))
    make_bundle(str(run), str(tmp_path / "bundle"))
    return str(tmp_path / "bundle")


def device_python():
    found = subprocess.run([os.path.join(HERE, "..", "..", "scripts", "find-python36.sh")],
                           stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    return found or sys.executable


def flash(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy", "flash"] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)


def test_flash_installs_bundle_package_and_hardened_service(sshd, bundle, tmp_path):
    install, root = tmp_path / "device" / "opt" / "neurohand", tmp_path / "device" / "root"
    closed_port = free_port()
    result = flash(bundle, "--host", "root@127.0.0.1:{}".format(sshd["port"]),
                   "--host", "root@127.0.0.1:{}".format(closed_port),
                   "--identity", sshd["identity"], "--known-hosts", sshd["known_hosts"],
                   "--install-dir", install, "--system-root", root, "--remote-python", device_python(),
                   "--skip-engine", "--backend", "numpy", "--chip-usb", "0483:5740", "--hand-usb", "0403:6015")
    # One device flashed, the unreachable one reported as failed: exit 1, both in the report.
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout.splitlines()
    ok_line = [line for line in report if line.startswith("root@127.0.0.1 ") and " ok " in line]
    assert len(ok_line) == 1, result.stdout
    assert any(" FAILED " in line for line in report), result.stdout
    assert "SKIP build-engine (asked with --skip-engine)" in result.stdout
    current = install / "current"
    assert current.is_symlink()
    bundle_manifest = json.loads(open(os.path.join(bundle, "manifest.json")).read())
    assert json.loads((current / "manifest.json").read_text()) == bundle_manifest
    installed = load_bundle(str(current))
    selftests = os.listdir(installed.selftest_dir)
    assert len(selftests) == 1 and json.loads(open(os.path.join(installed.selftest_dir, selftests[0])).read())["passed"]
    version = subprocess.check_output([str(install / "venv" / "bin" / "neurohand"), "--version"], universal_newlines=True)
    assert version.startswith("neurohand ")
    unit = (root / "etc" / "systemd" / "system" / "neurohand.service").read_text()
    for line in ("User=neurohand", "SupplementaryGroups=dialout video", "Environment=OPENBLAS_CORETYPE=ARMV8", "Restart=always", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes"):
        assert line in unit.splitlines()
    assert "run --bundle {}".format(current) in unit
    rules = (root / "etc" / "udev" / "rules.d" / "99-neurohand.rules").read_text()
    assert 'ATTRS{idVendor}=="0483", ATTRS{idProduct}=="5740", SYMLINK+="neurohand-chip"' in rules
    assert 'SYMLINK+="neurohand-hand"' in rules

    # Flashing the same bundle again keeps the release the service is running from.
    model_inode = os.stat(str(current / "model.onnx")).st_ino
    again = flash(bundle, "--host", "root@127.0.0.1:{}".format(sshd["port"]), "--identity", sshd["identity"],
                  "--known-hosts", sshd["known_hosts"], "--install-dir", install, "--system-root", root,
                  "--remote-python", device_python(), "--skip-engine", "--backend", "numpy")
    assert again.returncode == 0, again.stdout + again.stderr
    assert os.stat(str(current / "model.onnx")).st_ino == model_inode


def test_dry_run_prints_key_only_commands_and_changes_nothing(bundle, tmp_path):
    install = tmp_path / "never"
    result = flash(bundle, "--host", "jetson@192.0.2.1", "--dry-run", "--install-dir", install)
    assert result.returncode == 0, result.stderr
    assert "BatchMode=yes" in result.stdout and "PasswordAuthentication=no" in result.stdout
    assert "build-engine" in result.stdout and "selftest" in result.stdout and "systemctl" in result.stdout
    assert not install.exists()


def test_user_mistakes_are_one_line_errors(bundle, tmp_path):
    for args in ([bundle], [bundle, "--host", "a@b", "--skip-engine"], [bundle, "--inventory", tmp_path / "none"],
                 [bundle, "--host", "a@b", "--chip-usb", "nonsense", "--dry-run"]):
        result = flash(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _installed_copy(tmp_path):
    """neurohand installed by pip (not editable) from a copy of this source tree, as the README's
    ``pip install '.[train]'`` does; returns the environment running ``python -S`` sees only that install
    (plus numpy and the other dependencies from this venv's site-packages, not its editable neurohand)."""
    import sysconfig
    source, target = tmp_path / "source", tmp_path / "installed"
    root = os.path.join(HERE, "..", "..")
    for item in ("setup.py", "README.md", "decoder", "firmware_bridge", "train", "deploy"):
        path = os.path.join(root, item)
        if os.path.isdir(path):
            shutil.copytree(path, str(source / item), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(str(source), exist_ok=True)
            shutil.copyfile(path, str(source / item))
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]))
    return target, env


def test_flash_works_from_an_installed_package_without_the_source_tree(bundle, tmp_path):
    target, env = _installed_copy(tmp_path)
    where = subprocess.check_output([sys.executable, "-S", "-c", "import neurohand.deploy; print(neurohand.deploy.__file__)"],
                                    env=env, cwd=str(tmp_path), universal_newlines=True)
    assert where.startswith(str(target))                    # the installed copy, not this checkout
    result = subprocess.run([sys.executable, "-S", "-m", "neurohand.deploy", "flash", bundle, "--host",
                             "jetson@192.0.2.1", "--dry-run"], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "neurohand-src.tar.gz" in result.stdout
    # The archive it ships installs with pip into a working package: the command, the requirements, the extras.
    archive = str(tmp_path / "package.tar.gz")
    subprocess.check_call([sys.executable, "-S", "-c", "import sys; from neurohand.deploy import flash; "
                           "flash.package_archive(sys.argv[1])", archive], env=env, cwd=str(tmp_path))
    device = tmp_path / "device"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(device), archive])
    assert (device / "bin" / "neurohand").exists()
    installed = sorted(os.path.relpath(os.path.join(folder, name), str(target / "neurohand"))
                       for folder, _, names in os.walk(str(target / "neurohand")) for name in names
                       if name.endswith(".py"))
    shipped = sorted(os.path.relpath(os.path.join(folder, name), str(device / "neurohand"))
                     for folder, _, names in os.walk(str(device / "neurohand")) for name in names
                     if name.endswith(".py"))
    assert shipped == installed and "deploy/cli/main.py" in shipped
    info = [name for name in os.listdir(str(device)) if name.endswith(".dist-info")]
    metadata = (device / info[0] / "METADATA").read_text()
    for line in ("Requires-Dist: numpy>=1.19", "Requires-Dist: pyserial>=3.5",
                 'Requires-Dist: pycuda>=2021.1; extra == "jetson"'):
        assert line in metadata
    assert "neurohand = neurohand.deploy.cli.main:main" in (device / info[0] / "entry_points.txt").read_text()
    env["PYTHONPATH"] = os.pathsep.join([str(device), env["PYTHONPATH"].split(os.pathsep, 1)[1]])
    version = subprocess.check_output([sys.executable, "-S", "-m", "neurohand.deploy", "--version"], env=env,
                                      cwd=str(tmp_path), universal_newlines=True)
    assert version.startswith("neurohand ")


def test_lab_streaming_options_reach_the_unit_and_bad_ones_are_refused(bundle, tmp_path):
    result = flash(bundle, "--host", "jetson@192.0.2.1", "--dry-run", "--install-dir", tmp_path / "never",
                   "--chip", "lsl:type=ENG", "--allow-lsl", "192.168.10.0/24", "--allow-lsl", "localhost",
                   "--lsl-outlet", "hand-out")
    assert result.returncode == 0, result.stderr
    exec_start = [line for line in result.stdout.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_start) == 1, result.stdout
    assert "--chip lsl:type=ENG" in exec_start[0] and exec_start[0].endswith(" --lsl-outlet hand-out")
    assert "IPAddressAllow=192.168.10.0/24 localhost" in result.stdout.splitlines()
    assert "IPAddressDeny=any" in result.stdout and "AF_INET" in result.stdout
    # Without them the unit has no network at all.
    plain = flash(bundle, "--host", "jetson@192.0.2.1", "--dry-run", "--install-dir", tmp_path / "never")
    assert plain.returncode == 0 and "IPAddressAllow" not in plain.stdout and "--lsl-outlet" not in plain.stdout
    for extra, message in ((["--allow-lsl", "0.0.0.0/0"], "every address"),
                           (["--allow-lsl", "192.168.10.1/24"], "host bits set"),
                           (["--lsl-outlet", "hand-out"], "give --allow-lsl"),
                           (["--allow-lsl", "localhost", "--lsl-outlet", "a b"], "--lsl-outlet in the unit"),
                           (["--chip", "lsl:type=ENG"], "--allow-lsl")):
        refused = flash(bundle, "--host", "jetson@192.0.2.1", "--dry-run", *extra)
        assert refused.returncode == 2, (extra, refused.stdout)
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert message in refused.stderr, (extra, refused.stderr)
