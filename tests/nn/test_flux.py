"""FLUX-shaped transformers (diffusers' FluxTransformer2DModel, tiny, built from a config) as
teachers and LoRA flow-map students: the packing against diffusers' own pipeline, the prompt and
lam as inputs, the student at the teacher at step 0, gradients only in LoRA and the s branch, and
the JVP through the transformer against float64 finite differences."""
import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from ayf.errors import ConfigError  # noqa: E402
from ayf.math import emd_tangent  # noqa: E402
from ayf.nn import Cond, FlowMap  # noqa: E402
from ayf.nn.flux import FluxBackbone, image_ids, pack, unpack  # noqa: E402

TEXT_DIM, POOLED_DIM, L = 24, 12, 5
L_TOKENS = L


def tiny_flux(guidance_embeds=False):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                            pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance_embeds,
                                            axes_dims_rope=(2, 2, 4))


def pipeline_folder(tmp, guidance_embeds=False, vae_sample_size=32):
    """A pipeline-shaped folder: transformer/ and the VAE config that fixes the latent size."""
    folder = os.path.join(tmp, "pipe")
    tiny_flux(guidance_embeds).save_pretrained(os.path.join(folder, "transformer"))
    os.makedirs(os.path.join(folder, "vae"))
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:  # 32 / 2**2 = 8x8 latents
        json.dump({"_class_name": "AutoencoderKL", "sample_size": vae_sample_size, "block_out_channels": [8, 8, 8]}, f)
    return folder


def prompt(gen, n):
    return Cond(text=torch.randn(n, L, TEXT_DIM, generator=gen), pooled=torch.randn(n, POOLED_DIM, generator=gen))


