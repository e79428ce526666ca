"""``neurohand flash``: put a bundle on one or many Jetsons over SSH.

Per device, in order (each step one remote shell command, so ``--dry-run`` can
print exactly what would run):

1. copy the package source and the bundle (tar over ssh) into INSTALL_DIR,
   the bundle under ``releases/<digest>`` so earlier bundles stay for rollback;
2. create a virtual environment that sees JetPack's system packages
   (TensorRT, numpy) and install the package into it;
3. ``neurohand build-engine`` and ``neurohand selftest`` there, then point
   ``INSTALL_DIR/current`` at the new release;
4. install udev rules (stable /dev/neurohand-chip and /dev/neurohand-hand)
   and a hardened systemd unit running ``neurohand run`` as an unprivileged
   user in the dialout group, then enable and (re)start it;
5. optionally the maximum-performance power mode (nvpmodel -m 0, jetson_clocks).

SSH uses keys only: BatchMode (never a password prompt), password and
keyboard-interactive authentication off.  Nothing is stored but the known-hosts
entry ssh itself keeps.  Privileged steps use ``sudo -n`` unless the remote
user is root, so a missing sudo rule fails at once instead of hanging.
"""
import collections
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from neurohand.deploy.bundle import load_bundle
from neurohand.firmware_bridge.shared.errors import UsageError

SERVICE_NAME = "neurohand"
SOURCE_ITEMS = ("setup.py", "README.md", "decoder", "firmware_bridge", "train", "deploy")

FlashSettings = collections.namedtuple("FlashSettings", [
    "install_dir", "system_root", "service_user", "remote_python", "chip_port", "hand", "backend",
    "fp16", "skip_engine", "max_performance", "chip_usb", "hand_usb", "start_service"])

Step = collections.namedtuple("Step", ["description", "command", "upload"])  # upload: local file piped to stdin


