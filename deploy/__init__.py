"""The product as it runs: the ``neurohand`` command line, bundles, engines,
self-test, flashing, the real-time loop and bench replay."""
from neurohand.deploy.version import __version__  # noqa: F401
