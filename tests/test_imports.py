"""The house's layering: each package of ayf imports only the packages it is allowed to (a static
check of every ``import``, those inside functions included), and the allowed dependencies have no
cycle. docs/layout.md draws them."""
import ast
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ayf")

#: package -> the ayf packages it may import (its own is always allowed)
BELOW_TASKS = {"objectives", "checkpoints", "sampling", "metrics", "nn", "math", "distributed", "io", "encoders", "errors"}
ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "encoders": {"io", "errors"},
    "math": set(),
    "distributed": set(),
    "nn": {"math", "io", "errors"},
    "figures": {"errors"},
    "sampling": {"nn", "math", "errors"},
    "checkpoints": {"nn", "io", "errors"},
    "objectives": {"nn", "math", "errors"},
    "data": {"math", "figures", "distributed", "io", "encoders", "errors"},
    "metrics": {"math", "figures", "io", "encoders", "errors"},
    "tasks": BELOW_TASKS,
    "callbacks": {"checkpoints", "sampling", "metrics", "figures", "nn", "math", "distributed", "io", "encoders", "errors"},
    "text": {"nn", "errors"},
    "export": {"checkpoints", "nn", "math", "io", "encoders", "figures", "errors", "export_flux"},
    "export_flux": {"nn", "figures", "errors"},
    "commands": BELOW_TASKS | {"tasks", "callbacks", "data", "figures", "export", "text"},
    "cli": {"commands", "errors"},
    "__init__": set(),
    "__main__": {"cli"},
}


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
            # `from ayf import commands` imports the package ayf.commands
            names = [f"ayf.{a.name}" for a in node.names] if node.module == "ayf" else [node.module or ""]
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
        assert own in ALLOWED, f"{module}: its package has no entry in ALLOWED (tests/test_imports.py)"
        for line, name in ayf_imports(path, module):
            other = package_of(name)
            if other != own and other not in ALLOWED[own]:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} ({own}) imports {name} ({other})")
    return bad


def test_each_package_imports_only_what_it_may():
    assert violations() == []


def test_the_allowed_dependencies_have_no_cycle():
    done, active = set(), []

    def visit(pkg):
        assert pkg not in active, "cycle: " + " -> ".join(active[active.index(pkg):] + [pkg])
        if pkg in done:
            return
        active.append(pkg)
        for other in ALLOWED[pkg]:
            visit(other)
        active.pop()
        done.add(pkg)

    for pkg in ALLOWED:
        visit(pkg)


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
