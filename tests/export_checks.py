"""Checks shared by the export tests: ``ayf sample`` from a noise file, and the same noise sampled
in diffusers from an exported folder (the README's loop and the pipeline)."""
import os

import numpy as np
import torch

from ayf.cli import main


def tiny_unet2d(num_class_embeds=4, seed=0):
    """A tiny class-conditional diffusers UNet2DModel of (1, 8, 8) images, with attention (the
    diffusers students of the export and CLI tests)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8, num_class_embeds=num_class_embeds)


def diffusers_loop(folder, noise, steps, **kw):
    """The README's loop: the exported model and scheduler, loaded by diffusers, stepped by hand."""
    import diffusers

    from ayf.export import FlowMapModel

    model = FlowMapModel.from_pretrained(os.path.join(folder, "flow_map"))
    scheduler = diffusers.FlowMapEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    scheduler.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            r = scheduler.sigmas[i + 1] * scheduler.config.num_train_timesteps
            x = scheduler.step(model(x, t, r, **kw).sample, t, x, r_timestep=r).prev_sample
    return x


def ayf_samples(ckpt, noise, classes, tmp, steps=(1, 2, 4)):
    """``{steps: samples}`` of ``ayf sample --noise`` (labels ``i mod classes`` when classes)."""
    tmp = str(tmp)
    np.save(os.path.join(tmp, "noise.npy"), noise.numpy())
    out = {}
    for k in steps:
        path = os.path.join(tmp, f"ayf{k}.npy")
        label = ["--label", "all"] if classes else []
        assert main(["sample", "--ckpt_path", ckpt, "--noise", os.path.join(tmp, "noise.npy"), "--steps", str(k),
                     *label, "--output", path, "--overwrite"]) == 0
        out[k] = torch.from_numpy(np.load(path))
    return out


def assert_diffusers_samples(folder, noise, ours, labels=None, output_type="pt", **kw):
    """Sampling the exported folder in diffusers (the README's loop, and the pipeline's
    ``output_type``: ``latent`` for a flow map of latents) gives ``ours``."""
    from ayf.export import FlowMapPipeline

    pipe = FlowMapPipeline.from_pretrained(folder)
    for steps, expected in ours.items():
        theirs = diffusers_loop(folder, noise, steps, class_labels=labels, **kw)
        torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)
        piped = pipe(num_inference_steps=steps, class_labels=labels, latents=noise, output_type=output_type,
                     **kw).images
        torch.testing.assert_close(piped, expected, rtol=1e-5, atol=1e-5)
    return pipe
