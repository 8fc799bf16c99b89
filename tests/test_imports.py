"""The house's layering: each package imports only from the layers below it (a static check of
every ``import`` in the package, those inside functions included)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ayf")

#: from the bottom up; a module may import its own package and any package of a lower layer
LAYERS = [
    ("errors", "distributed"),
    ("math",),
    ("nn", "figures"),
    ("sampling", "checkpoints"),
    ("objectives",),
    ("data",),
    ("metrics",),
    ("tasks", "callbacks", "checkpoint_io"),
    ("ckpt_args", "sample", "convert", "make_shards", "make_points", "__init__"),
    ("cli",),
    ("__main__",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def package_of(module: str) -> str:
    """``ayf.nn.flow_map`` -> ``nn``; ``ayf`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ayf_imports(path: str, module: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: use absolute imports (ayf.<package>...)"
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "ayf" or name.startswith("ayf."):
                yield node.lineno, name


def modules():
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                yield path, rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def violations():
    bad = []
    for path, module in modules():
        own = package_of(module) if module != "ayf" else "__init__"
        assert own in RANK, f"{module}: its package is in no layer of tests/test_imports.py"
        for line, name in ayf_imports(path, module):
            other = package_of(name)
            if other == own:
                continue
            if other not in RANK or RANK[other] >= RANK[own]:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} ({own}) imports {name} ({other})")
    return bad


def test_each_package_imports_only_from_lower_layers():
    assert violations() == []


def test_math_and_nn_import_no_training_stack():
    for pkg, allowed_ayf in (("ayf.math", ("ayf.math",)), ("ayf.nn", ("ayf.math", "ayf.nn", "ayf.errors"))):
        code = (
            f"import sys, {pkg}; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'webdataset', 'jsonargparse', 'matplotlib')]; "
            f"bad += [m for m in sys.modules if m.startswith('ayf.') and not m.startswith({allowed_ayf!r})]; "
            "print(bad); sys.exit(1 if bad else 0)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, pkg + ": " + out.stdout + out.stderr
