"""Typed device errors: callers retry a timeout, reopen a disconnect, and report the rest."""


class DeviceError(RuntimeError):
    """A device refused or failed a request."""


class DeviceTimeout(DeviceError, TimeoutError):
    """A device did not answer within its finite timeout."""


class SourceEnded(DeviceTimeout):
    """A recorded source has no more frames: no retry brings one."""


class DeviceDisconnected(DeviceError, ConnectionError):
    """A device is gone (unplugged, closed, or never opened); `reconnect()` may bring it back."""