def parse_usb_id(name, value):
    """'0403:6001' -> ('0403', '6001'), validated."""
    if value is None:
        return None
    parts = value.lower().split(":")
    if len(parts) != 2 or not all(len(p) == 4 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise UsageError("{} must be a USB VENDOR:PRODUCT id like 0403:6001, but got {!r}".format(name, value))
    return tuple(parts)


def read_inventory(path):
    """Hosts from an inventory file: one USER@HOST[:PORT] a line, '#' comments."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, ValueError) as exc:   # ValueError: not UTF-8
        raise UsageError("inventory {!r} cannot be read: {}".format(path, exc)) from exc
    hosts = [line.split("#", 1)[0].strip() for line in lines]
    hosts = [host for host in hosts if host]
    if not hosts:
        raise UsageError("inventory {!r} lists no hosts".format(path))
    return hosts


def source_tree():
    """The folder holding setup.py and the package sources, or None."""
    import neurohand.deploy
    root = os.path.dirname(os.path.dirname(os.path.abspath(neurohand.deploy.__file__)))
    if all(os.path.exists(os.path.join(root, item)) for item in SOURCE_ITEMS):
        return root
    return None


def make_source_archive(root, destination):
    """A pip-installable source archive (one top folder with setup.py)."""
    def skip_caches(info):
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info
    with tarfile.open(destination, "w:gz") as archive:
        for item in SOURCE_ITEMS:
            archive.add(os.path.join(root, item), arcname="neurohand-src/" + item, filter=skip_caches)
    return destination


def udev_rules(settings):
    lines = ["# Stable names for neurohand's serial devices (installed by neurohand flash)."]
    for usb_id, name in ((settings.chip_usb, "neurohand-chip"), (settings.hand_usb, "neurohand-hand")):
        if usb_id is not None:
            lines.append('SUBSYSTEM=="tty", ATTRS{{idVendor}}=="{}", ATTRS{{idProduct}}=="{}", '
                         'SYMLINK+="{}", GROUP="dialout", MODE="0660"'.format(usb_id[0], usb_id[1], name))
    return "\n".join(lines) + "\n"


def service_unit(settings):
    """The systemd unit: unprivileged, hardened, restarted on any exit."""
    neurohand = os.path.join(settings.install_dir, "venv", "bin", "neurohand")
    run = [neurohand, "run", "--bundle", os.path.join(settings.install_dir, "current"),
           "--chip", settings.chip_port, "--hand", settings.hand, "--backend", settings.backend,
           "--stats-json", "/var/lib/neurohand/stats.json"]
    return "\n".join([
        "[Unit]",
        "Description=neurohand: nerve-signal decoder driving the prosthetic hand",
        "After=local-fs.target",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=simple",
        "User={}".format(settings.service_user),
        # dialout: the serial ports; video: CUDA/TensorRT device nodes on L4T.
        "SupplementaryGroups=dialout video",
        # numpy's OpenBLAS misdetects the Nano's CPU ("Illegal instruction") without this.
        "Environment=OPENBLAS_CORETYPE=ARMV8",
        "ExecStart={}".format(" ".join(shlex.quote(part) for part in run)),
        "Restart=always",
        "RestartSec=1",
        "StateDirectory=neurohand",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "IPAddressDeny=any",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def _sudo_prefix():
    return 'if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO="sudo -n"; fi; '


def _write_file_command(path, content, privileged):
    """A remote command writing ``content`` to ``path`` (via a quoted heredoc)."""
    marker = "NEUROHAND_EOF"
    if marker in content:
        raise ValueError("file content contains the heredoc marker")
    writer = "$SUDO tee {} >/dev/null".format(shlex.quote(path)) if privileged else "cat > {}".format(shlex.quote(path))
    return "{}{} <<'{}'\n{}{}".format(_sudo_prefix() if privileged else "", writer, marker, content, marker)


def _service_user_step(user, staging_root):
    if staging_root:
        return Step("service user not created (staging root {})".format(staging_root),
                    "echo 'service user not created: staging root'", None)
    q = shlex.quote
    return Step("create the service user {}".format(user),
                _sudo_prefix() + "id -u {0} >/dev/null 2>&1 || $SUDO useradd --system --no-create-home "
                "--shell /usr/sbin/nologin {0}; $SUDO usermod -a -G dialout,video {0}".format(q(user)), None)


def _system_file_step(description, path, content, staging_root):
    """Write a system file; under a staging root its folders may not exist yet."""
    make_folder = "mkdir -p {} && ".format(shlex.quote(os.path.dirname(path))) if staging_root else ""
    return Step(description, make_folder + _write_file_command(path, content, privileged=True), None)


def plan_steps(bundle, settings, source_archive, bundle_archive):
    """The remote steps for one device, in order."""
    q = shlex.quote
    install = settings.install_dir
    release = os.path.join(install, "releases", bundle.digest[:16])
    venv = os.path.join(install, "venv")
    neurohand = os.path.join(venv, "bin", "neurohand")
    root = settings.system_root.rstrip("/")
    unit_path = root + "/etc/systemd/system/{}.service".format(SERVICE_NAME)
    rules_path = root + "/etc/udev/rules.d/99-neurohand.rules"
    backend = settings.backend

    steps = [
        Step("prepare {}".format(install),
             _sudo_prefix() + "$SUDO mkdir -p {0} && $SUDO chown \"$(id -un)\" {0} && mkdir -p {1}/releases {1}/src".format(
                 q(install), q(install)), None),
        Step("copy the package source", "cat > {}".format(q(install + "/src/neurohand-src.tar.gz")), source_archive),
        # Re-flashing the bundle already there keeps its folder (and the running
        # service's files); a different one replaces it only once fully copied.
        Step("copy the bundle to {}".format(release),
             "rm -rf {0}.partial && mkdir -p {0}.partial && tar -xzf - -C {0}.partial && "
             "if cmp -s {0}.partial/manifest.json {0}/manifest.json; then rm -rf {0}.partial; "
             "else rm -rf {0} && mv {0}.partial {0}; fi".format(q(release)), bundle_archive),
        Step("install the package into {}".format(venv),
             "set -e; [ -x {0}/bin/pip ] || {1} -m venv --system-site-packages {0}; "
             "{0}/bin/pip install --quiet --upgrade 'pip<22' 2>/dev/null || true; "
             "{0}/bin/pip install --quiet --force-reinstall --no-deps {2} && {0}/bin/pip install --quiet {3}".format(
                 q(venv), q(settings.remote_python), q(install + "/src/neurohand-src.tar.gz"),
                 # The TensorRT backend needs pycuda (the [jetson] extra); TensorRT itself is JetPack's.
                 q(install + "/src/neurohand-src.tar.gz" + ("" if settings.skip_engine else "[jetson]"))), None),
    ]
    if settings.skip_engine:
        steps.append(Step("SKIP build-engine (asked with --skip-engine)", "echo 'build-engine skipped: --skip-engine'", None))
    else:
        steps.append(Step("build the TensorRT engine",
                          "{} build-engine {}{}".format(q(neurohand), q(release), " --fp16" if settings.fp16 else ""), None))
    steps += [
        Step("self-test the bundle with backend {}".format(backend),
             "{} selftest {} --backend {}".format(q(neurohand), q(release), q(backend)), None),
        Step("make it the current bundle", "ln -sfn {} {}.new && mv -T {}.new {}".format(
            q(release), q(install + "/current"), q(install + "/current"), q(install + "/current")), None),
        _service_user_step(settings.service_user, root),
        _system_file_step("install udev rules", rules_path, udev_rules(settings), root),
        _system_file_step("install the systemd unit", unit_path, service_unit(settings), root),
    ]
    if not root:
        steps.append(Step("reload udev rules", _sudo_prefix() + "if command -v udevadm >/dev/null; then "
                          "$SUDO udevadm control --reload-rules && $SUDO udevadm trigger; fi", None))
    if settings.max_performance:
        steps.append(Step("maximum-performance mode", _sudo_prefix() + "$SUDO nvpmodel -m 0 && $SUDO jetson_clocks", None))
    if settings.start_service:
        steps.append(Step("enable and restart the service",
                          _sudo_prefix() + "if [ -d /run/systemd/system ] && [ -z {0} ]; then $SUDO systemctl daemon-reload && "
                          "$SUDO systemctl enable {1} && $SUDO systemctl restart {1} && systemctl is-active {1}; "
                          "else echo 'systemd is not running here (or a staging root): unit installed, not started'; fi".format(
                              q(root), SERVICE_NAME), None))
    return steps


class SshTarget(object):
    """Runs commands on one host with key authentication only."""

    def __init__(self, host, identity=None, known_hosts=None, timeout_s=600):
        self.user_host, self.port = self._split(host)
        self.identity = identity
        self.known_hosts = known_hosts
        self.timeout_s = timeout_s

    @staticmethod
    def _split(host):
        if host.count(":") == 1:
            name, port = host.rsplit(":", 1)
            if port.isdigit():
                return name, int(port)
        return host, 22

    def ssh_command(self, remote_command):
        command = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                   "-o", "KbdInteractiveAuthentication=no", "-o", "StrictHostKeyChecking=accept-new",
                   "-o", "ConnectTimeout=15"]
        if self.identity:
            command += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            command += ["-o", "UserKnownHostsFile={}".format(self.known_hosts)]
        return command + [self.user_host, remote_command]

    def run(self, remote_command, upload=None):
        stdin = open(upload, "rb") if upload else subprocess.DEVNULL
        try:
            result = subprocess.run(self.ssh_command(remote_command), stdin=stdin, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, timeout=self.timeout_s)
        finally:
            if upload:
                stdin.close()
        return result.returncode, result.stdout.decode("utf-8", "replace")


DeviceOutcome = collections.namedtuple("DeviceOutcome", ["host", "ok", "failed_step", "log", "seconds"])


def flash_device(target, steps, progress):
    """Run the steps on one device, stopping at the first failure."""
    started = time.monotonic()
    log = []
    for index, step in enumerate(steps, 1):
        progress("{}: [{}/{}] {}".format(target.user_host, index, len(steps), step.description))
        code, output = target.run(step.command, step.upload)
        log.append("$ {}\n{}".format(step.description, output))
        if code != 0:
            return DeviceOutcome(target.user_host, False, step.description, "".join(log), time.monotonic() - started)
    return DeviceOutcome(target.user_host, True, None, "".join(log), time.monotonic() - started)


def _bundle_archive(bundle, destination):
    with tarfile.open(destination, "w:gz") as archive:
        for name in sorted(os.listdir(bundle.path)):
            if name not in ("engine", "selftest"):
                archive.add(os.path.join(bundle.path, name), arcname=name)
    return destination


def flash(bundle_path, hosts, settings, identity=None, known_hosts=None, dry_run=False, jobs=4,
          package=None, out=sys.stdout):
    """Flash every host (in parallel); return the list of DeviceOutcome (empty for a dry run)."""
    if settings.service_user.strip() in ("root", "0"):
        raise UsageError("--service-user {!r}: the service must run as an unprivileged user (default "
                         "neurohand); it needs only the dialout and video groups".format(settings.service_user))
    bundle = load_bundle(bundle_path)
    if identity is not None and not os.path.isfile(identity):
        raise UsageError("identity file {!r} does not exist".format(identity))
    lock = threading.Lock()

    def progress(message):
        with lock:
            print(message, file=out)
            out.flush()

    with tempfile.TemporaryDirectory(prefix="neurohand-flash-") as staging:
        if package is not None:
            source_archive = package
        else:
            root = source_tree()
            if root is None:
                raise UsageError("the neurohand source tree was not found next to the installed package; "
                                 "run flash from a git checkout (pip install -e .) or pass --package ARCHIVE")
            source_archive = make_source_archive(root, os.path.join(staging, "neurohand-src.tar.gz"))
        bundle_archive = _bundle_archive(bundle, os.path.join(staging, "bundle.tar.gz"))
        steps = plan_steps(bundle, settings, source_archive, bundle_archive)
        if dry_run:
            for host in hosts:
                target = SshTarget(host, identity, known_hosts)
                print("# {} ({} steps)".format(host, len(steps)), file=out)
                for step in steps:
                    print("# {}".format(step.description), file=out)
                    line = " ".join(shlex.quote(part) for part in target.ssh_command(step.command))
                    if step.upload:
                        line += " < " + shlex.quote(os.path.basename(step.upload))
                    print(line, file=out)
            return []
        targets = [SshTarget(host, identity, known_hosts) for host in hosts]
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(targets)))) as pool:
            outcomes = list(pool.map(lambda target: flash_device(target, steps, progress), targets))
    return outcomes
