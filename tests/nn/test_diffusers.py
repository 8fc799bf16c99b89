"""diffusers models as teachers and student backbones: the wrappers against their schedulers' own
maths (float32), a student starting at its teacher and learning s, the JVP, and bad input. Tiny
models are built from configs and saved to temporary folders; nothing is downloaded."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ayf.errors import AyfError, ConfigError  # noqa: E402
from ayf.nn import Cond, FlowMap  # noqa: E402
from ayf.nn.diffusers import DiffusersBackbone, DiffusersTeacher  # noqa: E402
from ayf.tasks import FlowMapDistillation  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)


def unet(**kw):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 attention_head_dim=8, **kw)


def cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                          layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                          cross_attention_dim=8, attention_head_dim=2)


def dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4,
                                           num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=3)


def save(tmp_path, name, model, scheduler):
    folder = tmp_path / name
    model.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return str(folder)


def randomise_(module, seed=1):
    """Non-zero weights everywhere (diffusers zero-initialises some output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_vp_unet_teacher_agrees_with_ddpm_scheduler(tmp_path, prediction, schedule):
    """At every 97th training timestep, the teacher's x0 = x_t - t v equals DDPMScheduler.step's
    pred_original_sample for the same model output (the VP point of the same SNR)."""
    model = randomise_(unet(num_class_embeds=3))
    scheduler = diffusers.DDPMScheduler(prediction_type=prediction, beta_schedule=schedule, clip_sample=False)
    teacher = DiffusersTeacher(save(tmp_path, "unet", model, scheduler))
    gen = torch.Generator().manual_seed(0)
    ab = scheduler.alphas_cumprod.double()
    for k in range(0, 1000, 97):
        x_vp = torch.randn(3, 2, 8, 8, generator=gen)
        label = torch.tensor([0, 1, 2])
        with torch.no_grad():
            out = model(x_vp, torch.full((3,), k), class_labels=label).sample
        x0_ref = scheduler.step(out, k, x_vp, generator=gen).pred_original_sample
        sigma = ((1 - ab[k]) / ab[k]).sqrt()
        t = float(sigma / (1 + sigma))
        x_t = x_vp * ((1 - t) ** 2 + t ** 2) ** 0.5
        v = teacher(x_t, torch.full((3,), t), Cond(label=label))
        torch.testing.assert_close(x_t - t * v, x0_ref, **TOL)


def test_conditional_unet_teacher_agrees_with_euler_karras_scheduler(tmp_path):
    """Euler with Karras sigmas calls the model at fractional timesteps (log-sigma interpolation):
    the teacher's x0 equals the scheduler's pred_original_sample at each of them."""
    model = randomise_(cond_unet())
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 use_karras_sigmas=True)
    context = torch.randn(3, 8)
    torch.save(context, tmp_path / "prompt.pt")
    teacher = DiffusersTeacher(save(tmp_path, "cond", model, scheduler), context=str(tmp_path / "prompt.pt"))
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        x_ve = torch.randn(2, 2, 8, 8, generator=gen) * (1 + sigma ** 2) ** 0.5
        with torch.no_grad():
            out = model(scheduler.scale_model_input(x_ve, timestep), timestep, encoder_hidden_states=context.expand(2, 3, 8)).sample
        x0_ref = scheduler.step(out, timestep, x_ve).pred_original_sample
        t = sigma / (1 + sigma)
        x_t = (1 - t) * x_ve
        v = teacher(x_t, torch.full((2,), t))
        torch.testing.assert_close(x_t - t * v, x0_ref, **TOL)