def nudge(module, scale=0.05):
    """Every weight of ``module`` away from its start (zero-initialised branches included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_packing_and_position_ids_are_the_pipelines(gen):
    x = torch.randn(2, 4, 8, 6, generator=gen)
    ours = pack(x)
    theirs = diffusers.FluxPipeline._pack_latents(x, 2, 4, 8, 6)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack(ours, (4, 8, 6)), x)
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(image_ids(8, 6), ids)


def test_the_teacher_is_the_transformer_called_as_its_pipeline_calls_it(gen, tmp_path):
    folder = pipeline_folder(str(tmp_path), guidance_embeds=True)
    teacher = FlowMap(FluxBackbone(folder), s_embedding="none").eval()
    assert teacher.data_shape == (4, 8, 8)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0.9, 0.5, 0.1])
    cond = prompt(gen, 3).with_(lam=torch.tensor([1.0, 3.5, 5.0]))
    with torch.no_grad():
        ours = teacher.velocity(x, t, cond)
        model = teacher.backbone.model
        # FluxPipeline: timestep = sigma * 1000 passed as timestep / 1000, guidance as is, packed latents
        raw = model(pack(x), encoder_hidden_states=cond.text, pooled_projections=cond.pooled, timestep=t,
                    img_ids=image_ids(8, 8), txt_ids=torch.zeros(L, 3), guidance=cond.lam).sample
    torch.testing.assert_close(ours, unpack(raw, (4, 8, 8)))
    with torch.no_grad():  # lam and the prompt are inputs
        assert not torch.allclose(teacher.velocity(x, t, cond.with_(lam=torch.ones(3))), ours)
        assert not torch.allclose(teacher.velocity(x, t, prompt(gen, 3).with_(lam=cond.lam)), ours)


def test_the_empty_prompt_is_the_null_condition(gen, tmp_path):
    null = {"text": torch.randn(L, TEXT_DIM, generator=gen), "pooled": torch.randn(POOLED_DIM, generator=gen)}
    torch.save(null, tmp_path / "null.pt")
    backbone = FluxBackbone(pipeline_folder(str(tmp_path)), null_prompt=str(tmp_path / "null.pt"))
    net = FlowMap(backbone, s_embedding="none").eval()
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.7, 0.3]), prompt(gen, 2)
    with torch.no_grad():
        explicit = net.velocity(x, t, Cond(text=null["text"].expand(2, L, TEXT_DIM), pooled=null["pooled"].expand(2, -1)))
        torch.testing.assert_close(net.velocity(x, t, cond.unconditional()), explicit)
        half = net.velocity(x, t, cond.with_(null_text=torch.tensor([True, False])))
        torch.testing.assert_close(half[0], explicit[0])
        torch.testing.assert_close(half[1], net.velocity(x, t, cond)[1])


def lora_student(folder, rank=4):
    teacher = FlowMap(FluxBackbone(folder), s_embedding="none").eval()
    student = FlowMap(FluxBackbone(folder, lora_rank=rank))
    student.init_from_teacher(teacher)
    return teacher, student


def test_a_lora_student_starts_at_the_teacher_and_reads_s(gen, tmp_path):
    teacher, student = lora_student(pipeline_folder(str(tmp_path)))
    x, t, cond = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0.9, 0.6, 0.4]), prompt(gen, 3)
    with torch.no_grad():
        v = teacher.velocity(x, t, cond)
        for s in (t, torch.zeros(3), 0.5 * t):
            torch.testing.assert_close(student(x, t, s, cond), v)
        nudge(student.s_emb)  # the s branch moves F with s
        assert not torch.allclose(student(x, t, torch.zeros(3), cond), student(x, t, 0.5 * t, cond))
        before = student(x, t, t, cond)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(student(x, t, t, cond), before)  # the adapters are in the forward pass


def test_the_base_fingerprint_follows_the_weights_loaded_into_it(tmp_path):
    teacher, student = lora_student(pipeline_folder(str(tmp_path)))
    before = student.base_record()["fingerprint"]
    nudge(teacher.backbone.model)
    student.init_from_teacher(teacher)  # another base: the fingerprint must say so, not the cached one
    assert student.base_record()["fingerprint"] != before


def test_only_the_adapters_and_the_s_branch_train(gen, tmp_path):
    _, student = lora_student(pipeline_folder(str(tmp_path)))
    x, t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.8, 0.5]), prompt(gen, 2)
    (student(x, t, 0.5 * t, cond) - x).square().mean().backward()
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("s_emb.") for n in trainable)
    assert any(n.startswith("s_emb.") for n in trainable) and any("lora_B" in n for n in trainable)
    got = {n for n, p in student.named_parameters() if p.grad is not None}
    assert got <= trainable and any("lora_B" in n for n in got) and "s_emb.embedder.linear_2.weight" in got
    assert sum(p.numel() for n, p in student.named_parameters() if n in trainable) < 0.5 * sum(
        p.numel() for p in student.parameters())


def test_the_jvp_through_the_transformer_matches_float64_differences(gen, tmp_path):
    _, student = lora_student(pipeline_folder(str(tmp_path), guidance_embeds=True))
    student = student.double().eval()
    nudge(student)
    n = 2
    x, v = torch.randn(n, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(n, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, s = torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([0.3, 0.1], dtype=torch.float64)
    cond = Cond(text=torch.randn(n, L, TEXT_DIM, generator=gen, dtype=torch.float64),
                pooled=torch.randn(n, POOLED_DIM, generator=gen, dtype=torch.float64), lam=torch.tensor([2.0, 4.0]))
    _, exact = emd_tangent(student, x, t, s, v, r=1.0, cond=cond)
    # diffusers projects the timestep in float32 whatever the model's dtype, so the steps stay
    # where float32 rounding of t (x 1000) is below the truncation error
    errors = []
    for h in (4e-4, 2e-4):
        _, approx = emd_tangent(student, x, t, s, v, r=1.0, cond=cond, method="central", step=h)
        errors.append(float((approx - exact).abs().max() / exact.abs().max()))
    assert errors[1] < 1e-2 and 3.5 < errors[0] / errors[1] < 4.5, errors  # O(h^2): the JVP is the derivative


def test_bad_pipeline_folders_and_prompts_are_one_line(gen, tmp_path):
    with pytest.raises(ConfigError, match="no transformer in it"):
        FluxBackbone(str(tmp_path))
    other = tmp_path / "other" / "transformer"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(ConfigError, match="unsupported transformer 'SD3Transformer2DModel'"):
        FluxBackbone(str(tmp_path / "other"))
    tiny_flux().save_pretrained(tmp_path / "alone")
    with pytest.raises(ConfigError, match="give latent_size"):
        FluxBackbone(str(tmp_path / "alone"))
    net = FlowMap(FluxBackbone(str(tmp_path / "alone"), latent_size=8), s_embedding="none")
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.5])
    with pytest.raises(ConfigError, match="do not fit this transformer"):
        net.velocity(x, t, Cond(text=torch.randn(1, L, 7), pooled=torch.randn(1, POOLED_DIM)))
    with pytest.raises(ConfigError, match="no empty-prompt embeddings"):
        net.velocity(x, t, prompt(gen, 1).unconditional())
    with pytest.raises(ConfigError, match="text-conditional"):
        net.velocity(x, t, Cond())


class PromptPairs(torch.utils.data.Dataset):
    """Latents with a prompt's embeddings, as caption shards decode to."""

    def __init__(self, n=16):
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 4, 8, 8, generator=gen)
        self.text, self.pooled = torch.randn(n, L, TEXT_DIM, generator=gen), torch.randn(n, POOLED_DIM, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "text": self.text[i], "pooled": self.pooled[i]}


def test_a_lora_student_distils_from_a_flux_teacher_with_prompts(tmp_path):
    import lightning as L

    from ayf.nn.flux import FluxTeacher
    from ayf.objectives import EMD
    from ayf.tasks import FlowMapDistillation

    folder = pipeline_folder(str(tmp_path), guidance_embeds=True)
    teacher = FluxTeacher(folder)
    assert teacher.reads_lam and "lam its guidance input" in teacher.describe()[0]
    net = FlowMap(FluxBackbone(folder, lora_rank=4))
    task = FlowMapDistillation(net, teacher, objective=EMD(warmup=0))
    base = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k and not k.startswith("s_emb")}
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            cond = pl_module.to_batch(batch).cond
            seen["cond"] = (cond.text.shape, cond.pooled.shape)

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Spy()], enable_checkpointing=False)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(PromptPairs(), batch_size=4))
    assert seen["cond"] == ((4, L_TOKENS, TEXT_DIM), (4, POOLED_DIM))
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # the base model is untouched
    assert any(not torch.equal(v, 0 * v) for k, v in after.items() if "lora_B" in k)  # the adapters moved
