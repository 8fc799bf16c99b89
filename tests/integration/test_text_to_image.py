"""Text to image end to end through the CLI, on a tiny FLUX-shaped pipeline built offline: caption
shards, a LoRA flow-map student distilled with `ayf fit` from the pipeline's transformer, and its
checkpoint, which holds only the adapters and the s branch and names its base model."""
import glob
import json
import os
import warnings

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from ayf.checkpoints import CheckpointFlowMap, read_checkpoint  # noqa: E402
from ayf.cli import main  # noqa: E402
from ayf.errors import CheckpointError  # noqa: E402
from tests.data.test_caption_shards import caption_list  # noqa: E402
from tests.text_pipeline import flux_pipeline  # noqa: E402


def distill_config(pipe, shards, steps=3, rank=4):
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": "runs", "limit_val_batches": 0,
                    "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "ayf.callbacks.EMA", "init_args": {"decay": 0.9}},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": "ckpt", "save_last": True}}]},
        "model": {"class_path": "ayf.tasks.FlowMapDistillation", "init_args": {
            "teacher": {"class_path": "ayf.nn.flux.FluxTeacher",
                        "init_args": {"model": pipe, "null_prompt": f"{shards}/null_prompt.pt"}},
            "net": {"class_path": "ayf.nn.FlowMap", "init_args": {"backbone": {
                "class_path": "ayf.nn.flux.FluxBackbone", "init_args": {"model": pipe, "lora_rank": rank,
                                                                "lora_alpha": 2 * rank}}}},
            "objective": {"class_path": "ayf.objectives.EMD", "init_args": {"warmup": 0}},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}}},
        "data": {"class_path": "ayf.data.ImageShards", "init_args": {"train": shards, "batch_size": 4,
                                                                     "epoch_length": 8}},
    }


