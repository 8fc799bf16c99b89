"""One optimiser step of each task under Lightning's DDP, replayed in one process.

Run by tests/integration/test_ddp.py as ``python -m torch.distributed.run --nproc_per_node 2
-m tests.ddp_step OUT DISTILLED_CKPT EDM2_CKPT [TASK ...]`` (a distilled toy flow map for the
adversarial task, a converted EDM2 network for realignment). For each task, every rank takes one step on its half of the
batch (the probe reseeds the global RNG at the batch start, so both ranks draw the same times and
noise, and records the batch); each rank writes its weights after the step. Rank 0 then rebuilds
the task from the same seed and replays the step in one process on the combined batch: the mean
loss of the two halves (each with the draws its rank made), one backward, one step. It writes
``OUT/<task>_rank<r>.pt`` and ``OUT/<task>_replay.pt`` (the initial weights too), which the test
compares, and ``OUT/<task>_control.pt``, a replay that saw rank 0's half twice (it must differ).
The ``skip`` task has a NaN loss on rank 1 only, under ``skip_nonfinite``: no rank may update.
"""
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ayf.checkpoints import CheckpointFlowMap, CheckpointTeacher
from ayf.data import GaussianMixture
from ayf.nn import MLP, FlowMap, MixtureTeacher, MLPDiscriminator
from ayf.tasks import AdversarialFinetuning, FlowMapDistillation, FlowMatching, Realignment

OUT, DISTILLED, EDM2 = sys.argv[1:4]
DRAW_SEED = 100
LR = 0.05
MIXTURE = {"means": [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], "stds": [0.3, 0.2, 0.25], "weights": [0.5, 0.3, 0.2]}


def sgd(params):
    # plain SGD: the step is proportional to the gradient, so a sum over ranks instead of a mean shows
    return torch.optim.SGD(params, lr=LR)


def mlp_flow_map(s_embedding):
    return FlowMap(MLP(data_dim=2, width=16, depth=1, emb_dim=16), s_embedding=s_embedding)


def flow_matching():
    return FlowMatching(net=mlp_flow_map("none"), optimizer=sgd)


def distillation():
    return FlowMapDistillation(net=mlp_flow_map("t_minus_s"), teacher=MixtureTeacher(MIXTURE), optimizer=sgd)


def adversarial():
    return AdversarialFinetuning(student=CheckpointFlowMap(DISTILLED), teacher=MixtureTeacher(MIXTURE),
                                 discriminator=MLPDiscriminator(data_dim=2, width=16, depth=2),
                                 optimizer=sgd, d_optimizer=sgd)


def realignment():
    return Realignment(teacher=EDM2, embedding_steps=0, target="teacher", optimizer=sgd, eval_examples=8)


def skipping():
    """Distillation with ``skip_nonfinite`` whose loss is NaN on rank 1 only: both ranks must skip."""
    task = FlowMapDistillation(net=mlp_flow_map("t_minus_s"), teacher=MixtureTeacher(MIXTURE), optimizer=sgd,
                               skip_nonfinite=10)
    forward = task.objective.forward

    def poisoned(net, batch, state=None):
        per, stats = forward(net, batch, state)
        return (per * float("nan") if task.trainer.global_rank == 1 else per), stats

    task.objective.forward = poisoned
    return task


TASKS = {"flow_matching": flow_matching, "distillation": distillation, "adversarial": adversarial,
         "realignment": realignment, "skip": skipping}


def weights(task):
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


class Probe(L.Callback):
    """Reseeds every rank at the batch start (same draws on both) and records the batch."""

    def __init__(self, name):
        self.name = name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, os.path.join(OUT, f"{self.name}_batch{trainer.global_rank}.pt"))
        # the stream each rank would have drawn from (ranks get their own, see AyfTask.on_train_start)
        torch.save(torch.get_rng_state(), os.path.join(OUT, f"{self.name}_stream{trainer.global_rank}.pt"))
        torch.manual_seed(DRAW_SEED)


class Images(L.LightningDataModule):
    """16 random images of the converted network's shape (realignment fits the teacher, not data)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        shape = CheckpointTeacher(EDM2).data_shape
        self.sets = [[{"x": x} for x in torch.randn(16, *shape, generator=gen)] for _ in range(2)]

    def train_dataloader(self):
        return DataLoader(self.sets[0], batch_size=4, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.sets[1], batch_size=4)


def data(name):
    if name == "realignment":
        return Images()
    # 32 points: each rank's DistributedSampler share is 16, in batches of 8
    return GaussianMixture(MIXTURE, batch_size=8, train_samples=32, val_samples=8, seed=3)


def ddp_step(name):
    L.seed_everything(0)
    task = TASKS[name]()
    initial = weights(task)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=2 if name == "adversarial" else 1,
                        callbacks=[Probe(name)], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data(name))
    rank = trainer.global_rank
    torch.save({"initial": initial, "after": weights(task), "skipped": task.guard.skipped},
               os.path.join(OUT, f"{name}_rank{rank}.pt"))
    dist.barrier()
    return rank


def halves(name):
    return [torch.load(os.path.join(OUT, f"{name}_batch{r}.pt"), weights_only=False) for r in (0, 1)]


def replay(name, use=(0, 1), tag="replay"):
    """The same step in one process: the mean loss over both halves (``use``), each with its
    rank's draws. ``use=(0, 0)`` is the test's control: a step that saw only rank 0's half."""
    L.seed_everything(0)
    task = TASKS[name]()
    if hasattr(task, "teacher"):
        task.teacher.bind_data(data(name))
    initial = weights(task)
    loaded = halves(name)
    parts = [loaded[r] for r in use]
    if name == "adversarial":
        g_opt, d_opt = sgd(task.trainable_parameters()), sgd(task.discriminator.parameters())
        steps = task.adversary.steps_at(0)
        d_opt.zero_grad()
        states = []
        for batch in parts:  # the discriminator step, as each rank made it
            torch.manual_seed(DRAW_SEED)
            b = task.to_batch(batch)
            loss, _ = task.adversary.discriminator_loss(task.discriminator, task.net, b.x0, task.fake_cond(b), steps)
            (loss / 2).backward()
            states.append(torch.get_rng_state())
        d_opt.step()
        g_opt.zero_grad()
        for batch, state in zip(parts, states, strict=True):  # then the generator step, continuing each rank's draws
            torch.set_rng_state(state)
            loss, _ = task.generator_loss(batch, steps)
            (loss / 2).backward()
        g_opt.step()
    else:
        task.on_train_batch_start(None, 0)  # what the trainer calls first (EDM2's weight renormalisation)
        opt = task.configure_optimizers()  # the task's own parameter groups (realignment has two)
        opt.zero_grad()
        for batch in parts:
            torch.manual_seed(DRAW_SEED)
            per, _ = task.objective(task.net, task.to_batch(batch), task.state())
            (per.mean() / 2).backward()
        opt.step()
    torch.save({"initial": initial, "after": weights(task)}, os.path.join(OUT, f"{name}_{tag}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[4:] or TASKS:
        if ddp_step(name) == 0 and name != "skip":
            replay(name)
            replay(name, use=(0, 0), tag="control")
        dist.barrier()
