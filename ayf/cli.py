"""The ``ayf`` command line: Lightning's fit/validate/test, and the subcommands of
:mod:`ayf.commands`. Wiring only; the help text is generated from the commands themselves."""
from __future__ import annotations

import os
import sys

from ayf import commands

LIGHTNING = {"fit": "train a task from a config (resume with --ckpt_path CKPT or --ckpt_path last)",
             "validate": "run the validation loop of a config on a checkpoint (--ckpt_path CKPT)",
             "test": "run the test loop of a config on a checkpoint (--ckpt_path CKPT), FD / KID / PR included"}


def help_text() -> str:
    names = list(LIGHTNING) + commands.names()
    lines = [f"usage: ayf {{{','.join(names)}}} [options]", "",
             "Align Your Flow: distil diffusion / flow-matching teachers into few-step flow maps.", "",
             "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING.items()]
    lines += [f"  {name:<10} {commands.summary(commands.load(name))}" for name in commands.names()]
    lines += ["", "`ayf SUBCOMMAND --help` explains each one's options; `ayf fit --help` lists every config key;",
              "`ayf --verbose ...` (or AYF_VERBOSE=1) prints a config error's full report.",
              "Configs: configs/<dataset>/<stage>.yaml; guides: README.md and docs/cli.md."]
    return "\n".join(lines)


def main(args=None) -> int:
    """Entry point of the ``ayf`` console script; returns the exit status."""
    from ayf.errors import user_error

    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    verbose = "--verbose" in args or os.environ.get("AYF_VERBOSE", "") not in ("", "0")
    if "--verbose" in args:  # ayf's own flag: the full report of a config that does not parse
        args.remove("--verbose")
        if from_argv:
            sys.argv.remove("--verbose")
    if not args or args[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    cmd, rest = args[0], args[1:]
    try:
        if cmd in LIGHTNING:
            from ayf.commands.lightning import AyfCLI

            AyfCLI(None if from_argv else args)  # None: LightningCLI reads sys.argv itself
            return 0
        if cmd not in commands.names():
            print(f"ayf: error: unknown subcommand {cmd!r}; choose one of {', '.join([*LIGHTNING, *commands.names()])}",
                  file=sys.stderr)
            return 2
        module = commands.load(cmd)
        return module.run(module.build_parser(f"ayf {cmd}").parse_args(rest))
    except Exception as err:  # noqa: BLE001 - user errors may arrive wrapped by jsonargparse
        cause = user_error(err)
        if cause is None and type(err).__name__ == "ArgumentError":  # jsonargparse: a config that does not parse
            from ayf.commands.lightning import config_error_line

            cause = str(err) if verbose else f"{config_error_line(str(err))} (`--verbose` shows the full report)"
        if cause is None:
            raise
        print(f"ayf: error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
