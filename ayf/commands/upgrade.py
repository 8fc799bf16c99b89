"""Convert a checkpoint written by an older ayf to the current layout.

The original file is left as it is; ``ayf fit/test --ckpt_path`` need the converted one, while
``ayf sample``, teachers and students read older files directly.
"""
from __future__ import annotations

import argparse

from ayf.checkpoints import FORMAT, describe, is_current, upgrade
from ayf.io import check_output, load_torch, save_torch


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="checkpoint written by an older `ayf fit`")
    p.add_argument("new", help="where to write the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def run(args) -> int:
    check_output(args.new, args.overwrite, inputs=(args.old,))
    ckpt = load_torch(args.old, "checkpoint", lambda c: isinstance(c, dict) and "ayf" in c, "ayf fit", explain=describe)
    if is_current(ckpt):
        print(f"{args.old} is already in the current layout (format {FORMAT}); nothing written")
        return 0
    save_torch(upgrade(ckpt), args.new)
    print(f"wrote {args.new} (format {FORMAT})")
    return 0
