import subprocess
import sys

import pytest

from neurohand.deploy.cli import main as cli
from neurohand.deploy.version import __version__
from neurohand.firmware_bridge.shared import checks
from neurohand.firmware_bridge.shared.errors import UsageError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurohand.deploy"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def test_version_is_printed():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "neurohand {}".format(__version__)


def test_no_command_prints_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "COMMAND" in result.stderr


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names = sorted(subparsers[0].choices) if subparsers else []
    for name in names:
        result = run_cli(name, "--help")
        assert result.returncode == 0, name
        assert "usage: neurohand " + name in result.stdout


def test_device_cli_does_not_import_torch():
    code = ("import sys; from neurohand.deploy.cli import main as cli; cli.build_parser(); "
            "print('torch' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.check_output([sys.executable, "-c", code], universal_newlines=True)
    assert out.split() == ["False", "False"]


def test_check_option_suggests_close_match():
    with pytest.raises(UsageError, match="did you mean 'onnxruntime'"):
        checks.check_option("backend", "onnxruntim", ["numpy", "onnxruntime"])
    assert checks.check_option("backend", "numpy", ["numpy"]) == "numpy"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "3", True])
def test_check_number_rejects_non_finite_and_non_numbers(value):
    with pytest.raises(UsageError):
        checks.check_number("rate", value)


def test_check_int_bounds():
    assert checks.check_int("channels", 16, minimum=1) == 16
    with pytest.raises(UsageError, match="at least 1"):
        checks.check_int("channels", 0, minimum=1)
    with pytest.raises(UsageError, match="integer"):
        checks.check_int("channels", 1.5)


def test_check_file_exists(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        checks.check_file_exists("recording", str(tmp_path / "missing.nh"))
    with pytest.raises(UsageError, match="not a file"):
        checks.check_file_exists("recording", str(tmp_path))


@pytest.mark.parametrize("args", [["simulat"], ["info"], ["bench", "--no-such-flag"], ["selftest", "b", "--backend", "x"]])
def test_bad_arguments_are_one_line_with_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], result.stderr
