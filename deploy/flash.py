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
   user in the dialout group, then enable and (re)start it; the unit has no
   network, unless it is asked to use Lab Streaming Layer (``lsl_allow``:
   then IPv4/IPv6 sockets to the addresses given, nothing else; docs/safety.md);
5. optionally the maximum-performance power mode (nvpmodel -m 0, jetson_clocks).

SSH uses keys only: BatchMode (never a password prompt), password and
keyboard-interactive authentication off.  Nothing is stored but the known-hosts
entry ssh itself keeps.  Privileged steps use ``sudo -n`` unless the remote
user is root, so a missing sudo rule fails at once instead of hanging.
"""
import collections
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from neurohand.decoder.backend_registry import BACKEND_CHOICES
from neurohand.deploy.bundle import MANIFEST, load_bundle
from neurohand.firmware_bridge.shared.errors import BundleError, UsageError

SERVICE_NAME = "neurohand"
PACKAGE_FOLDERS = ("decoder", "firmware_bridge", "train", "deploy")
SOURCE_ITEMS = ("setup.py", "README.md") + PACKAGE_FOLDERS

FlashSettings = collections.namedtuple("FlashSettings", [
    "install_dir", "system_root", "service_user", "remote_python", "chip_port", "hand", "backend",
    "fp16", "skip_engine", "max_performance", "chip_usb", "hand_usb", "start_service",
    # Lab Streaming Layer (docs/lab-streams.md): the addresses the service may reach (a tuple of
    # IPAddressAllow= entries; None: no network at all, the default), and --lsl-outlet's stream name.
    "lsl_allow", "lsl_outlet"])
FlashSettings.__new__.__defaults__ = (None, None)

Step = collections.namedtuple("Step", ["description", "command", "upload"])  # upload: local file piped to stdin


# What may reach a systemd unit, a udev rule or a command line.  Whitelists, not escaping: systemd
# splits ExecStart= on its own quoting, expands %-specifiers and $VARIABLES in it, and a newline starts
# a new directive (a second User= line wins over the first); ssh reads a leading '-' as an option and
# expands %-tokens in file options.  None of these characters has a place in a path, a user or a host.
_PATH_CHARACTERS = re.compile(r"^[A-Za-z0-9_./+:-]+\Z")   # \Z: '$' would let a final newline through
# useradd's portable user name (shadow-utils NAME_REGEX without the trailing '$' of machine accounts).
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
_SSH_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\Z")
# A DNS name or IPv4 address, or a bare IPv6 address (no %scope: ssh would expand the '%').
_SSH_HOST = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|[0-9A-Fa-f:.]{2,45})\Z")
MAX_PATH_CHARS = 200
# What LSL may be given in a unit: a stream name or query of plain characters, systemd's address keywords
# (any is not one of them: LSL is let reach named addresses only) or IP prefixes.
_LSL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_LSL_CHIP = re.compile(r"^lsl:(?:(?:name|type|source_id)=)?[A-Za-z0-9_.-]{1,64}\Z")
_BRAINFLOW_CHIP = re.compile(r"^brainflow:([a-z0-9_]{1,40})(?::(.*))?\Z", re.DOTALL)
LSL_ADDRESS_KEYWORDS = ("localhost", "link-local", "multicast")
#: Socket families LSL needs: IPv4 and IPv6 (its TCP data and UDP discovery) and netlink, which
#: getifaddrs() uses to list the interfaces liblsl multicasts on (a kernel socket, no network).
LSL_ADDRESS_FAMILIES = ("AF_INET", "AF_INET6", "AF_NETLINK")


def _shown(value, limit=80):
    """``value`` for a one-line message: repr (control characters escaped), cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_absolute_path(name, value):
    """``value`` if it is an absolute, normalised path of plain characters; else UsageError.

    Plain: letters, digits and ``_ . / + : -`` -- nothing a systemd unit, a udev
    rule or a shell would interpret (whitespace, newlines, quotes, backslash,
    ``%``, ``$``, ``;``), and no ``..`` or ``//`` (what the unit names is what runs).
    """
    if not isinstance(value, str) or not value:
        raise UsageError("{} must be an absolute path, but got {}".format(name, _shown(value)))
    if len(value) > MAX_PATH_CHARS:
        raise UsageError("{} is {} characters long; at most {} are accepted".format(name, len(value), MAX_PATH_CHARS))
    if not _PATH_CHARACTERS.match(value):
        raise UsageError("{} {} holds a character other than letters, digits and _ . / + : - (no spaces, quotes, "
                         "%, $ or control characters: it goes into the systemd unit and remote commands)".format(
                             name, _shown(value)))
    if not value.startswith("/") or os.path.normpath(value) != value or value.startswith("//"):
        raise UsageError("{} must be an absolute, normalised path (no '..', '.', '//' or trailing '/'), but got "
                         "{}; did you mean {}?".format(name, _shown(value), _shown(os.path.normpath("/" + value.lstrip("/")))))
    return value


