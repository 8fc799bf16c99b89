"""``ayf convert edm2``: an EDM2 export (tests/fixtures/edm2, made by NVlabs/edm2's own code) ->
an ayf teacher checkpoint that CheckpointTeacher, ``ayf sample`` and GuidedTeacher accept, and
one-line errors for exports that do not fit."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ayf.checkpoints import CheckpointTeacher, load_network
from ayf.cli import main
from ayf.commands.convert import convert_edm2, read_export
from ayf.errors import ConfigError
from ayf.nn import Cond, FlowMap, GuidedTeacher
from ayf.nn.edm2 import EDM2Net

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "edm2"
COND, UNCOND = str(FIXTURES / "tiny_cond.pt"), str(FIXTURES / "tiny_uncond.pt")
LOGVAR_KEY = "net.backbone.logvar_linear.weight"


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread is as fast, and stays fast while another process
    holds the second core (two OpenMP threads then slow every conv down many times)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixture(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_to(tmp_path, export=COND, name="teacher.ckpt", **kw):
    ckpt, _ = convert_edm2(str(export), **kw)
    path = tmp_path / name
    torch.save(ckpt, path)
    return str(path)


def export_with(tmp_path, state=None, init_kwargs=None, name="bad.pt"):
    """The cond fixture's export with its state dict or init_kwargs replaced."""
    fx = fixture(COND)
    path = tmp_path / name
    torch.save({"state_dict": fx["state_dict"] if state is None else state,
                "init_kwargs": fx["init_kwargs"] if init_kwargs is None else init_kwargs}, path)
    return str(path)


