"""Shared test configuration.

tests/device/ holds the tests of everything the Jetson runs; they must pass
under Python 3.6 with numpy 1.19 and no torch or scipy (those tests that
compare against scipy skip where it is absent).  tests/workstation/ holds the
rest and runs under the workstation Python only.
"""
import os

import pytest

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", default=False,
                     help="run the long soak tests (make soak)")


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: long reliability run, only with --run-soak")


def pytest_collection_modifyitems(config, items):
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
