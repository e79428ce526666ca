"""Subcommands of this area (see neurohand.deploy.cli).  Standard library only
at module level; handlers import what they need."""


def register(subparsers):
    """Add this area's subcommands to the ``neurohand`` parser."""
