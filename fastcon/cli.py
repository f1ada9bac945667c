"""The ``fastcon`` command line (also ``python -m fastcon``).

Each sub-command lives in its own module, imported only when it runs, so that
``fastcon bench`` does not need timm and ``fastcon finetune`` does not need the
benchmark dependencies. A module registers itself with ``register(subparsers)``
and sets ``func`` on its parser to a callable taking the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command module -> what it provides
_COMMAND_MODULES = ("fastcon.info", "fastcon.harness.cli", "fastcon.harness.curve", "fastcon.bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcon", description="Supervised contrastive fine-tuning and benchmarks with fastcon's losses."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == name or name.startswith(exc.name + ".")):
                continue  # that part of fastcon is not present in this build
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
