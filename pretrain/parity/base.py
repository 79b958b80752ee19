"""Common behaviour of the pretraining parity handlers: a malformed fixture is a failed check, not a crash."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dinoforge.core.errors import DinoforgeError
from dinoforge.core.parity import Check, Tolerances


class GuardedHandler:
    """Runs :meth:`_checks`; a fixture that lacks keys or holds inconsistent shapes yields one failing check.

    Subclasses set ``name`` and implement ``matches`` and ``_checks``.
    """

    name = "pretrain"

    def run(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        """All checks of ``fixture``; a failure to run is reported as a failed check naming the problem."""
        try:
            return self._checks(fixture, source, tol)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, DinoforgeError) as err:
            return [Check(case=f"{source}:{self.name}", metric="exact", error=float("inf"), tolerance=0.0,
                          note=f"cannot run this {self.name} fixture: {type(err).__name__}: {err}")]

    def _checks(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        raise NotImplementedError
