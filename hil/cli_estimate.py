"""`hil estimate`."""

from __future__ import annotations
