"""`hil finetune`."""

from __future__ import annotations
