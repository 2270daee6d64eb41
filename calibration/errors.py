"""Calibration errors: the CLI prints them as one line on stderr and exits non-zero."""


class CalibrationError(Exception):
    """A calibration cannot be done or used: bad data, or a file that is truncated, tampered,
    from a newer schema, or for another bench.

    The message is one line that names the file or step and says what to change, because it is
    all the person at the bench gets to see.
    """
