"""Comparison primitives and tolerances for parity checks (README "Suggested tolerances")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True, kw_only=True)
class Tolerances:
    """Default tolerances of the fixture README; ``scale`` loosens or tightens all float checks at once."""

    tokens_abs: float = 1e-5
    loss_rel: float = 1e-5
    probs_abs: float = 1e-5
    grad_maxnorm: float = 1e-4
    schedule_abs: float = 1e-12
    state_after_step_abs: float = 1e-6
    scale: float = 1.0

    def get(self, name: str) -> float:
        """Tolerance ``name`` times ``scale``."""
        return float(getattr(self, name)) * self.scale


@dataclass(frozen=True, kw_only=True)
class Check:
    """One compared quantity.

    Attributes:
        case: ``file:key`` of the reference value.
        metric: ``abs`` (max absolute error), ``rel`` (relative error of a scalar/tensor), ``maxnorm``
            (``max|ours - ref| / max|ref|``), ``exact`` (0 or 1 mismatch flag) or ``stat`` (a statistic).
        error: the measured error in that metric.
        tolerance: the bound; the check passes when ``error <= tolerance``.
        max_abs: max absolute error, reported for every float comparison.
        note: optional explanation (e.g. why a check failed to run).
    """

    case: str
    metric: str
    error: float
    tolerance: float
    max_abs: float = float("nan")
    note: str = ""

    @property
    def passed(self) -> bool:
        """True when the error is finite and within tolerance."""
        return self.error == self.error and self.error <= self.tolerance


class FixtureHandler(Protocol):
    """Recognises one kind of fixture file and checks dinoforge against it."""

    name: str

    def matches(self, fixture: Mapping[str, Any]) -> bool:
        """True when ``fixture`` (the loaded flat dict) is of this handler's kind."""
        ...

    def run(self, fixture: Mapping[str, Any], source: str, tol: Tolerances) -> list[Check]:
        """Compare dinoforge with every reference value in ``fixture``; ``source`` prefixes case names."""
        ...


def _as_tensor(x: Any) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _max_abs(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ours.numel() == 0 and ref.numel() == 0:
        return 0.0
    return (ours.double() - ref.double()).abs().max().item()


def _shape_mismatch(case: str, metric: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> Check | None:
    if tuple(ours.shape) != tuple(ref.shape):
        return Check(case=case, metric=metric, error=float("inf"), tolerance=tol,
                     note=f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    return None


def check_abs(case: str, ours: Any, ref: Any, tol: float) -> Check:
    """Max absolute error."""
    ours, ref = _as_tensor(ours), _as_tensor(ref)
    bad = _shape_mismatch(case, "abs", ours, ref, tol)
    if bad:
        return bad
    err = _max_abs(ours, ref)
    return Check(case=case, metric="abs", error=err, tolerance=tol, max_abs=err)


def check_rel(case: str, ours: Any, ref: Any, tol: float) -> Check:
    """Relative error ``max|ours - ref| / max(|ref|, tiny)`` for scalars (losses)."""
    ours, ref = _as_tensor(ours), _as_tensor(ref)
    bad = _shape_mismatch(case, "rel", ours, ref, tol)
    if bad:
        return bad
    err = _max_abs(ours, ref)
    denom = max(ref.double().abs().max().item(), 1e-30) if ref.numel() else 1.0
    return Check(case=case, metric="rel", error=err / denom, tolerance=tol, max_abs=err)


def check_maxnorm(case: str, ours: Any, ref: Any, tol: float) -> Check:
    """Per-tensor ``max|ours - ref| / max|ref|`` (gradients; element-wise relative error is meaningless)."""
    ours, ref = _as_tensor(ours), _as_tensor(ref)
    bad = _shape_mismatch(case, "maxnorm", ours, ref, tol)
    if bad:
        return bad
    err = _max_abs(ours, ref)
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return Check(case=case, metric="maxnorm", error=err / scale if scale > 0 else err, tolerance=tol, max_abs=err)


def check_exact(case: str, ours: Any, ref: Any) -> Check:
    """Exact equality of integer/bool tensors, ints, strings or lists; error is the number of mismatches."""
    if isinstance(ref, torch.Tensor) or isinstance(ours, torch.Tensor):
        ours_t, ref_t = _as_tensor(ours), _as_tensor(ref)
        if tuple(ours_t.shape) != tuple(ref_t.shape):
            return Check(case=case, metric="exact", error=float("inf"), tolerance=0.0,
                         note=f"shape {tuple(ours_t.shape)} != reference {tuple(ref_t.shape)}")
        mismatches = int((ours_t != ref_t).sum().item())
    else:
        mismatches = 0 if ours == ref else 1
    note = "" if mismatches == 0 else f"ours={_short(ours)} ref={_short(ref)}"
    return Check(case=case, metric="exact", error=float(mismatches), tolerance=0.0, note=note)


def _short(x: Any) -> str:
    text = repr(x.tolist() if isinstance(x, torch.Tensor) and x.numel() <= 8 else x)
    return text if len(text) <= 60 else text[:57] + "..."