def check_service_user(value):
    """``value`` if it is a plain, unprivileged user name; else UsageError."""
    # A number is a user id to systemd (User=0 is root).
    if isinstance(value, str) and (value.strip() == "root" or re.match(r"\s*[0-9]+\s*\Z", value)):
        raise UsageError("--service-user {}: the service must run as an unprivileged user (default "
                         "neurohand); it needs only the dialout and video groups".format(_shown(value)))
    if not isinstance(value, str) or not _USER_NAME.match(value):
        raise UsageError("--service-user must be a user name of lowercase letters, digits, '_' and '-' starting "
                         "with a letter or '_' (at most 32), but got {}".format(_shown(value)))
    return value


def check_hand_spec(value):
    """``value`` if it is ``none`` or DRIVER:/absolute/path; else UsageError (the unit's --hand)."""
    from neurohand.firmware_bridge.hands import parse_hand_spec
    if not isinstance(value, str) or not _PATH_CHARACTERS.match(value) or len(value) > MAX_PATH_CHARS + 20:
        raise UsageError("--hand {} holds a character other than letters, digits and _ . / + : - "
                         "(it goes into the systemd unit), or is too long".format(_shown(value)))
    name, target = parse_hand_spec(value)
    if target is not None:
        check_absolute_path("--hand {} target".format(name), target)
    return value


def check_remote_python(value):
    """``value`` if it is a command name or an absolute path of plain characters; else UsageError."""
    if not isinstance(value, str) or not _PATH_CHARACTERS.match(value) or value.startswith("-") \
            or len(value) > MAX_PATH_CHARS:
        raise UsageError("--remote-python must be a command name or absolute path of letters, digits and "
                         "_ . / + : - not starting with '-', but got {}".format(_shown(value)))
    if "/" in value:
        check_absolute_path("--remote-python", value)
    elif not re.match(r"[A-Za-z][A-Za-z0-9_.+-]*\Z", value):
        raise UsageError("--remote-python {} is not a command name (python3, python3.6, ...)".format(_shown(value)))
    return value


def check_host(value):
    """``value`` if it is [USER@]HOST[:PORT] with a plain user and host; else UsageError.

    Never starts with '-' (ssh would read it as an option; it is also passed after ``--``).
    """
    message = "host {} must be [USER@]HOST[:PORT]: a user of letters, digits, '_', '.' and '-', a host name " \
              "or IP address, a port 1..65535, none starting with '-'".format(_shown(value))
    if not isinstance(value, str) or len(value) > 300:
        raise UsageError(message)
    user, at, host = value.rpartition("@")
    if at and not _SSH_USER.match(user):
        raise UsageError(message)
    name, port = SshTarget.split_port(host)
    if not _SSH_HOST.match(name) or not 1 <= port <= 65535:
        raise UsageError(message)
    return value


def check_ssh_file(name, value):
    """An existing file for an ssh option, as an absolute path ssh reads as it is (no %-tokens, no spaces)."""
    if value is None:
        return None
    path = os.path.abspath(os.fspath(value))
    if not _PATH_CHARACTERS.match(path) or len(path) > 4 * MAX_PATH_CHARS:
        raise UsageError("{} {}: ssh expands %-tokens and splits on spaces in file options; use a path of "
                         "letters, digits and _ . / + : -".format(name, _shown(value)))
    return path


