"""The product as it runs::

    runtime/     the real-time loop (stages, queues, threads, fast replay)
    bundle.py, selftest.py, session.py, replay.py, flash.py, demo.py
    cli/         the ``neurohand`` command, one module per command group
    bench/       every benchmark behind ``neurohand bench``
"""
from neurohand.deploy.version import __version__  # noqa: F401
