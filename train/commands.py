"""Workstation subcommands: import, train, evaluate (see neurohand.deploy.cli).

Only the standard library at module level: this module is imported on the
Jetson too, to build the parser; torch is imported inside the handlers."""


def register(subparsers):
    """Add the workstation subcommands to the ``neurohand`` parser."""
