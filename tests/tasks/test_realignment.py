"""Teacher realignment (docs/maths.md §11) on a converted EDM2 fixture."""
import pytest
import torch

from ayf.checkpoints import CheckpointTeacher
from ayf.commands.convert import convert_edm2
from ayf.errors import ConfigError
from ayf.metrics.realignment import velocity_error
from ayf.nn import Cond
from ayf.nn.edm2 import realigned_config
from ayf.objectives import Batch, State
from ayf.tasks import Realignment
from tests.edm2_runs import fixture


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("edm2") / "teacher.ckpt"
    ckpt, _ = convert_edm2(fixture("tiny_cond"))
    torch.save(ckpt, path)
    return str(path)


def eval_set(teacher, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *teacher.data_shape, generator=g) * 0.5
    lo, hi = teacher.net.backbone.t_range
    t = lo + (hi - lo) * torch.rand(n, generator=g)
    return x0, Cond(label=torch.randint(0, 3, (n,), generator=g)), torch.randn(x0.shape, generator=g), t


EMBEDDING, FINETUNE = State(step=0), State(step=10**6)  # before and after the embedding phase


def step(task, opt, x0, cond, state):
    opt.zero_grad()
    per, _ = task.objective(task.net, Batch(x0, cond), state)
    per.mean().backward()
    opt.step()
    return per.mean().item()


def test_realigned_config_switches_the_time_input_and_refuses_other_teachers(teacher_ckpt):
    config = CheckpointTeacher(teacher_ckpt).net_config
    new = realigned_config(config, 32, 64.0)
    args = new["init_args"]["backbone"]["init_args"]
    assert args["time_input"] == "t" and args["t_num_freqs"] == 32 and args["t_max_freq"] == 64.0
    assert config["init_args"]["backbone"]["init_args"]["time_input"] == "c_noise"  # a copy
    with pytest.raises(ConfigError, match="realigned already"):
        realigned_config(new, 32, 64.0)
    mlp = {"class_path": "ayf.nn.FlowMap", "init_args": {"backbone": {"class_path": "ayf.nn.MLP"}}}
    with pytest.raises(ConfigError, match="EDM2Net"):
        realigned_config(mlp, 32, 64.0)


def test_embedding_phase_trains_only_the_new_embedding_and_brings_the_velocity_to_the_original(teacher_ckpt):
    torch.manual_seed(0)
    task = Realignment(teacher_ckpt, t_num_freqs=32, t_max_freq=128.0)
    teacher = task.objective.teacher
    before = {k: v.clone() for k, v in task.net.state_dict().items()}
    x0, cond, eps, t = eval_set(teacher)
    err0 = velocity_error(task.net, teacher, x0, cond, eps, t)["velocity_rel_error"]
    opt = torch.optim.Adam(task.net.parameters(), lr=3e-3)
    for _ in range(400):
        step(task, opt, x0[:64], cond[:64], EMBEDDING)
    report = velocity_error(task.net, teacher, x0, cond, eps, t)
    assert report["velocity_rel_error"] < 0.01 and err0 > 10 * report["velocity_rel_error"], (err0, report)
    assert len(report["bins"]) == 4 and report["bins"][0]["t"][0] == pytest.approx(float(t.min()))
    changed = {k for k, v in task.net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("backbone.t_embedding.") for k in changed), changed


def test_finetune_phase_moves_the_whole_network_toward_the_original(teacher_ckpt):
    torch.manual_seed(0)
    task = Realignment(teacher_ckpt, t_num_freqs=32, t_max_freq=128.0, target="teacher")
    teacher = task.objective.teacher
    x0, cond, eps, t = eval_set(teacher)
    opt = torch.optim.Adam(task.net.parameters(), lr=3e-3)
    for _ in range(100):
        step(task, opt, x0[:64], cond[:64], EMBEDDING)
    mid = velocity_error(task.net, teacher, x0, cond, eps, t)["velocity_rel_error"]
    before = {k: v.clone() for k, v in task.net.state_dict().items()}
    for _ in range(100):
        step(task, opt, x0[:64], cond[:64], FINETUNE)
    after = velocity_error(task.net, teacher, x0, cond, eps, t)["velocity_rel_error"]
    changed = {k.split(".")[2] for k, v in task.net.state_dict().items() if not torch.equal(v, before[k])}
    assert {"enc", "dec", "out_conv"} <= changed, changed  # not only the embedding
    assert after < mid, (mid, after)


def test_bad_target_and_negative_steps_are_one_line_errors(teacher_ckpt):
    with pytest.raises(ConfigError, match="teacher, data, none"):
        Realignment(teacher_ckpt, target="both")
    with pytest.raises(ConfigError, match="embedding_steps"):
        Realignment(teacher_ckpt, embedding_steps=-1)


def test_a_report_file_of_an_earlier_run_is_not_replaced(teacher_ckpt, tmp_path):
    earlier = tmp_path / "report.json"
    earlier.write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match="realignment report .* exists"):
        Realignment(teacher_ckpt, report=str(earlier)).on_fit_start()
    assert earlier.read_text() == '{"mine": 1}'
