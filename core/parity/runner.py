"""Discovery of fixture handlers, running them over a directory, and the report table."""

from __future__ import annotations

import importlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from dinoforge.core.errors import DataError
from dinoforge.core.parity.compare import Check, FixtureHandler, Tolerances

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dinoforge.parity_cases"


def discover_handlers() -> list[FixtureHandler]:
    """Handlers from every installed ``dinoforge.parity_cases`` entry point, in entry-point order."""
    handlers: list[FixtureHandler] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        module = importlib.import_module(ep.value)
        handlers.extend(module.HANDLERS)
    return handlers


@dataclass
class ParityReport:
    """All checks of a run plus the files no handler recognised."""

    checks: list[Check] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when there was at least one check, every check passed and every file was recognised."""
        return bool(self.checks) and not self.unrecognised and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The failing checks."""
        return [c for c in self.checks if not c.passed]

    def table(self, *, only_failures: bool = False) -> str:
        """A fixed-width table: case, metric, error, max abs, tolerance, PASS/FAIL."""
        rows = [c for c in self.checks if not (only_failures and c.passed)]
        width = max([len(c.case) for c in rows] + [4])
        lines = [f"{'case':<{width}}  {'metric':<7}  {'error':>10}  {'max abs':>10}  {'tol':>8}  result"]
        for c in rows:
            max_abs = "" if math.isnan(c.max_abs) else f"{c.max_abs:.3e}"
            verdict = "PASS" if c.passed else "FAIL" + (f" ({c.note})" if c.note else "")
            lines.append(f"{c.case:<{width}}  {c.metric:<7}  {c.error:>10.3e}  {max_abs:>10}  "
                         f"{c.tolerance:>8.1e}  {verdict}")
        for name in self.unrecognised:
            lines.append(f"{name:<{width}}  no handler recognises this file  FAIL")
        n_fail = len(self.failures) + len(self.unrecognised)
        lines.append(f"{len(self.checks)} checks, {n_fail} failed")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (infinite errors become strings)."""
        def clean(c: Check) -> dict[str, Any]:
            d = asdict(c)
            d["passed"] = c.passed
            return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        return {"passed": self.passed, "checks": [clean(c) for c in self.checks], "unrecognised": self.unrecognised}

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _fixture_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.glob("*.pt")))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"parity: {path} does not exist")
    if not files:
        raise DataError(f"parity: no *.pt fixture files in {', '.join(map(str, paths))}")
    return files


def load_fixture(path: Path) -> dict[str, Any]:
    """Load a fixture file safely (tensors and plain Python values only)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt files
        raise DataError(f"parity: cannot read fixture {path}: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"parity: {path} does not hold a flat dict")
    return data


def run_parity(paths: list[Path] | Path, *, tolerances: Tolerances | None = None,
               handlers: list[FixtureHandler] | None = None) -> ParityReport:
    """Run every handler on every fixture file under ``paths`` (directories or files)."""
    tol = tolerances or Tolerances()
    handlers = discover_handlers() if handlers is None else handlers
    report = ParityReport()
    prev_threads = torch.get_num_threads()
    # The fixtures were generated with one intra-op thread; other counts move values by ~1e-7.
    torch.set_num_threads(1)
    try:
        for path in _fixture_files([paths] if isinstance(paths, Path) else list(paths)):
            fixture = load_fixture(path)
            handler = next((h for h in handlers if h.matches(fixture)), None)
            if handler is None:
                report.unrecognised.append(path.name)
                continue
            log.info("parity: %s -> %s", path.name, handler.name)
            with torch.random.fork_rng():
                report.checks.extend(handler.run(fixture, path.name, tol))
    finally:
        torch.set_num_threads(prev_threads)
    return report
