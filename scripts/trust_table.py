"""Try the bad inputs a user can give ayf, as a user would (the `ayf` console script in a scratch
folder), and print a Markdown table: each input, the exit status, the line ayf answers with, and
whether anything in the folder changed or any code from a file ran.

    python scripts/trust_table.py > table.md

The files: three planted ones whose unpickling would create a marker file (a torch checkpoint with
a pickled object inside, a bare pickle as an EDM2 network .pkl is, an object .npy), copies of the
test fixtures (an ayf student and teacher of format 2, an EDM2 export), a Lightning checkpoint of
another program, and an earlier output.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
AYF = [sys.executable, "-m", "ayf"]


class Planted:
    """Unpickling it calls ``open(marker, "w")``: the marker appears if code from a file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def config(name):
    return os.path.join(ROOT, "configs", "toy", f"{name}.yaml")


FIT = ["fit", "--config", config("distill_emd"), "--trainer.max_steps", "1"]
CASES = [  # (what a user tried, argv)
    ("a checkpoint that holds a pickled object, to `sample`", ["sample", "--ckpt_path", "planted.ckpt", "--output", "x.npy"]),
    ("an EDM2-style network pickle, to `sample`", ["sample", "--ckpt_path", "planted.pkl", "--output", "x.npy"]),
    ("the pickled checkpoint, to `fit --ckpt_path` (resume)", [*FIT, "--ckpt_path", "planted.ckpt"]),
    ("the pickled checkpoint, to `test --ckpt_path`", ["test", *FIT[1:], "--ckpt_path", "planted.ckpt"]),
    ("the network pickle as a teacher in a config", [*FIT, "--model.teacher", "ayf.checkpoints.CheckpointTeacher",
                                                      "--model.teacher.init_args.ckpt_path", "planted.pkl"]),
    ("the network pickle, to `convert edm2`", ["convert", "edm2", "planted.pkl", "--output", "t.ckpt"]),
    ("the pickled checkpoint, to `upgrade`", ["upgrade", "planted.ckpt", "new.ckpt"]),
    ("an object .npy as `sample --noise`", ["sample", "--ckpt_path", "student.ckpt", "--noise", "planted.npy",
                                            "--output", "x.npy"]),
    ("an EDM2 export (not yet converted), to `sample`", ["sample", "--ckpt_path", "export.pt", "--solver", "euler",
                                                         "--output", "x.npy"]),
    ("an ayf teacher, to `convert edm2` again", ["convert", "edm2", "teacher.ckpt", "--output", "t.ckpt"]),
    ("a Lightning checkpoint of another program, to `sample`", ["sample", "--ckpt_path", "other.ckpt", "--output", "x.npy"]),
    ("`sample --output x.jpg` (np.save would write x.jpg.npy)", ["sample", "--ckpt_path", "student.ckpt", "--output", "x.jpg"]),
    ("`sample` onto an earlier output", ["sample", "--ckpt_path", "student.ckpt", "--output", "earlier.npy"]),
    ("`sample` onto its own checkpoint, with --overwrite", ["sample", "--ckpt_path", "student.ckpt", "--output",
                                                            "student.ckpt", "--overwrite"]),
    ("`convert edm2 X --output X --overwrite`", ["convert", "edm2", "export.pt", "--output", "export.pt", "--overwrite"]),
    ("`upgrade X X --overwrite`", ["upgrade", "student.ckpt", "student.ckpt", "--overwrite"]),
    ("`points` onto an earlier output", ["points", "moons", "--output", "earlier.npz"]),
    ("a misspelt option", [*FIT, "--model.objective.init_args.tangent_nrom", "0.3"]),
    ("a misspelt class", [*FIT, "--model.objective", "ayf.objectives.EMX"]),
    ("a misspelt trainer key", [*FIT, "--trainer.max_stpes", "5"]),
    ("a value of the wrong type", [*FIT, "--model.objective.init_args.warmup", "abc"]),
    ("a guided recipe whose teacher was never trained", ["fit", "--config", config("distill_autoguidance")]),
    ("a fit whose data do not fit its teacher (fails in set-up)",
     ["fit", "--config", config("distill_cfg"), "--model.teacher.init_args.teacher.init_args.ckpt_path", "teacher.ckpt",
      "--data.init_args.mixture.means", "[[0, 0, 0]]", "--data.init_args.mixture.stds", "[1]",
      "--data.init_args.mixture.weights", "[1]", "--data.init_args.classes", "null"]),
]


def prepare(folder: str) -> None:
    marker = os.path.join(folder, "code_ran")
    torch.save({"ayf": {"kind": "FlowMatching"}, "state_dict": {}, "payload": Planted(marker)},
               os.path.join(folder, "planted.ckpt"))
    with open(os.path.join(folder, "planted.pkl"), "wb") as fh:
        pickle.dump({"ema": Planted(marker)}, fh)
    np.save(os.path.join(folder, "planted.npy"), np.array([Planted(marker)], dtype=object), allow_pickle=True)
    shutil.copy(os.path.join(FIXTURES, "format2", "consistency.ckpt"), os.path.join(folder, "student.ckpt"))
    shutil.copy(os.path.join(FIXTURES, "format2", "teacher_cond.ckpt"), os.path.join(folder, "teacher.ckpt"))
    shutil.copy(os.path.join(FIXTURES, "edm2", "tiny_cond.pt"), os.path.join(folder, "export.pt"))
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, os.path.join(folder, "other.ckpt"))
    np.save(os.path.join(folder, "earlier.npy"), np.zeros((4, 2), dtype=np.float32))
    np.savez(os.path.join(folder, "earlier.npz"), x=np.zeros((4, 2), dtype=np.float32))


def snapshot(folder: str) -> dict:
    """Every file and folder under ``folder`` with the digest of its bytes."""
    out = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(base, name), folder) + "/"] = ""
        for name in files:
            with open(os.path.join(base, name), "rb") as fh:
                out[os.path.relpath(os.path.join(base, name), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def answer(stderr: str, folder: str) -> str:
    """The error line ayf printed (the last line of stderr otherwise), with the scratch folder's path cut."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ayf: error:")]
    line = (errors or lines or [""])[-1]
    for path in (os.path.realpath(folder), folder):
        line = line.replace(path + os.sep, "").replace(path, ".")
    return line


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for what, argv in CASES:
            before = snapshot(folder)
            run = subprocess.run(AYF + argv, cwd=folder, env=env, capture_output=True, text=True)
            after = snapshot(folder)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            errors = [line for line in run.stderr.splitlines() if line.startswith("ayf: error:")]
            rows.append((what, "ayf " + " ".join(argv).replace(ROOT + os.sep, ""), run.returncode, len(errors),
                         answer(run.stderr, folder), ", ".join(changed) or "nothing"))
        ran = os.path.exists(os.path.join(folder, "code_ran"))
    print("| input | command | exit | error lines | what ayf says | changed in the folder |")
    print("|---|---|---|---|---|---|")
    for what, cmd, code, count, line, changed in rows:
        cell = line.replace("|", "\\|")
        print(f"| {what} | `{cmd}` | {code} | {count} | {cell} | {changed} |")
    print(f"\ncode from a planted file ran: {'YES' if ran else 'no'}")
    return 1 if ran else 0


if __name__ == "__main__":
    sys.exit(main())
