"""Parity handlers for the pretraining fixtures (losses, masking, schedules, parameter groups, train step)."""

from __future__ import annotations

HANDLERS: list = []