def test_a_lora_student_from_caption_shards_through_ayf_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    pipe = flux_pipeline(str(tmp_path / "pipe"))
    pairs = caption_list(tmp_path / "pairs", n=8, bad=False)
    assert main(["shards", "captions", "--input", str(pairs), "--pipeline", pipe, "--output", "shards"]) == 0
    with open("distill.yaml", "w") as f:
        yaml.safe_dump(distill_config(pipe, str(tmp_path / "shards")), f)
    capsys.readouterr()
    assert main(["fit", "--config", "distill.yaml"]) == 0
    got = capsys.readouterr()
    said = got.out + got.err
    assert f"student: adapters and s branch on {pipe}/transformer: " in said and "M parameters train" in said
    (path,) = glob.glob("ckpt/last.ckpt")
    ckpt = read_checkpoint(path)
    saved = [k[len("net."):] for k in ckpt["state_dict"]]
    assert saved and all("lora_" in k or k.startswith("s_emb.") for k in saved)
    ema = next(v["ema"] for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert sorted(ema) == sorted(saved)  # the average leaves the base out too
    base = ckpt["ayf"]["base"]
    assert base["folder"] == os.path.join(pipe, "transformer") and len(base["fingerprint"]) == 16
    base_numel = sum(v.numel() for v in CheckpointFlowMap(path).backbone.model.state_dict().values())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 0.5 * base_numel
    student = CheckpointFlowMap(path, weights="raw")
    trained = {k: v for k, v in student.state_dict().items() if "lora_B" in k}
    assert trained and all(torch.equal(v, ckpt["state_dict"][f"net.{k}"]) for k, v in trained.items())
    assert any(v.abs().sum() > 0 for v in trained.values())  # the adapters trained
    # ayf sample from prompts: decoded through the VAE the shards recorded, one prompt per column
    assert main(["sample", "--ckpt_path", path, "--prompt", "a handwritten seven", "--prompt", "a handwritten one",
                 "--num_samples", "4", "--steps", "2", "--output", "grid.png"]) == 0
    assert os.path.getsize("grid.png") > 0
    assert main(["sample", "--ckpt_path", path, "--prompt", "a handwritten seven", "--prompt", "a handwritten one",
                 "--num_samples", "4", "--steps", "2", "--output", "latents.npy"]) == 0
    import numpy as np

    from ayf.nn import Cond
    from ayf.sampling import generate
    from ayf.text import PromptEncoder

    latents = torch.from_numpy(np.load("latents.npy"))
    ema = CheckpointFlowMap(path).eval()
    noise = torch.randn(4, *ema.data_shape, generator=torch.Generator().manual_seed(0))
    prompts = PromptEncoder(pipe)(["a handwritten seven", "a handwritten one"] * 2)
    with torch.no_grad():
        want = generate(ema, noise, 2, Cond(text=prompts.text, text_mask=prompts.text_mask, pooled=prompts.pooled))
        other = generate(ema, noise, 2, Cond(text=prompts.text.flip(0), pooled=prompts.pooled.flip(0)))
    torch.testing.assert_close(latents, want)
    assert not torch.allclose(latents, other)  # the prompt reaches the samples
    assert main(["sample", "--ckpt_path", path, "--steps", "2", "--output", "x.npy"]) == 2  # no prompt: one line
    # ayf export: a diffusers LoRA with the s branch, sampled by diffusers as ayf samples it
    assert main(["export", "--ckpt_path", path, "--output", "exported"]) == 0
    from safetensors.torch import load_file

    from ayf.export_flux import FlowMapFluxPipeline

    lora = load_file("exported/pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    diffusers_pipe = FlowMapFluxPipeline.from_export(pipe, "exported")
    assert main(["sample", "--ckpt_path", path, "--prompt", "a handwritten seven", "--prompt", "a handwritten one",
                 "--num_samples", "2", "--steps", "4", "--decode", "--output", "pixels.npy"]) == 0
    ours = torch.from_numpy(np.load("pixels.npy"))
    noise = torch.randn(2, *ema.data_shape, generator=torch.Generator().manual_seed(0))
    theirs = diffusers_pipe(["a handwritten seven", "a handwritten one"], num_inference_steps=4, latents=noise,
                            output_type="pt").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    latent = diffusers_pipe(["a handwritten seven"], num_inference_steps=1, latents=noise[:1], output_type="latent").images
    with torch.no_grad():
        one = generate(ema, noise[:1], 1, Cond(text=prompts.text[:1], text_mask=prompts.text_mask[:1],
                                               pooled=prompts.pooled[:1]))
    torch.testing.assert_close(latent, one, rtol=1e-4, atol=1e-5)
    # the same LoRA on another base model: one line
    other = flux_pipeline(str(tmp_path / "other"), seed=1)
    ckpt["ayf"]["net"]["init_args"]["backbone"]["init_args"]["model"] = other
    torch.save(ckpt, "moved.ckpt")
    with pytest.raises(CheckpointError, match="a LoRA of another base model"):
        CheckpointFlowMap("moved.ckpt")
    # a run resumed from the checkpoint continues (the base comes from the folder again)
    assert main(["fit", "--config", "distill.yaml", "--trainer.max_steps", "4", "--ckpt_path", path,
                 "--trainer.default_root_dir", "runs2"]) == 0
    assert read_checkpoint("ckpt/last.ckpt")["global_step"] == 4
    json.dumps(ckpt["ayf"])  # plain data


def test_the_flux_recipe_distils_a_tiny_pipeline(tmp_path, monkeypatch):
    """configs/flux/distill_lora.yaml as shipped, its folders and the machine's settings overridden:
    the paper's setting runs end to end on a pipeline of the same shape."""
    monkeypatch.chdir(tmp_path)
    warnings.simplefilter("ignore")
    pipe = flux_pipeline(str(tmp_path / "pipe"), guidance_embeds=True)
    pairs = caption_list(tmp_path / "pairs", n=8, bad=False)
    assert main(["shards", "captions", "--input", str(pairs), "--pipeline", pipe, "--output", "data/flux_pairs",
                 "--val_fraction", "0.25"]) == 0
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "flux", "distill_lora.yaml")
    assert main(["fit", "--config", recipe, "--model.teacher.init_args.model", pipe,
                 "--model.net.init_args.backbone.init_args.model", pipe,
                 "--model.net.init_args.backbone.init_args.lora_rank", "2",
                 "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                 "--trainer.precision", "32", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--data.init_args.global_batch_size", "2",
                 "--data.init_args.num_workers", "0", "--data.init_args.epoch_length", "4"]) == 0
    ckpt = read_checkpoint(glob.glob("runs/flux/distill_lora/latest/checkpoints/last.ckpt")[0])
    assert ckpt["global_step"] == 2 and ckpt["ayf"]["base"]["folder"] == os.path.join(pipe, "transformer")
    assert all("lora_" in k or k.startswith("net.s_emb.") for k in ckpt["state_dict"])
    assert glob.glob("runs/flux/distill_lora/latest/checkpoints/best.ckpt")  # validation ran, on the held-out pairs
