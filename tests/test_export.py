"""``ayf export``: a distilled flow map as a folder that diffusers loads, sampled there with
diffusers' own FlowMapEulerDiscreteScheduler, equal to ``ayf sample`` from the same noise.

The students are given random weights (every branch, the s and guidance embeddings included, away
from its zero start), so that a time, label or guidance scale that the export passes wrongly
changes the samples."""
import contextlib
import json
import os

import pytest
import torch

from ayf.checkpoints import build_network, make_record
from ayf.cli import main
from tests.export_checks import assert_diffusers_samples, ayf_samples, diffusers_loop, tiny_unet2d
from tests.toy_runs import fit_toy

diffusers = pytest.importorskip("diffusers")

MLP_NET = {"class_path": "ayf.nn.FlowMap", "init_args": {
    "backbone": {"class_path": "ayf.nn.MLP", "init_args": {"data_dim": 2, "width": 32, "depth": 2, "emb_dim": 16}},
    "num_classes": 3, "guidance_input": True}}
UNET_NET = {"class_path": "ayf.nn.FlowMap", "init_args": {
    "backbone": {"class_path": "ayf.nn.UNet", "init_args": {
        "img_channels": 1, "img_resolution": 8, "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
        "channels_per_head": 8, "emb_dim": 16}},
    "num_classes": 4, "guidance_input": True}}


