"""Ctrl-C and SIGTERM: raised once, and held back while a few lines must run whole.

A signal unwinds Python wherever it lands, between any two bytecodes: halfway through a store's
commit (some datasets resized, others not, and the close that follows fails on them), inside a
write to stdout (whose buffer then breaks the interpreter's exit, status 120), or inside the
clean-up a first Ctrl-C started (the light that should go dark). `hil.cli.main` routes both
signals through `interrupt`, which raises the first at once, or, inside `uninterrupted()`, when
the block ends; later ones are ignored, since the run is already stopping.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = {"held": 0, "pending": None, "raised": False}


def arm() -> None:
    """A new command starts: no signal held, none delivered yet."""
    _state.update(held=0, pending=None, raised=False)


def stopping() -> bool:
    """Whether a signal was delivered or is held: the run is stopping."""
    return _state["raised"] or _state["pending"] is not None


def interrupt(exc_type: type[BaseException]) -> None:
    """Raise `exc_type` now, or when the outermost uninterrupted() block ends; nothing once one
    was delivered."""
    if stopping():
        return
    if _state["held"]:
        _state["pending"] = exc_type
        return
    _state["raised"] = True
    raise exc_type


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Signals wait for the end of the block. Python runs handlers on the main thread only, so
    a block on another thread (a store's writer) needs no holding and holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
    exc_type = _state["pending"]
    if not _state["held"] and exc_type is not None:
        _state.update(pending=None, raised=True)
        raise exc_type
