"""The `hil` console script: Ctrl-C while the command line is still loading exits quietly too,
and a signal after the command has finished cannot turn its exit into a death by signal (the
interpreter's shutdown puts Python's handlers back to the default)."""

import signal
import sys


def main() -> None:
    try:
        from hil.cli import main as run
    except KeyboardInterrupt:  # torch and friends take a second to import
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        run()
    finally:  # the command is over, its light off and its files closed
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
