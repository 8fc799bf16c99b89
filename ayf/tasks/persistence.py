"""What a task keeps in its checkpoints and restores from them: its weights without the frozen
teacher, plain hyperparameters, every rank's RNG state and the ``ayf`` record (written here, in
one hook, by :func:`ayf.checkpoints.make_record`)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ayf.checkpoints import make_record
from ayf.distributed import gather_objects, world
from ayf.io import rng_state, set_rng_state

#: where the frozen teacher sits in a task's state (never saved: the config names it)
TEACHER_PREFIX = "objective.teacher."
#: hyperparameters that name a file or folder the task read (checkpoints, model folders, prompts)
PATH_KEYS = ("ckpt_path", "model", "scheduler", "context", "teacher")


def resolved_paths(node):
    """A copy of a config tree whose file and folder arguments (:data:`PATH_KEYS`) that exist are
    absolute real paths: a later ``ayf test`` or resume reads the files this run read, whatever
    its working directory, and a moving pointer (``runs/<dataset>/<stage>/latest``) stays where
    it pointed."""
    if isinstance(node, list):
        return [resolved_paths(v) for v in node]
    if not isinstance(node, dict):
        return node
    return {k: (os.path.realpath(v) if k in PATH_KEYS and isinstance(v, str) and os.path.exists(v)
                else resolved_paths(v)) for k, v in node.items()}


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class Persistence:
    """Checkpoint hooks of :class:`ayf.tasks.AyfTask`, and its record."""

    #: global_step of the checkpoint these weights came from (``ayf test`` reports it)
    checkpoint_step = 0

    def record(self) -> dict:
        """The ``ayf`` record of this task's checkpoints (and of its own sampling settings); for data
        in a latent space, its encoder (``ayf sample`` and ``ayf export`` decode through it)."""
        encoder = self.data_encoder()
        space = {} if encoder is None or encoder.kind == "identity" else {"encoder": encoder.to_manifest()}
        base = self.net.base_record()
        return make_record(self.kind, self.net_config(), self.net.data_shape, self.default_solver,
                           getattr(self.objective, "sample_gamma", 0.0), self.sample_guidance,
                           **space, **({"base": base} if base else {}), **self.record_extras())

    def data_encoder(self):
        """The encoder of the attached data (:mod:`ayf.encoders`; the identity for pixels), or None."""
        trainer = getattr(self, "_trainer", None)
        return getattr(getattr(trainer, "datamodule", None), "encoder", None) if trainer is not None else None

    def space_lines(self) -> list:
        """What ``ayf fit`` / ``ayf test`` print about the data's space (latent data: its encoder)."""
        encoder = self.data_encoder()
        return [] if encoder is None or encoder.kind == "identity" else [f"data: latents of the {encoder.describe()}"]

    @torch.no_grad()
    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in the data's space as pixels in model units: latents decoded by the data's
        encoder, anything else unchanged (what grids and FD / KID / PR look at)."""
        encoder = self.data_encoder()
        return x if encoder is None else encoder.to(x.device).decode(x)

    def record_extras(self) -> dict:
        """Plain data a task adds to its record."""
        return {}

    def net_config(self) -> Optional[dict]:
        """The ``class_path``/``init_args`` config of :attr:`net` (None when built in Python)."""
        net_cfg = self.hparams.get("net")
        return net_cfg if isinstance(net_cfg, dict) else None

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith(TEACHER_PREFIX) or self._frozen_base(k)]:
            del sd[key]
        return sd

    def _frozen_base(self, key: str) -> bool:
        """A state entry of the net's frozen base (a LoRA student's model: the config names its folder)."""
        return key.startswith("net.") and self.net.frozen_key(key[len("net."):])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        teacher = getattr(self.objective, "teacher", None)
        if isinstance(teacher, torch.nn.Module):
            for key, value in teacher.state_dict(prefix=TEACHER_PREFIX).items():
                state_dict.setdefault(key, value)
        for key, value in self.net.state_dict(prefix="net.").items():  # the frozen base, as loaded
            if self._frozen_base(key):
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint):
        # hparams hold config dicts under `ayf fit`, but live objects when a task is built in
        # Python; keep only plain data so the checkpoint loads with torch.load(weights_only=True)
        hp = checkpoint.get("hyper_parameters")
        if hp:
            checkpoint["hyper_parameters"] = resolved_paths({k: v for k, v in hp.items() if _plain(v)})
        checkpoint["ayf_rng"] = gather_objects(self._trainer, rng_state())  # every rank's, for its own resume
        checkpoint["ayf"] = self.record()

    def on_load_checkpoint(self, checkpoint):
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        self._rng_to_restore = checkpoint.get("ayf_rng")

    def on_train_start(self):
        # a resumed run draws on from where the checkpointed one stood (restored here, after
        # Lightning's own set-up, which must not be able to move the stream); the loader's
        # position comes back through Lightning's loop state (ayf.data.loaders.ResumableLoader)
        states = getattr(self, "_rng_to_restore", None)
        rank, size = world(self.trainer)
        if states:
            set_rng_state(states[rank] if len(states) == size else states[0])
        elif size > 1:
            # every rank starts from the same seed, which would give all of them the same times and
            # noise for their different examples: a stream per rank makes the global batch's draws
            # independent, as one process's are (the weights agree anyway: DDP broadcasts rank 0's)
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        self._rng_to_restore = None
