"""`hil evaluate`."""

from __future__ import annotations