def check_settings(settings):
    """UsageError (one line) unless every value of ``settings`` may go into a unit, a rule or a command."""
    check_absolute_path("--install-dir", settings.install_dir)
    if settings.install_dir == "/":
        raise UsageError("--install-dir must be a folder of its own, not '/'")
    if settings.system_root not in ("", "/"):
        check_absolute_path("--system-root", settings.system_root)
    check_service_user(settings.service_user)
    check_remote_python(settings.remote_python)
    check_lsl_allow(settings.lsl_allow)
    check_unit_chip(settings.chip_port, settings.lsl_allow)
    if settings.lsl_outlet is not None:
        if settings.lsl_allow is None:
            raise UsageError("--lsl-outlet opens network sockets, which the service may not: give --allow-lsl with "
                             "the addresses its consumers have (docs/safety.md)")
        if not isinstance(settings.lsl_outlet, str) or not _LSL_NAME.match(settings.lsl_outlet):
            raise UsageError("--lsl-outlet in the unit must be 1 to 64 letters, digits, '_', '.' or '-', but got "
                             "{}".format(_shown(settings.lsl_outlet)))
    check_hand_spec(settings.hand)
    if settings.backend not in BACKEND_CHOICES:
        raise UsageError("--backend must be one of {}, but got {}".format(", ".join(BACKEND_CHOICES),
                                                                          _shown(settings.backend)))
    for name, usb_id in (("--chip-usb", settings.chip_usb), ("--hand-usb", settings.hand_usb)):
        if usb_id is None:
            continue
        if not (isinstance(usb_id, tuple) and len(usb_id) == 2 and all(isinstance(part, str) for part in usb_id)
                and parse_usb_id(name, ":".join(usb_id)) == usb_id):
            raise UsageError("{} must be a USB VENDOR:PRODUCT id (as parse_usb_id gives it), but got {}".format(
                name, _shown(usb_id)))
    return settings


def check_lsl_allow(value):
    """``value`` if it is None or a non-empty tuple of addresses LSL may reach; else UsageError.

    Each entry: ``localhost``, ``link-local``, ``multicast`` (systemd's names) or an IPv4/IPv6
    network in CIDR notation with no host bits set (``192.168.10.0/24``, ``10.0.0.7``); never
    everything (``any``, ``0.0.0.0/0``, ``::/0``).
    """
    if value is None:
        return None
    import ipaddress
    if not isinstance(value, (tuple, list)) or not value:
        raise UsageError("--allow-lsl needs at least one address (localhost, or the lab's subnet such as "
                         "192.168.10.0/24), but got {}".format(_shown(value)))
    for entry in value:
        if entry in LSL_ADDRESS_KEYWORDS:
            continue
        try:
            network = ipaddress.ip_network(entry if isinstance(entry, str) else "", strict=True)
        except ValueError as exc:
            raise UsageError("--allow-lsl {} is not {} nor an IP network like 192.168.10.0/24 ({})".format(
                _shown(entry), ", ".join(LSL_ADDRESS_KEYWORDS), str(exc).splitlines()[0][:80])) from None
        if network.prefixlen == 0:
            raise UsageError("--allow-lsl {} would let the service reach every address; name the lab's subnet "
                             "or localhost".format(_shown(entry)))
        if str(network) != entry and str(network.network_address) != entry:
            raise UsageError("--allow-lsl {}: write it as {}".format(_shown(entry), network))
    return value


def check_unit_chip(chip, lsl_allow):
    """The unit's --chip: an absolute device path, a plain ``lsl:`` query (with ``lsl_allow``) or a
    ``brainflow:BOARD[:/absolute/port]``; UsageError otherwise."""
    if isinstance(chip, str) and chip.startswith("lsl:"):
        if lsl_allow is None:
            raise UsageError("--chip {} reads a Lab Streaming Layer stream over the network, which the service "
                             "may not: give --allow-lsl too (docs/safety.md)".format(_shown(chip)))
        if not _LSL_CHIP.match(chip):
            raise UsageError("--chip {} in the unit must be lsl:NAME, lsl:type=TYPE or lsl:source_id=ID of 1 to 64 "
                             "letters, digits, '_', '.' or '-'".format(_shown(chip)))
        return chip
    found = _BRAINFLOW_CHIP.match(chip) if isinstance(chip, str) else None
    if found is not None:
        if found.group(2) is not None:
            check_absolute_path("--chip {} port".format(found.group(1)), found.group(2))
        return chip
    return check_absolute_path("--chip", chip)


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


