"""The ``dasslab`` command: each module contributes its sub-commands through ``register``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

COMMAND_MODULES = (
    "dasslab.runs",
    "dasslab.toystreets",
    "dasslab.metrics",
    "dasslab.seg",
    "dasslab.diffusion.ddpm",
    "dasslab.diffusion.sdedit",
    "dasslab.diffusion.sgg",
    "dasslab.diffusion.ptl",
    "dasslab.zeroshot",
    "dasslab.kpn",
    "dasslab.cyclegan",
    "dasslab.report",
)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dasslab",
        description="Image domain translation for domain-adaptive semantic segmentation: a workbook.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if not _module_exists(name):
            continue
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dasslab.runs import RunError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (RunError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"dasslab {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
