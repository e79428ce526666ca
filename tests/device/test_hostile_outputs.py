"""The output-path rule every command applies (firmware_bridge/shared/outputs.py), tried with hostile paths."""
import os

import pytest

from neurohand.firmware_bridge.shared.errors import UsageError
from neurohand.firmware_bridge.shared.outputs import check_output_path


def test_a_new_file_in_an_existing_directory_is_allowed(tmp_path):
    assert check_output_path("--out", str(tmp_path / "new.json")) == str(tmp_path / "new.json")


@pytest.mark.parametrize("path", ["", "   ", "/proc/x", "/proc/self/status", "/sys/kernel/x", "/dev/sda0",
                                  "nul\x00byte"])
def test_paths_that_are_no_files_to_write_are_refused(path):
    with pytest.raises(UsageError):
        check_output_path("--out", path)


def test_dev_null_is_a_sink_people_use():
    assert check_output_path("--stats-json", "/dev/null") == "/dev/null"


def test_a_directory_a_missing_parent_and_a_read_only_directory_are_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path("--record", str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path("--record", str(tmp_path / "missing" / "x.nhr"))
    # /proc/1 cannot take a new file even for root: the probe, not the mode bits, decides.
    with pytest.raises(UsageError):
        check_output_path("--record", "/proc/1/newfile")


def test_an_existing_file_needs_force_and_is_never_an_input(tmp_path):
    existing = tmp_path / "old.json"
    existing.write_text("keep me")
    with pytest.raises(UsageError, match="--force"):
        check_output_path("--stats-json", str(existing))
    assert check_output_path("--stats-json", str(existing), force=True) == str(existing)
    assert existing.read_text() == "keep me"   # checking writes nothing
    with pytest.raises(UsageError, match="input"):
        check_output_path("--record", str(existing), inputs=[str(existing)], force=True)


def test_an_output_inside_an_input_directory_or_through_a_symlink_is_refused(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="inside"):
        check_output_path("--stats-json", str(bundle / "stats.json"), inputs=[str(bundle)], force=True)
    with pytest.raises(UsageError, match="input"):
        check_output_path("--stats-json", str(bundle / "manifest.json"), inputs=[str(bundle)], force=True)
    link = tmp_path / "alias.nhr"
    recording = tmp_path / "session.nhr"
    recording.write_bytes(b"data")
    os.symlink(str(recording), str(link))
    with pytest.raises(UsageError, match="input"):
        check_output_path("--record", str(link), inputs=[str(recording)], force=True)
    with pytest.raises(UsageError, match="input"):
        check_output_path("--record", os.path.join(str(tmp_path), ".", "session.nhr"), inputs=[str(recording)],
                          force=True)


def test_directory_outputs_must_be_empty_unless_forced(tmp_path):
    out = tmp_path / "bundle"
    assert check_output_path("--out", str(out), directory=True) == str(out)
    out.mkdir()
    assert check_output_path("--out", str(out), directory=True) == str(out)
    (out / "x").write_text("")
    with pytest.raises(UsageError, match="not empty"):
        check_output_path("--out", str(out), directory=True)
    assert check_output_path("--out", str(out), directory=True, force=True) == str(out)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        check_output_path("--out", str(afile), directory=True, force=True)


def test_python_warnings_print_as_one_neurohand_line(capsys):
    import warnings

    from neurohand.deploy.cli import main as cli_main
    saved = warnings.showwarning
    try:
        cli_main._warnings_as_one_line("replay")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("recording is truncated\nafter 3 s", UserWarning)
    finally:
        warnings.showwarning = saved
    err = capsys.readouterr().err
    assert err == "neurohand replay: warning: recording is truncated after 3 s\n"


def test_an_input_path_with_a_nul_byte_is_one_usage_error():
    from neurohand.firmware_bridge.shared.checks import check_file_exists
    with pytest.raises(UsageError, match="NUL"):
        check_file_exists("RECORDING", "session\x00.nhr")


def test_an_atomic_write_never_replaces_a_device_node_fifo_or_directory(tmp_path):
    from neurohand.firmware_bridge.shared.atomic import write_atomic, write_json_atomic
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for target in (fifo, str(tmp_path)):
        with pytest.raises(UsageError, match="not a regular file"):
            write_atomic(target, b"x")
    assert os.path.isdir(str(tmp_path)) and not os.path.isfile(fifo) and os.path.exists(fifo)
    # As root, a rename over /dev/null would replace the device node: the writer writes into it instead.
    before = os.stat("/dev/null")
    write_json_atomic("/dev/null", {"a": 1})
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert not os.path.isfile("/dev/null")
    # ... and no temporary file was made beside it (atomic_path's would be /dev/.null.*).
    assert not [name for name in os.listdir("/dev") if name.startswith(".null.")]
