"""EDM2 fixtures as a user's files: converted teachers, a second (smaller) network of the same task
exported in EDM2's layout, and shards of a converted teacher's own samples."""
import os

import numpy as np
import torch

from ayf.checkpoints import CheckpointTeacher
from ayf.cli import main
from ayf.figures import to_uint8
from ayf.nn import Cond
from ayf.nn.edm2 import EDM2Net
from ayf.nn.flow_map import FlowMap
from ayf.sampling import generate

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "edm2")


def fixture(name):
    """Path of tests/fixtures/edm2/<name>.pt (tiny_cond or tiny_uncond)."""
    return os.path.join(FIXTURES, f"{name}.pt")


def convert(name_or_path, out, *extra):
    """``ayf convert edm2`` of a fixture (or an export file) to ``out``; returns ``out``."""
    path = name_or_path if os.path.isfile(str(name_or_path)) else fixture(name_or_path)
    assert main(["convert", "edm2", str(path), "--output", str(out), *extra]) == 0
    return str(out)


def export_like(name, out, seed=1, **changes):
    """A random EDM2 network of the same task as fixture ``name`` (e.g. ``model_channels=8``: an
    "XS" guide), exported as EDM2 code would: ``{"state_dict", "init_kwargs"}`` in EDM2's key layout."""
    kwargs = dict(torch.load(fixture(name), weights_only=True)["init_kwargs"], **changes)
    torch.manual_seed(seed)
    net = FlowMap(EDM2Net(**{k: v for k, v in kwargs.items() if k != "use_fp16"}), s_embedding="none")
    with torch.no_grad():  # EDM2 starts its gains at 0 (a zero output); give them values, as the fixtures do
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    state = {k[len("backbone."):]: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "init_kwargs": kwargs}, out)
    return str(out)


def teacher_shards(ckpt, folder, n=48, steps=8, val_fraction=0.25, seed=0):
    """Shards in ``folder``/{train,val} of ``n`` Heun samples of a converted teacher (uint8 images)."""
    teacher = CheckpointTeacher(ckpt)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *teacher.data_shape, generator=gen)
    label = torch.arange(n) % teacher.num_classes if teacher.num_classes else None
    x = generate(teacher, noise, steps, Cond(label=label), solver="heun")
    images = to_uint8(x).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(str(folder))), exist_ok=True)
    arrays = os.path.join(os.path.dirname(os.path.abspath(str(folder))), "teacher_samples.npz")
    np.savez(arrays, images=images, **({"labels": label.numpy()} if label is not None else {}))
    assert main(["shards", "arrays", "--images", arrays, "--output", str(folder),
                 "--val_fraction", str(val_fraction), "--seed", str(seed)]) == 0
    return str(folder)


def imagenet64_layout(root):
    """The files the configs/imagenet64 recipes read, made from the conditional fixture under ``root``:
    weights/edm2-img64-s.ckpt (the converted fixture), weights/edm2-img64-xs.ckpt (a converted
    smaller network of its task) and data/imagenet64/{train,val} (the teacher's samples)."""
    weights = os.path.join(root, "weights")
    os.makedirs(weights, exist_ok=True)
    s = convert("tiny_cond", os.path.join(weights, "edm2-img64-s.ckpt"))
    guide = export_like("tiny_cond", os.path.join(weights, "edm2-img64-xs.pt"), model_channels=8)
    convert(guide, os.path.join(weights, "edm2-img64-xs.ckpt"))
    teacher_shards(s, os.path.join(root, "data", "imagenet64"))


def imagenet512_layout(root):
    """The files the configs/imagenet512 recipes read, under ``root``: weights/sd-vae (a tiny random
    AutoencoderKL, (3, 16, 16) pixels to (4, 8, 8) latents), weights/edm2-img512-{s,xs}.ckpt (tiny
    random EDM2 networks of those latents and the fixture's 3 classes, converted) and
    data/imagenet512/{train,val} (latent shards, through the VAE with EDM2's normalisation, of
    images whose class is a bright corner)."""
    from tests.test_encoders import tiny_vae

    weights = os.path.join(root, "weights")
    os.makedirs(weights, exist_ok=True)
    vae = tiny_vae(os.path.join(weights, "sd-vae"), channels=3)
    for name, changes in (("s", {}), ("xs", {"model_channels": 8})):
        export = export_like("tiny_cond", os.path.join(weights, f"edm2-img512-{name}.pt"), img_channels=4, **changes)
        convert(export, os.path.join(weights, f"edm2-img512-{name}.ckpt"))
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 3
    images = rng.integers(0, 60, size=(48, 16, 16, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 8 * (c % 2): 8 * (c % 2) + 8, 8 * (c // 2): 8 * (c // 2) + 8] = 230
    arrays = os.path.join(root, "imagenet512_pixels.npz")
    np.savez(arrays, images=images, labels=labels)
    assert main(["shards", "arrays", "--images", arrays, "--output", os.path.join(root, "data", "imagenet512"),
                 "--val_fraction", "0.25", "--vae", vae, "--vae_normalisation", "edm2_sd"]) == 0