def rel_err(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


# --- 6. the CLI writes a checkpoint that reproduces EDM2's denoiser --------------------------------
@pytest.mark.parametrize("export", [COND, UNCOND], ids=["cond", "uncond"])
@pytest.mark.parametrize("no_logvar", [False, True], ids=["logvar", "no_logvar"])
def test_cli_convert_reproduces_edm2_denoiser(tmp_path, capsys, export, no_logvar):
    out = str(tmp_path / "teacher.ckpt")
    assert main(["convert", "edm2", export, "--output", out, *(["--no_logvar"] if no_logvar else [])]) == 0
    printed = capsys.readouterr().out
    assert ("logvar head: dropped" if no_logvar else "logvar head: kept") in printed, printed
    assert f"wrote {out}" in printed
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["ayf"]["kind"] == "Converted"
    assert (LOGVAR_KEY in ckpt["state_dict"]) is not no_logvar
    assert any(k.startswith("net.backbone.logvar_fourier.") for k in ckpt["state_dict"]) is not no_logvar

    fx = fixture(export)
    teacher = CheckpointTeacher(out)
    sigma = fx["sigma"]
    t = sigma / (1 + sigma)
    tb = t.view(-1, 1, 1, 1)
    x_t = fx["x"] * (1 - tb)
    label = None if fx["class_labels"] is None else fx["class_labels"].argmax(dim=1)
    with torch.no_grad():
        v = teacher(x_t, t, Cond(label=label))
    assert rel_err(x_t - tb * v, fx["D"]) <= 1e-5
    net, meta = load_network(out)
    assert isinstance(net.backbone, EDM2Net) and meta["source"]["from"] == "edm2"
    assert (net.backbone.logvar_linear is None) is no_logvar


# --- 7. ayf sample draws from a converted teacher -------------------------------------------------
def test_sample_converted_teacher_with_euler_and_heun(tmp_path):
    ckpt = convert_to(tmp_path)
    euler, heun = tmp_path / "euler.npy", tmp_path / "heun.npy"
    assert main(["sample", "--ckpt_path", ckpt, "--solver", "euler", "--steps", "4", "--label", "all",
                 "--num_samples", "6", "--output", str(euler)]) == 0
    assert main(["sample", "--ckpt_path", ckpt, "--solver", "heun", "--grid", "1,0.5,0.2,0", "--label", "all",
                 "--num_samples", "6", "--output", str(heun)]) == 0
    for path in (euler, heun):
        x = np.load(path)
        assert x.shape == (6, 2, 8, 8) and np.isfinite(x).all(), path
    assert not np.allclose(np.load(euler), np.load(heun))
    uncond = tmp_path / "uncond.npy"
    assert main(["sample", "--ckpt_path", convert_to(tmp_path, UNCOND, "uncond.ckpt"), "--solver", "heun",
                 "--grid", "1,0.5,0.2,0", "--num_samples", "3", "--output", str(uncond)]) == 0
    x = np.load(uncond)
    assert x.shape == (3, 3, 8, 8) and np.isfinite(x).all()


# --- 8. exports that do not fit: one line naming the problem ---------------------------------------
def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    state = fixture(COND)["state_dict"]
    missing = dict(state)
    del missing["unet.enc.8x8_block0.conv_res0.weight"]
    with pytest.raises(ConfigError) as err:
        convert_edm2(export_with(tmp_path, missing))
    assert "missing keys: backbone.unet.enc.8x8_block0.conv_res0.weight" in one_line(err)

    for extra in ("unet.enc.8x8_block0.extra_gain", "ema_beta"):
        with pytest.raises(ConfigError) as err:
            convert_edm2(export_with(tmp_path, {**state, extra: torch.ones([])}))
        msg = one_line(err)
        assert "unexpected keys:" in msg and extra in msg and "missing" not in msg, msg

    wrong = {**state, "unet.emb_label.weight": torch.randn(32, 4)}
    with pytest.raises(ConfigError) as err:
        convert_edm2(export_with(tmp_path, wrong))
    msg = one_line(err)
    assert "unet.emb_label.weight" in msg and "(32, 4)" in msg and "(32, 3)" in msg, msg


def test_unknown_init_kwarg_is_named(tmp_path):
    kwargs = {**fixture(COND)["init_kwargs"], "fancy_new_option": 3}
    with pytest.raises(ConfigError) as err:
        convert_edm2(export_with(tmp_path, init_kwargs=kwargs))
    assert "'fancy_new_option'" in one_line(err)


def test_pickled_module_is_refused_with_the_export_recipe(tmp_path, capsys):
    path = tmp_path / "net.pkl"
    torch.save(nn.Linear(2, 2), path)  # a pickle of network objects, as EDM2's .pkl files are
    with pytest.raises(ConfigError) as err:
        read_export(str(path))
    msg = one_line(err)
    assert "state_dict" in msg and "init_kwargs" in msg and "tensors-only" in msg, msg

    out = tmp_path / "teacher.ckpt"
    capsys.readouterr()
    assert main(["convert", "edm2", str(path), "--output", str(out)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("ayf: error:") and "state_dict" in err_lines[0]
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "teacher.ckpt"
    out.write_bytes(b"keep me")
    assert main(["convert", "edm2", COND, "--output", str(out)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "exists" in err_lines[0] and "--overwrite" in err_lines[0], err_lines
    assert out.read_bytes() == b"keep me"
    assert main(["convert", "edm2", COND, "--output", str(out), "--overwrite"]) == 0
    assert CheckpointTeacher(str(out)).num_classes == 3


# --- 9. autoguidance with a second converted network -----------------------------------------------
def test_autoguidance_with_a_converted_guide(tmp_path, gen):
    fx = fixture(COND)
    guide_kwargs = {k: fx["init_kwargs"][k] for k in ("img_resolution", "img_channels", "label_dim", "channel_mult",
                                                       "num_blocks", "attn_resolutions", "channels_per_head")}
    guide_kwargs["model_channels"] = 8
    torch.manual_seed(1)
    guide = FlowMap(EDM2Net(**guide_kwargs), s_embedding="none")
    with torch.no_grad():  # EDM2 starts its gains at zero (a zero network); make every layer matter
        for p in guide.parameters():
            if p.ndim == 0:
                p.uniform_(0.3, 0.8, generator=gen)
    state = {k[len("backbone."):]: v for k, v in guide.state_dict().items()}
    assert all(k.startswith(("unet.", "logvar_")) for k in state)
    export = tmp_path / "guide_export.pt"
    torch.save({"state_dict": state, "init_kwargs": {**guide_kwargs, "use_fp16": False}}, export)
    teacher = CheckpointTeacher(convert_to(tmp_path))
    weak = CheckpointTeacher(convert_to(tmp_path, export, "guide.ckpt"))
    guided = GuidedTeacher(teacher, weak=weak)

    n = 4
    x = torch.randn(n, *teacher.data_shape, generator=gen)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    label = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        v_T = teacher(x, t, Cond(label=label))
        v_G = guide.eval().velocity(x, t, Cond(label=label))  # the guide before export and conversion
        assert rel_err(v_T, v_G) > 0.1
        torch.testing.assert_close(weak(x, t, Cond(label=label)), v_G, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(guided(x, t, Cond(label=label, lam=torch.full((n,), 2.0))), 2 * v_T - v_G,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(x, t, Cond(label=label)), v_T, rtol=0, atol=0)
