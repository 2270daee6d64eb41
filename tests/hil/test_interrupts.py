"""Signals held back while a block must run whole, and raised when it ends."""

import threading

import pytest

from hil.interrupts import arm, interrupt, uninterrupted


@pytest.fixture(autouse=True)
def armed():
    arm()
    yield
    arm()


def test_an_interrupt_outside_a_block_raises_at_once():
    with pytest.raises(KeyboardInterrupt):
        interrupt(KeyboardInterrupt)


def test_an_interrupt_inside_nested_blocks_waits_for_the_outermost_end():
    ran = []
    with pytest.raises(KeyboardInterrupt), uninterrupted():
        with uninterrupted():
            interrupt(KeyboardInterrupt)
            ran.append("inner")
        ran.append("outer")
    assert ran == ["inner", "outer"]
    with uninterrupted():  # nothing is left pending for the next block
        ran.append("next")


def test_a_block_on_another_thread_holds_nothing():
    held = []

    def worker():
        with uninterrupted():
            try:
                interrupt(KeyboardInterrupt)
            except KeyboardInterrupt:
                held.append(False)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert held == [False]


def test_after_the_first_interrupt_later_ones_are_ignored():
    with pytest.raises(KeyboardInterrupt):
        interrupt(KeyboardInterrupt)
    interrupt(KeyboardInterrupt)  # the run is already stopping: its clean-up runs undisturbed
    with uninterrupted():
        interrupt(KeyboardInterrupt)
