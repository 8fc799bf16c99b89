"""The ``ayf`` command line: LightningCLI for fit/validate/test, plus ``ayf sample``. Wiring only."""
from __future__ import annotations

import sys
from typing import Optional

HELP = """usage: ayf {fit,validate,test,sample,convert,shards,points,features,upgrade} [options]

Align Your Flow: distil diffusion / flow-matching teachers into few-step flow maps.

subcommands:
  fit        train a task from a config: ayf fit --config configs/toy/teacher.yaml
             (resume with --ckpt_path runs/.../checkpoints/last.ckpt)
  validate   run the validation loop of a config on a checkpoint (--ckpt_path FILE)
  test       run the test loop of a config on a checkpoint (--ckpt_path FILE)
  sample     draw samples from a checkpoint: ayf sample --ckpt_path FILE --steps 4 --output x.npy
  convert    turn a foreign network into an ayf teacher: ayf convert edm2 EXPORT.pt --output TEACHER.ckpt
  shards     write an image dataset as WebDataset shards: ayf shards digits --output data/digits
  points     write a 2-D point set (moons, circles, swiss_roll) to .npz: ayf points moons --output data/points/moons.npz
  features   train the classifier feature extractor used by FD/KID/PR: ayf features fit --help
  upgrade    convert a checkpoint written by an older ayf: ayf upgrade OLD.ckpt NEW.ckpt

`ayf SUBCOMMAND --help` explains each one's options; `ayf fit --help` lists every config key.
Tasks: ayf.tasks.FlowMatching, ayf.tasks.FlowMapDistillation (guided with ayf.nn.GuidedTeacher),
ayf.tasks.AdversarialFinetuning, ayf.tasks.Realignment; `--guidance LAM` sets the guidance scale used
for sampling.
Data: ayf.data.GaussianMixture (toy), ayf.data.VectorData ((N, D) arrays from .npy / .npz files),
ayf.data.ImageShards (WebDataset shards written by `ayf shards`).
Configs: configs/{toy,points,digits,fashion_mnist,imagenet64,diffusers}.
`ayf test` with the ayf.callbacks.FidelityMetrics callback writes FD / KID / precision / recall to
<log_dir>/fidelity.json, where <log_dir> is a NEW version folder of the test run's logger
(<save_dir>/<name>/version_N), not the folder of the tested checkpoint; the path is printed at the
end, and FidelityMetrics' `output` argument chooses another file.
"""

SUBCOMMANDS = ("fit", "validate", "test")
TOOLS = {"sample": "ayf.sample", "convert": "ayf.convert", "shards": "ayf.make_shards", "points": "ayf.make_points", "features": "ayf.metrics.features",
         "upgrade": "ayf.checkpoints"}


def _lightning_cli(args):
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI

    from ayf.callbacks.progress import ProgressBar
    from ayf.checkpoint_io import AtomicCheckpointIO
    from ayf.checkpoints import refuse_old_layout
    from ayf.ckpt_args import keep_typed_model_args
    from ayf.errors import ConfigError
    from ayf.tasks.base import AyfTask

    class AyfCLI(LightningCLI):
        """LightningCLI with ayf's tasks and data modules in subclass mode. Adds ayf's progress
        bar unless the config disables bars or names its own."""

        def _instantiate_trainer(self, config, callbacks):
            from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
            from lightning.pytorch.callbacks import ProgressBar as AnyBar

            listed = list(config.get("callbacks") or []) + list(callbacks)
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, AnyBar) for c in listed):
                callbacks = list(callbacks) + [ProgressBar()]
            plugins = config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written atomically
                config["plugins"] = plugins + [AtomicCheckpointIO()]
            check_devices(config)
            try:
                trainer = super()._instantiate_trainer(config, callbacks)
            except (MisconfigurationException, ValueError) as err:  # Lightning's word on an impossible setting
                raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
            check_global_batch(getattr(self, "datamodule", None), trainer)
            return trainer

        def parse_arguments(self, parser, args):
            self.typed = list(sys.argv[1:] if args is None else args)
            super().parse_arguments(parser, args)

        def _parse_ckpt_path(self):
            # Lightning drops `--model.*` options typed with --ckpt_path (Lightning-AI/pytorch-lightning#21455):
            # ayf.ckpt_args puts them back. A checkpoint of an older ayf layout is refused first.
            # `--ckpt_path last` is the run's newest last.ckpt, continued in its own version folder.
            sub = self.config.get("subcommand")
            if sub is not None and self.config[sub].get("ckpt_path") == "last":
                resolve_last_checkpoint(self.config[sub])
            if sub is not None and self.config[sub].get("ckpt_path"):
                refuse_old_layout(self.config[sub]["ckpt_path"])
            before = self.config.clone()
            super()._parse_ckpt_path()
            sub = self.config.get("subcommand")
            if sub is not None and before != self.config:
                keep_typed_model_args(before[sub], self.config[sub], self.typed)

        def add_arguments_to_parser(self, parser):
            parser.add_argument(
                "--guidance", type=Optional[float], default=None,
                help="guidance scale lam for sampling in validation, plots and FidelityMetrics: a guided "
                "flow map's condition, or classifier-free guidance of a teacher trained with label_dropout "
                "(default: the model's sample_guidance)")

        def _apply_guidance(self):
            lam = self.config[self.subcommand].get("guidance")
            if lam is not None:
                self.model.set_sample_guidance(float(lam))

        before_fit = before_validate = before_test = _apply_guidance

    return AyfCLI(
        AyfTask,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": False},
    )


