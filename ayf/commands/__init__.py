"""The subcommands of ``ayf`` beside the Lightning ones (fit, validate, test), one module each.

Every command module has one shape: its docstring's first line is the summary that ``ayf
--help`` lists, ``build_parser(prog)`` returns its argparse parser (whose ``--help`` explains every
option) and ``run(args)`` does the work and returns the exit status. A module added here is a
subcommand; nothing else needs to name it.
"""
from __future__ import annotations

import importlib
import pkgutil

#: modules of this package that are not subcommands
NOT_COMMANDS = ("lightning",)


def names() -> list:
    """The subcommands, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in NOT_COMMANDS)


def load(name: str):
    """The module of subcommand ``name``."""
    return importlib.import_module(f"{__name__}.{name}")


def summary(module) -> str:
    """The first line of a command module's docstring."""
    line = (module.__doc__ or "").strip().splitlines()[0].rstrip(".")
    return line[:1].lower() + line[1:]