def installed_tree():
    """The installed ``neurohand`` folder (site-packages/neurohand) holding the four sub-packages, or None."""
    import neurohand.deploy
    root = os.path.dirname(os.path.dirname(os.path.abspath(neurohand.deploy.__file__)))
    if all(os.path.isfile(os.path.join(root, folder, "__init__.py")) for folder in PACKAGE_FOLDERS):
        return root
    return None


def _installed_distribution():
    """The installed neurohand distribution's metadata; UsageError where it cannot be read."""
    from neurohand.deploy.version import __version__
    try:
        from importlib import metadata  # novermin (3.8+; guarded: flash runs on the workstation)
    except ImportError:
        raise UsageError("flashing from an installed (not source) neurohand needs Python 3.8 or later here; "
                         "run flash from a git checkout or pass --package ARCHIVE") from None
    try:
        distribution = metadata.distribution("neurohand")
    except metadata.PackageNotFoundError:
        raise UsageError("the installed neurohand has no package metadata (dist-info); reinstall it with pip, run "
                         "flash from a git checkout, or pass --package ARCHIVE") from None
    if distribution.version != __version__:
        raise UsageError("the installed neurohand metadata says version {} but the package is {}; reinstall it "
                         "with pip".format(distribution.version, __version__))
    return distribution


def _requirements(requires):
    """Requires-Dist lines -> (install_requires, extras_require) as setup() takes them."""
    install, extras = [], collections.OrderedDict()
    for line in requires or ():
        requirement, _, marker = line.partition(";")
        requirement, marker = requirement.strip(), marker.strip()
        found = _EXTRA_MARKER.search(marker)
        if found is None:
            install.append(requirement + ("; " + marker if marker else ""))
            continue
        rest = _EXTRA_MARKER.sub("", marker).strip()
        extras.setdefault(found.group(1), []).append(requirement + ("; " + rest if rest else ""))
    return install, dict(extras)


_EXTRA_MARKER = re.compile(r"""(?:\s+and\s+)?\bextra\s*==\s*["']([^"']+)["'](?:\s+and\s+)?""")

_GENERATED_SETUP = '''"""Written by neurohand flash from the installed distribution {name} {version}."""
from setuptools import setup

setup(
    name={name!r},
    version={version!r},
    description={summary!r},
    python_requires={python_requires!r},
    packages={packages!r},
    package_dir={package_dir!r},
    install_requires={install!r},
    extras_require={extras!r},
    entry_points={entry_points!r},
)
'''


def installed_setup_py(root, distribution):
    """A setup.py rebuilding the installed distribution from the package folders under ``root``."""
    packages = []
    for folder in PACKAGE_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            if "__init__.py" in filenames:
                packages.append("neurohand." + os.path.relpath(dirpath, root).replace(os.sep, "."))
    install, extras = _requirements(distribution.metadata.get_all("Requires-Dist"))
    entry_points = {}
    for entry in distribution.entry_points:
        entry_points.setdefault(entry.group, []).append("{} = {}".format(entry.name, entry.value))
    return _GENERATED_SETUP.format(
        name=distribution.metadata["Name"], version=distribution.version, summary=distribution.metadata["Summary"],
        python_requires=distribution.metadata["Requires-Python"], packages=sorted(packages),
        package_dir={"neurohand." + folder: folder for folder in PACKAGE_FOLDERS}, install=install, extras=extras,
        entry_points=entry_points)


def make_installed_archive(root, destination):
    """A pip-installable source archive of the installed package (no source checkout needed).

    The package folders as installed, with a setup.py written from the
    installed distribution's metadata (version, requirements, extras, the
    ``neurohand`` command): what the device installs is what runs here.
    """
    distribution = _installed_distribution()
    setup_py = installed_setup_py(root, distribution).encode("utf-8")

    def skip_caches(info):
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info
    with tarfile.open(destination, "w:gz") as archive:
        info = tarfile.TarInfo("neurohand-src/setup.py")
        info.size, info.mtime, info.mode = len(setup_py), int(time.time()), 0o644
        archive.addfile(info, io.BytesIO(setup_py))
        for folder in PACKAGE_FOLDERS:
            archive.add(os.path.join(root, folder), arcname="neurohand-src/" + folder, filter=skip_caches)
    return destination


def package_archive(destination):
    """The package to install on the devices: from the source checkout, else from the installed distribution."""
    root = source_tree()
    if root is not None:
        return make_source_archive(root, destination)
    root = installed_tree()
    if root is None:
        raise UsageError("the neurohand package folders were not found next to the installed package; "
                         "reinstall neurohand or pass --package ARCHIVE")
    return make_installed_archive(root, destination)


