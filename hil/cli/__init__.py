"""The `hil` command line: one module per command group, each thin (parse, call a job, print)."""

from hil.cli.commands import main

__all__ = ["main"]
