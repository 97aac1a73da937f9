"""``patchcast`` — one console script, one subcommand per module in :mod:`patchcast.commands`.

Each command module exposes ``register(subparsers)``; heavy imports (torch, timm) happen inside the
handlers so ``patchcast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from shared import __version__
from shared.errors import PatchCastError

# Order here is the order in --help.
COMMAND_MODULES = ["info", "config", "codecs", "train", "broker", "eval", "eval_region", "monitor", "health", "worker",
                   "edge", "workers", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchcast",
        description="PatchCast: edge devices send only the ViT patches that matter; a worker pool answers "
        "over MQTT. Run 'patchcast COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"patchcast {__version__}")
    parser.add_argument("--validate-config", metavar="FILE",
                        help="check a config file (unknown keys, types, ranges) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"patchcast.commands.{name}").register(sub)
    return parser


def _patchcast_error(exc: BaseException) -> PatchCastError | None:
    """The first :class:`PatchCastError` in a (nested) exception group, if any."""
    if isinstance(exc, PatchCastError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _patchcast_error(inner)
            if found is not None:
                return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validate_config:
        from shared.config import load_config

        try:
            load_config(args.validate_config)
        except PatchCastError as exc:
            print(f"patchcast: {args.validate_config}: invalid: {exc.message}", file=sys.stderr)
            return 1
        print(f"{args.validate_config}: valid")
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except PatchCastError as exc:
        # Expected failures (bad config, missing file, broker down) get one clear line, not a traceback.
        print(f"patchcast {args.command}: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # A service's task group failed: the same one line when an expected failure ended it
        # (e.g. the broker refused the login), the traceback otherwise.
        found = _patchcast_error(group)
        if found is None:
            raise
        print(f"patchcast {args.command}: error [{found.code}]: {found.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"patchcast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