def check_devices(trainer_config) -> None:
    """One-line errors for device settings that cannot run here: FSDP without a GPU, and more
    devices than this machine has (Lightning's own messages, which are tracebacks, cover the rest)."""
    import os

    import torch

    from ayf.errors import ConfigError

    strategy, accelerator = str(trainer_config.get("strategy", "auto")), str(trainer_config.get("accelerator", "auto"))
    devices = trainer_config.get("devices", "auto")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and gpus == 0)
    if strategy.startswith("fsdp") and on_cpu:
        raise ConfigError(f"strategy {strategy} needs GPUs (accelerator gpu); this run is on CPU: use ddp there")
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(f"accelerator {accelerator}, but no GPU is visible here (torch.cuda.is_available() is False)")
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        have = (os.cpu_count() or 1) if on_cpu else gpus
        if devices > have:
            kind = "CPU cores" if on_cpu else "GPUs"
            raise ConfigError(f"devices {devices}, but this machine has {have} {kind}")


def check_global_batch(datamodule, trainer) -> None:
    """A data module's ``global_batch_size`` must split evenly over the processes and the
    accumulated batches: checked here, before any process starts."""
    from ayf.data.loaders import split_global_batch

    total = getattr(datamodule, "global_batch_size", None)
    if total is not None:
        split_global_batch(total, trainer.num_devices * trainer.num_nodes, trainer.accumulate_grad_batches)


def resolve_last_checkpoint(cfg) -> None:
    """``ckpt_path: last`` -> the newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` of the
    config's logger (Lightning alone would look only in the new run's empty version folder, and
    start from scratch). The resumed run writes to a new version folder, whose last.ckpt is then
    the newest: a second interruption resumes from there."""
    import glob
    import os

    from ayf.errors import ConfigError

    logger = cfg.get("trainer.logger")
    args = getattr(logger, "init_args", None)
    if args is None or getattr(args, "save_dir", None) is None:
        raise ConfigError("--ckpt_path last needs the config's TensorBoardLogger (save_dir, name) to find the run; "
                          "pass the checkpoint file instead")
    name = getattr(args, "name", None) or "lightning_logs"
    pattern = os.path.join(args.save_dir, name, "version_*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ConfigError(f"--ckpt_path last: no checkpoint matches {pattern}; nothing to resume")
    cfg["ckpt_path"] = found[-1]
    print(f"ayf: resuming {found[-1]}", file=sys.stderr)


def main(args=None) -> int:
    """Entry point of the ``ayf`` console script; returns the exit status."""
    from ayf.errors import AyfError

    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    cmd, rest = args[0], args[1:]
    try:
        if cmd in TOOLS:
            module = __import__(TOOLS[cmd], fromlist=["main"])
            return module.main(rest)
        if cmd not in SUBCOMMANDS:
            choices = ", ".join(SUBCOMMANDS + tuple(TOOLS))
            print(f"ayf: error: unknown subcommand {cmd!r}; choose one of {choices}", file=sys.stderr)
            return 2
        _lightning_cli(None if from_argv else args)  # None: LightningCLI reads sys.argv itself
        return 0
    except Exception as err:  # noqa: BLE001 - user errors may arrive wrapped by jsonargparse
        cause = _user_error(err, AyfError)
        if cause is None:
            raise
        print(f"ayf: error: {cause}", file=sys.stderr)
        return 2


def _user_error(err, kind):
    """The first error of ``kind`` in an exception's cause/context chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
