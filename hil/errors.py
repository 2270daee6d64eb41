"""User errors: `hil.cli.main` prints them as one line on stderr and exits non-zero."""


class UserError(Exception):
    """Bad input from the person at the bench: a file, a key, a value, a shape."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (lights off, captured frames stored, run "interrupted")."""