def test_dit_flow_teacher_agrees_with_flow_match_euler_steps(tmp_path):
    """A FlowMatchEuler DiT (learned variance dropped): one Euler step of the teacher's velocity
    from sigma to the next is the scheduler's step, at each of its (shifted) sigmas."""
    model = randomise_(dit()).eval()  # eval: no random label dropout in the reference
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    teacher = DiffusersTeacher(save(tmp_path, "dit", model, scheduler))
    assert teacher.num_classes == 3 and teacher.unconditional  # DiT's dropped-label row is the null label
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    label = torch.tensor([2, 0])
    for i, timestep in enumerate(scheduler.timesteps):
        x = torch.randn(2, 2, 8, 8, generator=gen)
        with torch.no_grad():
            out = model(x, timestep.expand(2), class_labels=label).sample[:, :2]
        ref = scheduler.step(out, timestep, x).prev_sample
        sigma, nxt = float(scheduler.sigmas[i]), float(scheduler.sigmas[i + 1])
        v = teacher(x, torch.full((2,), sigma), Cond(label=label))
        torch.testing.assert_close(x + (nxt - sigma) * v, ref, **TOL)
    # the null label is DiT's row num_classes
    null = teacher(x, torch.full((2,), 0.5), Cond(label=torch.tensor([-1, -1])))
    with torch.no_grad():
        ref = model(x, torch.full((2,), 500.0), class_labels=torch.tensor([3, 3])).sample[:, :2]
    torch.testing.assert_close(null, ref, **TOL)


@pytest.fixture(params=["unet", "dit"])
def folder(request, tmp_path):
    if request.param == "unet":
        return save(tmp_path, "unet", randomise_(unet(num_class_embeds=3)), diffusers.DDPMScheduler(prediction_type="v_prediction"))
    return save(tmp_path, "dit", randomise_(dit()), diffusers.FlowMatchEulerDiscreteScheduler())


def test_student_starts_at_the_teacher_and_its_s_and_lam_branches_learn(folder):
    """A FlowMapDistillation without a net builds the student on the teacher's model, with F = v
    for every s and lam at init; the zero-initialised branches get gradients, and once they move,
    F depends on s and on lam."""
    teacher = DiffusersTeacher(folder)
    task = FlowMapDistillation(teacher=teacher)
    student = task.net
    assert isinstance(student.backbone, DiffusersBackbone) and student.is_flow_map
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([0.9, 0.6, 0.4, 0.2])
    cond = Cond(label=torch.tensor([0, 1, 2, 0]))
    v = teacher(x, t, cond)
    for s in (t, t * 0.5, torch.zeros(4)):
        torch.testing.assert_close(student(x, t, s, cond), v, **TOL)
    guided = FlowMap(DiffusersBackbone(folder), guidance_input=True)
    guided.init_from_teacher(teacher.net)
    torch.testing.assert_close(guided(x, t, t * 0.5, cond.with_(lam=torch.full((4,), 2.5))), v, **TOL)
    # the branches enter before the first nonlinearity: their zeroed output layers get a gradient
    loss = guided(x, t, t * 0.5, cond.with_(lam=torch.full((4,), 2.5))).pow(2).sum()
    loss.backward()
    for branch in (guided.s_emb, guided.guidance_emb):
        grads = [p.grad for p in branch.parameters() if p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) > 0
    randomise_(guided.s_emb, seed=2)
    randomise_(guided.guidance_emb, seed=3)
    with torch.no_grad():
        a = guided(x, t, t * 0.5, cond.with_(lam=torch.full((4,), 2.5)))
        b = guided(x, t, t * 0.2, cond.with_(lam=torch.full((4,), 2.5)))
        c = guided(x, t, t * 0.5, cond.with_(lam=torch.full((4,), 1.0)))
    assert float((a - b).abs().max()) > 1e-3 and float((a - c).abs().max()) > 1e-3


def test_jvp_through_the_student_matches_finite_differences(folder):
    """The distillation objectives' JVP (torch.func.jvp, attention on the math kernel) in float64:
    along x it equals central differences to 1e-8; along t (through the scheduler's timestep map and
    diffusers' sinusoidal embedding, which runs in float32) to 1e-2, and reverse-mode AD to 1e-6."""
    student = FlowMap(DiffusersBackbone(folder))
    randomise_(student.s_emb, seed=2)
    student.double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)
    t, s = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    cond = Cond(label=torch.tensor([1, 2]))

    def f(x_, t_):
        return student(x_, t_, s, cond)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    h = 1e-5
    for dx, dt, tol in ((torch.randn(x.shape, generator=gen, dtype=torch.float64), torch.zeros_like(t), 1e-8),
                        (torch.zeros_like(x), torch.ones_like(t), 1e-2)):
        _, tangent = torch.func.jvp(f, (x, t), (dx, dt))
        with torch.no_grad():
            fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
        assert rel(tangent, fd) < tol
    t_req = t.clone().requires_grad_(True)
    out = f(x, t_req)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad_t,) = torch.autograd.grad((out * w).sum(), t_req)
    torch.testing.assert_close((tangent * w).flatten(1).sum(1), grad_t, rtol=1e-6, atol=1e-8)


