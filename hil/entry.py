"""The `hil` console script: Ctrl-C while the command line is still loading exits quietly too."""

import sys


def main() -> None:
    try:
        from hil.cli import main as run
    except KeyboardInterrupt:  # torch and friends take a second to import
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    run()
