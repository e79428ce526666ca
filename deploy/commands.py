"""Runtime and deployment subcommands (see neurohand.deploy.cli).  Standard
library only at module level; handlers import what they need."""


def register(subparsers):
    """Add the runtime and deployment subcommands to the ``neurohand`` parser."""
