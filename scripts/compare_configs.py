"""Compare what every shipped recipe resolves to (`ayf fit --print_config`) at an older commit and
now, for refactors of configs/ that must not change a recipe's values.

    python scripts/compare_configs.py --base 755ce67

The base commit is checked out in a temporary git worktree and run with this checkout's Python
environment. Its model sections are mapped onto the current layout the way `ayf upgrade` maps
checkpoint hyperparameters (ayf.checkpoints.upgrade), with an old TangentWarmup callback's horizon
as the objective's warmup. A SamplePlot or ImageGrid without steps takes the steps it draws by
default, and a student net that a config no longer writes is compared with the net built on its
teacher (the teacher stage's net with an s embedding). Prints every value that differs, per recipe.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ayf.checkpoints import _upgrade_hparams_2, student_config  # noqa: E402

OVERLAYS = {"overlay imagenet64/fid": ["test", "imagenet64/distill_autoguidance", "imagenet64/fid"],
            "overlay scale/gpus": ["fit", "fashion_mnist/distill_emd", "scale/gpus"]}


def recipes(root):
    names = []
    for path in sorted(glob.glob(os.path.join(root, "configs", "*", "*.yaml"))):
        cfg = yaml.safe_load(open(path)) or {}
        if any(k == "model" or k.startswith("model.") for k in cfg):
            names.append(os.path.relpath(path, os.path.join(root, "configs"))[:-5])
    return names


def printed(root, sub, *configs):
    args = [sys.executable, "-m", "ayf", sub]
    for name in configs:
        args += ["--config", os.path.join("configs", f"{name}.yaml")]
    done = subprocess.run([*args, "--print_config"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root))
    if done.returncode != 0:
        return None
    return yaml.safe_load(done.stdout)


def flat(node, prefix=""):
    if isinstance(node, dict):
        return {k2: v2 for k, v in node.items() for k2, v2 in flat(v, f"{prefix}.{k}" if prefix else k).items()}
    if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        return {k2: v2 for i, v in enumerate(node) for k2, v2 in flat(v, f"{prefix}[{i}]").items()}
    return {prefix: node}


def as_current(old):
    """An old resolved config in the current layout."""
    old = copy.deepcopy(old)
    callbacks = old["trainer"].get("callbacks") or []
    horizon = next((c["init_args"]["horizon"] for c in callbacks if c["class_path"].endswith("TangentWarmup")), None)
    old["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].endswith("TangentWarmup")]
    kind = old["model"]["class_path"].rsplit(".", 1)[-1]
    old["model"]["init_args"] = _upgrade_hparams_2(old["model"]["init_args"], kind)
    objective = old["model"]["init_args"].get("objective")
    if objective is not None and horizon is not None:
        objective["init_args"]["warmup"] = horizon
    return old


def with_default_steps(new):
    new = copy.deepcopy(new)
    flow_map = new["model"]["class_path"].endswith(("FlowMapDistillation", "AdversarialFinetuning"))
    for c in new["trainer"].get("callbacks") or []:
        args = c.setdefault("init_args", {})
        if c["class_path"].endswith("SamplePlot") and args.get("steps") is None:
            args["steps"] = [1, 2, 4, 8] if flow_map else [4, 8, 16, 64]
        if c["class_path"].endswith("ImageGrid") and args.get("steps") is None:
            args["steps"] = [1, 2, 4, 8] if flow_map else [8, 16, 32]
    return new


def teacher_net(old_root, old, dataset):
    """The student net the current code builds for ``old``'s teacher: that teacher stage's net
    with an s embedding (and a guidance input for a guided teacher)."""
    teacher = old["model"]["init_args"]["teacher"]
    guided = teacher["class_path"].endswith("GuidedTeacher")
    path = (teacher["init_args"]["teacher"] if guided else teacher)["init_args"]["ckpt_path"]
    name = path.split("/")[2]  # runs/<dataset>/<stage>/version_0/...
    stage = name if os.path.exists(os.path.join(old_root, "configs", dataset, f"{name}.yaml")) else "teacher"
    net = printed(old_root, "fit", f"{dataset}/{stage}")["model"]["init_args"]["net"]
    return student_config(net, guidance_input=guided)


def compare(old_root, name, sub, *configs):
    old, new = printed(old_root, sub, *configs), printed(ROOT, sub, *configs)
    if old is None or new is None:
        return [f"  does not resolve {'at the base' if old is None else 'now'}"]
    old, new = as_current(old), with_default_steps(new)
    notes = []
    if new["model"]["init_args"].get("net", "") is None and old["model"]["init_args"].get("net"):
        same = teacher_net(old_root, printed(old_root, sub, *configs), configs[0].split("/")[0]) == \
            old["model"]["init_args"]["net"]
        notes.append(f"  net: written out -> built on the teacher ({'the same net' if same else 'A DIFFERENT NET'})")
        old["model"]["init_args"]["net"] = None
    a, b = flat(old), flat(new)
    return notes + [f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the older commit")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old_root = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", old_root, args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            jobs = [(name, "fit", name) for name in recipes(ROOT)]
            jobs += [(name, cmd, *configs) for name, (cmd, *configs) in OVERLAYS.items()]
            for name, sub, *configs in jobs:
                diffs = compare(old_root, name, sub, *configs)
                print(f"{name}: {len(diffs)} difference(s)" + "".join("\n" + d for d in diffs), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old_root], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