def make_source_archive(root, destination):
    """A pip-installable source archive (one top folder with setup.py)."""
    def skip_caches(info):
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info
    with tarfile.open(destination, "w:gz") as archive:
        for item in SOURCE_ITEMS:
            archive.add(os.path.join(root, item), arcname="neurohand-src/" + item, filter=skip_caches)
    return destination


def udev_rules(settings):
    check_settings(settings)
    lines = ["# Stable names for neurohand's serial devices (installed by neurohand flash)."]
    for usb_id, name in ((settings.chip_usb, "neurohand-chip"), (settings.hand_usb, "neurohand-hand")):
        if usb_id is not None:
            lines.append('SUBSYSTEM=="tty", ATTRS{{idVendor}}=="{}", ATTRS{{idProduct}}=="{}", '
                         'SYMLINK+="{}", GROUP="dialout", MODE="0660"'.format(usb_id[0], usb_id[1], name))
    return "\n".join(lines) + "\n"


def service_unit(settings):
    """The systemd unit: unprivileged, hardened, restarted on any exit."""
    check_settings(settings)
    neurohand = os.path.join(settings.install_dir, "venv", "bin", "neurohand")
    run = [neurohand, "run", "--bundle", os.path.join(settings.install_dir, "current"),
           "--chip", settings.chip_port, "--hand", settings.hand, "--backend", settings.backend,
           "--stats-json", "/var/lib/neurohand/stats.json"]
    families = ["AF_UNIX"]
    allow = []
    if settings.lsl_allow is not None:
        # Only what LSL needs, only when asked (docs/safety.md): its sockets, to the addresses named.
        families += list(LSL_ADDRESS_FAMILIES)
        allow = ["IPAddressAllow={}".format(" ".join(settings.lsl_allow))]
    if settings.lsl_outlet is not None:
        run += ["--lsl-outlet", settings.lsl_outlet]
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
        "RestrictAddressFamilies={}".format(" ".join(families)),
        "IPAddressDeny=any",
    ] + allow + [
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
    check_settings(settings)
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
        check_host(host)
        self.user_host, self.port = self.split_port(host)
        self.identity = identity
        self.known_hosts = known_hosts
        self.timeout_s = timeout_s

    @staticmethod
    def split_port(host):
        """'user@host:2222' -> ('user@host', 2222); without a port (or an IPv6 address), port 22."""
        if host.count(":") == 1:
            name, port = host.rsplit(":", 1)
            if re.match(r"[0-9]{1,5}\Z", port):     # not str.isdigit: it takes '²', which int() refuses
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
        # "--": whatever the host is, ssh never reads it as an option.
        return command + ["--", self.user_host, remote_command]

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
    """The bundle's manifest and the files it lists, as regular files (a link is refused, never shipped)."""
    with tarfile.open(destination, "w:gz") as archive:
        for name in [MANIFEST] + sorted(bundle.manifest["files"]):
            info = archive.gettarinfo(os.path.join(bundle.path, name), arcname=name)
            if not info.isfile():
                raise BundleError("bundle {!r}: {} is not a regular file; a bundle holds only its own files".format(
                    bundle.path, name))
            with open(os.path.join(bundle.path, name), "rb") as handle:
                archive.addfile(info, handle)
    return destination


def flash(bundle_path, hosts, settings, identity=None, known_hosts=None, dry_run=False, jobs=4,
          package=None, out=sys.stdout):
    """Flash every host (in parallel); return the list of DeviceOutcome (empty for a dry run)."""
    check_settings(settings)
    for host in hosts:
        check_host(host)
    if identity is not None and not os.path.isfile(identity):
        raise UsageError("identity file {} does not exist".format(_shown(identity)))
    identity = check_ssh_file("--identity", identity)
    known_hosts = check_ssh_file("--known-hosts", known_hosts)
    bundle = load_bundle(bundle_path)
    lock = threading.Lock()

    def progress(message):
        with lock:
            print(message, file=out)
            out.flush()

    with tempfile.TemporaryDirectory(prefix="neurohand-flash-") as staging:
        if package is not None:
            source_archive = package
        else:
            source_archive = package_archive(os.path.join(staging, "neurohand-src.tar.gz"))
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
