"""Parity checks of dinoforge against golden outputs of the official DINOv2 code.

A fixture directory holds ``*.pt`` files (flat dicts loaded with ``weights_only=True``; the format is defined
by ``shared/fixtures/dinov2/README.md``). Each file is recognised by its *keys*, not its name, and handed to
the first registered :class:`FixtureHandler` that claims it; handlers rebuild the models and inputs from the
file itself, so any directory in that format works whatever its sizes.

Handlers are registered through the ``dinoforge.parity_cases`` entry-point group: each entry names a module
with a ``HANDLERS`` list. ``core`` registers the backbone handler; ``pretrain`` adds losses, masking,
schedules, parameter groups and the full training step.
"""

from dinoforge.core.parity.compare import (
    Check,
    FixtureHandler,
    Tolerances,
    check_abs,
    check_exact,
    check_maxnorm,
    check_rel,
)
from dinoforge.core.parity.runner import ParityReport, discover_handlers, run_parity

__all__ = ["Check", "FixtureHandler", "ParityReport", "Tolerances", "check_abs", "check_exact", "check_maxnorm",
           "check_rel", "discover_handlers", "run_parity"]