def on_diffusers_model(folder, model, scheduler):
    """A flow map on a diffusers ``model`` saved in ``folder``/unet, its ``scheduler`` beside it."""
    model.save_pretrained(os.path.join(folder, "unet"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    return {"class_path": "ayf.nn.FlowMap", "init_args": {
        "backbone": {"class_path": "ayf.nn.diffusers.DiffusersBackbone",
                     "init_args": {"model": os.path.join(folder, "unet"), "scheduler": None, "context": None,
                                   "null_label": None, "out_of_range": "clamp", "math_attention": True}},
        "s_embedding": "t_minus_s"}}


def diffusers_net(folder):
    """A flow map on a tiny class-conditional UNet2DModel (v-prediction DDPM)."""
    return on_diffusers_model(folder, tiny_unet2d(), diffusers.DDPMScheduler(prediction_type="v_prediction"))


def dit_net(folder):
    """A flow map on a tiny class-conditional DiT (3 classes, learned variance) under flow matching."""
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4,
                                            num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=3)
    return on_diffusers_model(folder, model, diffusers.FlowMatchEulerDiscreteScheduler())


def edm2_net(folder):
    """A guided flow map on a converted EDM2 network (the student of a converted teacher)."""
    from ayf.checkpoints import read_checkpoint, student_config
    from tests.edm2_runs import convert

    teacher = convert("tiny_cond", os.path.join(folder, "teacher.ckpt"))
    return student_config(read_checkpoint(teacher)["ayf"]["net"], guidance_input=True)


def random_student(path, config, data_shape, guidance=None, seed=0):
    """A FlowMapDistillation checkpoint of ``config`` with random weights (the EMA too)."""
    torch.manual_seed(seed)
    net = build_network(config)
    with torch.no_grad():
        for name, p in net.named_parameters():  # the conditioning branches strongly, so that each input shows
            strong = name.split(".")[0].endswith("_emb") or name.endswith("gain")  # zero at init in ayf's nets
            p.add_((1.0 if strong else 0.1) * torch.randn_like(p))
    state = net.state_dict()
    torch.save({"ayf": make_record("FlowMapDistillation", config, data_shape, "flow_map", guidance=guidance),
                "state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 7,
                "callbacks": {"EMA": {"ema": state}}}, path)
    return net


#: case -> (net config of a folder, data shape, classes, guidance scale of the record)
CASES = {
    "mlp": (lambda folder: MLP_NET, (2,), 3, 2.5),
    "unet": (lambda folder: UNET_NET, (1, 8, 8), 4, 2.5),
    "edm2": (edm2_net, (2, 8, 8), 3, 2.5),
    "diffusers": (diffusers_net, (1, 8, 8), 4, None),
    "dit": (dit_net, (2, 8, 8), 3, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_exported_flow_map_samples_in_diffusers_as_ayf_samples_it(tmp_path, case):
    n = 6
    make, shape, classes, guidance = CASES[case]
    config = make(str(tmp_path))
    kw = {} if guidance is None else {"guidance_scale": guidance}
    ckpt = str(tmp_path / "student.ckpt")
    random_student(ckpt, config, shape, guidance)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % classes
    ours = ayf_samples(ckpt, noise, classes, tmp_path)
    folder = str(tmp_path / "exported")
    assert main(["export", "--ckpt_path", ckpt, "--output", folder]) == 0
    if case in ("diffusers", "dit"):  # self-contained: the model folder it was distilled from is not read again
        os.rename(tmp_path / "unet", tmp_path / "gone")
    pipe = assert_diffusers_samples(folder, noise, ours, labels, **kw)
    # the steps matter, and so does every input the flow map reads
    assert (ours[1] - ours[4]).abs().max() > 1e-3
    assert (diffusers_loop(folder, noise, 4, class_labels=(labels + 1) % classes, **kw) - ours[4]).abs().max() > 1e-3
    if kw:
        assert (diffusers_loop(folder, noise, 4, class_labels=labels, guidance_scale=1.0) - ours[4]).abs().max() > 1e-3
        # the default guidance scale is the one the checkpoint records
        torch.testing.assert_close(diffusers_loop(folder, noise, 4, class_labels=labels), ours[4], rtol=1e-5, atol=1e-5)
    if shape[0] in (1, 3):
        images = pipe(num_inference_steps=2, class_labels=labels, latents=noise, output_type="pil", **kw).images
        assert len(images) == n and images[0].size == (8, 8)
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "FlowMapPipeline" and index["scheduler"][1] == "FlowMapEulerDiscreteScheduler"
    assert os.path.isfile(os.path.join(folder, "flow_map", "diffusion_pytorch_model.safetensors"))
    assert not any(f.endswith((".bin", ".pt", ".ckpt", ".pkl")) for _, _, fs in os.walk(folder) for f in fs)


def test_a_distilled_toy_student_samples_in_diffusers_as_in_ayf(tmp_path):
    """A student of ``ayf fit`` (configs/toy/distill_emd.yaml, a few steps), exported by the CLI; the
    digits and diffusers students of ``ayf fit`` are checked in tests/integration (test_images.py,
    test_diffusers_cli.py)."""
    ckpt = fit_toy(tmp_path, "distill_emd", "student", 3)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    ours = ayf_samples(ckpt, noise, 0, tmp_path)
    folder = str(tmp_path / "exported")
    assert main(["export", "--ckpt_path", ckpt, "--output", folder]) == 0
    pipe = assert_diffusers_samples(folder, noise, ours)
    x = pipe(batch_size=5, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="needs images"):
        pipe(batch_size=2, output_type="pil")


def test_bad_exports_are_one_line_and_overwrite_nothing(tmp_path, capsys):
    teacher = str(tmp_path / "teacher.ckpt")
    config = dict(MLP_NET, init_args=dict(MLP_NET["init_args"], s_embedding="none", guidance_input=False))
    net = build_network(config)
    torch.save({"ayf": make_record("FlowMatching", config, (2,), "euler"),
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, teacher)
    student = str(tmp_path / "student.ckpt")
    random_student(student, MLP_NET, (2,), 2.0)
    consistency = str(tmp_path / "consistency.ckpt")
    ckpt = torch.load(student, weights_only=True)
    ckpt["ayf"]["sampling"]["gamma"] = 1.0
    torch.save(ckpt, consistency)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    cases = {
        "velocity model": ([teacher, str(tmp_path / "a")], "not a flow map"),
        "consistency": ([consistency, str(tmp_path / "b")], "gamma 1.0"),
        "existing output": ([student, str(tmp_path / "taken")], "exists; pass --overwrite"),
        "output holds input": ([student, str(tmp_path), "--overwrite"], "holds the input"),
        "missing": ([str(tmp_path / "none.ckpt"), str(tmp_path / "c")], "not found"),
    }
    for name, (args, said) in cases.items():
        capsys.readouterr()
        extra = args[2:]
        assert main(["export", "--ckpt_path", args[0], "--output", args[1], *extra]) == 2, name
        errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ayf: error:")]
        assert len(errors) == 1 and said in errors[0], (name, errors)
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    assert not any(os.path.exists(tmp_path / d) for d in "abc")
    with contextlib.chdir(tmp_path):
        from ayf.export import load_pipeline

        with pytest.raises(Exception, match="not an exported flow map"):
            load_pipeline("taken")