def test_bad_input_gives_one_line_errors(tmp_path):
    folder = save(tmp_path, "unet", unet(), diffusers.DDPMScheduler())
    with pytest.raises(ConfigError, match="unsupported diffusers scheduler 'EDMEulerScheduler'; supported: DDPMScheduler"):
        DiffusersTeacher(folder, scheduler=str(save(tmp_path, "edm", unet(), diffusers.EDMEulerScheduler())))
    with pytest.raises(ConfigError, match="not a diffusers model folder"):
        DiffusersTeacher(str(tmp_path))
    with pytest.raises(ConfigError, match="no scheduler config at"):
        DiffusersTeacher(folder, scheduler=str(tmp_path / "missing"))
    vae = tmp_path / "vae"
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(vae)
    with pytest.raises(ConfigError, match="unsupported diffusers model 'AutoencoderKL'; supported: UNet2DModel"):
        DiffusersTeacher(str(vae), scheduler=folder)
    cond_folder = save(tmp_path, "cond", cond_unet(), diffusers.DDIMScheduler())
    with pytest.raises(ConfigError, match="needs its cross-attention input: give context"):
        DiffusersTeacher(cond_folder)
    from tests.test_trust import Planted

    torch.save({"prompt": Planted(str(tmp_path / "code_ran"))}, tmp_path / "planted.pt")
    with pytest.raises(AyfError, match="never runs code from a file"):
        DiffusersTeacher(cond_folder, context=str(tmp_path / "planted.pt"))
    assert not (tmp_path / "code_ran").exists()
    torch.save(torch.zeros(3, 5), tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match=r"need a \(L, 8\) tensor"):
        DiffusersTeacher(cond_folder, context=str(tmp_path / "bad.pt"))
    labelled = DiffusersTeacher(save(tmp_path, "labelled", unet(num_class_embeds=3), diffusers.DDPMScheduler()))
    assert not labelled.unconditional
    with pytest.raises(ConfigError, match="no unconditional prediction"):
        labelled(torch.zeros(1, 2, 8, 8), torch.full((1,), 0.5), Cond(label=torch.tensor([-1])))
    strict = DiffusersTeacher(folder, out_of_range="error")  # epsilon DDPM: t in [0.0099, 0.9937]
    with pytest.raises(ConfigError, match="outside its valid range"):
        strict(torch.zeros(1, 2, 8, 8), torch.full((1,), 0.999))
    lo, hi = strict.t_range
    clamped = DiffusersTeacher(folder)
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(clamped(x, torch.full((1,), 1.0)), clamped(x, torch.full((1,), hi)))
    torch.testing.assert_close(clamped(x, torch.full((1,), 0.0)), clamped(x, torch.full((1,), lo)))
    with pytest.raises(ConfigError, match="clamp, error"):  # its student shares the rule: no teacher-only data_mean
        DiffusersTeacher(folder, out_of_range="data_mean")


def test_a_teacher_says_what_it_read_and_records_its_folder_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(tmp_path, "unet", unet(), diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"))
    teacher = DiffusersTeacher("unet")  # typed relative to the working directory
    assert teacher.net_config["init_args"]["backbone"]["init_args"]["model"] == str(tmp_path / "unet")
    (line,) = teacher.describe()
    assert line.startswith(f"{tmp_path / 'unet'} (UNet2DModel under DDPMScheduler): a VP model predicting v_prediction, "
                           "squaredcos_cap_v2, 1000 steps (VPTeacher); valid t in [")
    monkeypatch.chdir("/")  # a student built on it finds the folder from anywhere
    assert FlowMapDistillation(teacher=teacher).net.backbone.folder == str(tmp_path / "unet")
    with pytest.raises(ConfigError, match="diffusers model folder not found: /moved"):
        DiffusersTeacher("moved")
