"""The EDM2 test fixtures (tests/fixtures/edm2: tiny networks built by EDM2's own code, with its
outputs) through `ayf convert edm2`: how closely the converted network reproduces EDM2's denoiser D
and logvar head, in float32. Prints a table.

    python benchmarks/edm2_fixtures.py
"""
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ayf.checkpoints import load_network  # noqa: E402
from ayf.cli import main  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "edm2")


def rel_err(a, b):
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def main_():
    print("| fixture | parameters | max rel. error of D | max abs. error of logvar |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny_cond", "tiny_uncond"):
            out = os.path.join(tmp, f"{name}.ckpt")
            assert main(["convert", "edm2", os.path.join(FIXTURES, f"{name}.pt"), "--output", out]) == 0
            net, _ = load_network(out)
            fx = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)
            with torch.no_grad():
                D = net.backbone.denoise(fx["x"], fx["sigma"], fx.get("class_labels"))
                logvar = net.backbone.logvar(fx["sigma"])
            count = sum(p.numel() for p in net.parameters())
            print(f"| {name} | {count} | {rel_err(D, fx['D']):.2e} | {float((logvar - fx['logvar'].flatten()).abs().max()):.2e} |")


if __name__ == "__main__":
    main_()
