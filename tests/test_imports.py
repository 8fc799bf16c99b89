import subprocess
import sys


def test_math_imports_torch_only():
    code = (
        "import sys, ayf.math; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'webdataset', 'jsonargparse', 'ayf.nn', 'matplotlib')]; "
        "bad += [m for m in sys.modules if m.startswith('ayf.') and not m.startswith('ayf.math')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
