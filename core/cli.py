"""The ``dinoforge`` console script.

Subcommands come from the ``dinoforge.commands`` entry-point group: each entry names a module with a
``register(subparsers)`` function. Those modules import only ``argparse``; the work each command does is
imported when it runs, so ``dinoforge --help`` stays fast and ``core`` needs no knowledge of the stages.

Errors caused by the user (:class:`~dinoforge.core.errors.DinoforgeError`) print one message and exit with a
non-zero status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "dinoforge.commands"
#: Packages of the training install (extra ``train``) that the torch-free edge install lacks.
TRAINING_PACKAGES = frozenset({"torch", "torchvision", "timm", "faiss", "safetensors", "pyarrow", "pandas",
                               "matplotlib"})


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="dinoforge",
        description="Pretrain, distill, export and serve DINOv2-style vision foundation models.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        importlib.import_module(ep.value).register(subparsers)
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbosity == 0:
        # Stage code reports progress with INFO logs; show them for dinoforge without -v, not for libraries.
        logging.getLogger("dinoforge").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    from dinoforge.core.errors import DinoforgeError  # light module; imported here to keep --help minimal

    try:
        status = args.func(args)
    except DinoforgeError as err:
        print(f"dinoforge {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAINING_PACKAGES:
            raise
        # The edge install (`dinoforge[edge]`) has no torch: say which install the command needs.
        print(f"dinoforge {args.command}: error: this command needs {err.name}, which this installation lacks "
              f"(the edge runtime serves and embeds ONNX exports only); install \"dinoforge[train]\"",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinoforge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
