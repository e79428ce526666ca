"""Shared test configuration.

tests/device/ holds the tests of everything the Jetson runs; they must pass
under Python 3.6 with numpy 1.19 and no torch or scipy (those tests that
compare against scipy skip where it is absent).  tests/workstation/ holds the
rest and runs under the workstation Python only.
"""
import os
import signal

import pytest

# A suite started in the background (`make test &`, a CI step run with `&`) inherits SIGINT ignored, and
# so would every child process that a test stops with SIGINT as Ctrl-C does: Python installs its
# KeyboardInterrupt handler only where SIGINT is not ignored.  A handler here is reset to the default in
# each child at exec, so the children see Ctrl-C as a user's terminal sends it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", default=False,
                     help="run the long soak tests (make soak)")
    # make test runs tests/device once, under Python 3.6 (the Jetson's), and writes down what that
    # run had to skip (comparisons with scipy or ONNX Runtime, which the device lacks); the workstation
    # run then takes those device tests and leaves the rest to the 3.6 run (make test-fast runs all).
    parser.addoption("--record-skips", metavar="FILE", default=None,
                     help="write the node ids of the tests this run skipped (soak tests aside) to FILE")
    parser.addoption("--device-tests-from", metavar="FILE", default=None,
                     help="of tests/device, run only the node ids listed in FILE (written by --record-skips)")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long reliability run, only with --run-soak")


def _is_device_test(item):
    return "/tests/device/" in str(item.fspath).replace(os.sep, "/")


def pytest_collection_modifyitems(config, items):
    listed_file = config.getoption("--device-tests-from")
    if listed_file is not None:
        with open(listed_file, encoding="utf-8") as handle:
            listed = set(line.rstrip("\n") for line in handle if line.strip())
        keep = [item for item in items if not _is_device_test(item) or item.nodeid in listed]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with make soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data():
    """Path of ../shared/data, or skip where the real recordings are absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


_SKIPPED = []


def pytest_runtest_logreport(report):
    if report.skipped and "soak" not in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session):
    path = session.config.getoption("--record-skips")
    if path is not None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(nodeid + "\n" for nodeid in sorted(set(_SKIPPED)))
