"""Running `hil` in-process, as a user would from a shell, for the command-line tests."""

import sys

from hil.cli import main


def run_hil(monkeypatch, capsys, *args):
    """Run `hil ARGS`; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["hil", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    cap = capsys.readouterr()
    return code, cap.out, cap.err
