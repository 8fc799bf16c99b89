"""``ayf fit | validate | test``: Lightning's CLI with ayf's tasks and data modules, its progress
bar, atomic checkpoint files, one-line errors for settings that cannot run here, ``--ckpt_path
last``, and ``--model.*`` options that survive ``--ckpt_path``."""
from __future__ import annotations

import glob
import io
import os
import re
import shutil
import sys
from typing import Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar as AnyBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus

from ayf.callbacks.progress import ProgressBar
from ayf.checkpoints import refuse_old_layout
from ayf.data.loaders import split_global_batch
from ayf.errors import ConfigError, user_error
from ayf.io import atomic_write
from ayf.tasks.base import AyfTask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with local files written by :func:`ayf.io.atomic_write`: a killed
    run leaves each checkpoint file whole (the previous version, or the new one). Lightning's own
    writer stages a file in the system's temporary folder and moves it, which is a copy, not a
    rename, when that folder is on another file system (a container's bind mount, a tmpfs). ``ayf
    fit`` uses it unless the config names another CheckpointIO; remote URLs go through Lightning's writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(str(path).removeprefix("file://"), lambda fh: self.write(fh, buffer.getbuffer()))

    def write(self, fh, data) -> None:
        """Writes the serialised checkpoint to the open temporary file."""
        fh.write(data)


class AyfCLI(LightningCLI):
    """LightningCLI with ayf's tasks and data modules in subclass mode. Adds ayf's progress bar
    unless the config disables bars or names its own, and writes checkpoints atomically."""

    def __init__(self, args=None):
        super().__init__(AyfTask, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=args, auto_configure_optimizers=False, save_config_kwargs={"overwrite": False},
                         parser_kwargs={"exit_on_error": False})  # ayf.cli prints parse errors in one line

    def _instantiate_trainer(self, config, callbacks):
        listed = list(config.get("callbacks") or []) + list(callbacks)
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, AnyBar) for c in listed):
            callbacks = list(callbacks) + [ProgressBar()]
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        check_devices(config)
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ValueError) as err:  # Lightning's word on an impossible setting
            raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
        total = getattr(getattr(self, "datamodule", None), "global_batch_size", None)
        if total is not None:  # it must split evenly over the processes and accumulated batches
            split_global_batch(total, trainer.num_devices * trainer.num_nodes, trainer.accumulate_grad_batches)
        return trainer

    def parse_arguments(self, parser, args):
        self.typed = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self):
        # `--ckpt_path last` is the run's newest last.ckpt, continued in its own version folder; a
        # checkpoint of an older ayf layout is refused first; Lightning drops `--model.*` options
        # typed with --ckpt_path (Lightning-AI/pytorch-lightning#21455), so they are put back
        sub = self.config.get("subcommand")
        if sub is not None and self.config[sub].get("ckpt_path") == "last":
            resolve_last_checkpoint(self.config[sub])
        if sub is not None and self.config[sub].get("ckpt_path"):
            refuse_old_layout(self.config[sub]["ckpt_path"])
        before = self.config.clone()
        super()._parse_ckpt_path()
        if sub is not None and before != self.config:
            keep_typed_model_args(before[sub], self.config[sub], self.typed)

    def instantiate_classes(self):
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001 - name the config key of a file that is not there
            cause = user_error(err)
            missing = getattr(cause, "missing", None)
            keys = holding(self.config.get(self.config.get("subcommand")), missing) if missing else []
            if not keys:
                raise
            named = " and ".join(f"--{k}" for k in keys)
            raise type(cause)(f"{cause}; the config names it in {named}", missing=missing) from None

    def _run_subcommand(self, subcommand):
        created = first_missing(getattr(self.trainer.logger, "root_dir", None))  # folders this run will make
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_empty_run(self.trainer, created)
            raise

    def after_fit(self):
        """After a finished fit that wrote checkpoints, ``<save_dir>/<name>/latest`` points at this
        run's folder: the stable path by which the next stage's recipe finds this one's checkpoints.
        Only a run in a version folder of its logger (TensorBoard, CSV) gets one."""
        trainer = self.trainer
        folder = getattr(trainer, "_ayf_run_dir", None)  # resolved at set-up (trainer.log_dir is collective under DDP)
        root = getattr(trainer.logger, "root_dir", None)
        if trainer.state.status != TrainerStatus.FINISHED or not trainer.is_global_zero or not folder or not root:
            return
        run = os.path.abspath(folder)
        if not glob.glob(os.path.join(run, "checkpoints", "*.ckpt")):
            return
        link = os.path.join(os.path.dirname(run), "latest")
        tmp = f"{link}.tmp{os.getpid()}"
        os.symlink(os.path.basename(run), tmp)
        os.replace(tmp, link)  # atomic: a reader sees the old run or the new one
        print(f"ayf: {link} -> {os.path.basename(run)}", file=sys.stderr)

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


#: what a run's folder holds before its first checkpoint, plot or result
RUN_STARTUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.")


def first_missing(path: Optional[str]) -> Optional[str]:
    """The outermost folder of ``path`` that does not exist yet (None: all of it exists)."""
    missing, path = None, os.path.abspath(path) if path else None
    while path and not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def remove_empty_run(trainer, created: Optional[str] = None) -> None:
    """Removes the version folder of a run that failed before its first step, with nothing in it
    but its start-up files (the config, TensorBoard's first events), so that it does not shift later
    version numbers, and the folders above it up to ``created`` that the run made and left empty. A
    folder with anything else in it (a checkpoint, a figure, a report) is kept."""
    if trainer is None or not trainer.is_global_zero or trainer.logger is None or trainer.global_step > 0:
        return  # a run that trained has logs worth keeping
    folder = getattr(trainer, "_ayf_run_dir", None) or getattr(trainer.logger, "log_dir", None)
    if not folder or not os.path.isdir(folder):
        return
    files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
    if not all(os.path.basename(f).startswith(RUN_STARTUP_FILES) for f in files):
        return
    shutil.rmtree(folder)
    path = os.path.dirname(os.path.abspath(folder))
    while created and (path == created or path.startswith(created + os.sep)) and not os.listdir(path):
        os.rmdir(path)
        path = os.path.dirname(path)


def holding(ns, value, prefix="") -> list:
    """Dotted keys of a parsed config whose value is the path ``value`` (as typed, or made absolute),
    as they are typed on the command line (``model.teacher.init_args.weak.init_args.ckpt_path``: the
    model's own ``init_args`` left out)."""
    keys = []
    for key, item in (vars(ns).items() if hasattr(ns, "__dict__") else ()):
        if isinstance(item, str) and item and os.path.abspath(item) == os.path.abspath(value):
            keys.append(prefix + key)
        elif hasattr(item, "__dict__"):
            keys += holding(item, value, f"{prefix}{key}.")
    return [k.replace("model.init_args.", "model.", 1).replace("data.init_args.", "data.", 1) for k in keys]


def check_devices(trainer_config) -> None:
    """One-line errors for device settings that cannot run here: FSDP without a GPU, and more
    devices than this machine has (Lightning's own messages, which are tracebacks, cover the rest)."""
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
            raise ConfigError(f"devices {devices}, but this machine has {have} {'CPU cores' if on_cpu else 'GPUs'}")


def resolve_last_checkpoint(cfg) -> None:
    """``ckpt_path: last`` -> the newest ``<save_dir>/<name>/version_*/checkpoints/last.ckpt`` of the
    config's logger (Lightning alone would look only in the new run's empty version folder, and
    start from scratch). The resumed run writes to a new version folder, whose last.ckpt is then
    the newest: a second interruption resumes from there."""
    args = getattr(cfg.get("trainer.logger"), "init_args", None)
    if args is None or getattr(args, "save_dir", None) is None:
        raise ConfigError("--ckpt_path last needs the config's TensorBoardLogger (save_dir, name) to find the run; "
                          "pass the checkpoint file instead")
    pattern = os.path.join(args.save_dir, getattr(args, "name", None) or "lightning_logs", "version_*",
                           "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ConfigError(f"--ckpt_path last: no checkpoint matches {pattern}; nothing to resume")
    cfg["ckpt_path"] = found[-1]
    print(f"ayf: resuming {found[-1]}", file=sys.stderr)


# --- --model.* options typed with --ckpt_path ------------------------------------------------------
# With --ckpt_path, LightningCLI replaces the model's arguments by the checkpoint's hyperparameters
# and drops the --model.* options typed on the command line; these put them back and name the config
# values that the checkpoint replaced. Remove once the installed Lightning makes typed arguments win.
def typed_keys(argv, group="model"):
    """Dotted keys of the ``--model...`` options in ``argv`` (``--model.lr=1`` and ``--model.lr 1``)."""
    keys = []
    for token in argv:
        key = token[2:].split("=", 1)[0] if token.startswith("--") else ""
        if key == group or key.startswith(group + "."):
            keys.append(key)
    return keys


def stored_key(ns, key):
    """``key`` as the parsed namespace ``ns`` stores it, or None: ``model.teacher.ckpt_path`` may be
    stored as ``model.init_args.teacher.init_args.ckpt_path``."""
    node, path = ns, []
    for part in key.split("."):
        fields = vars(node) if hasattr(node, "__dict__") else {}
        if part not in fields and hasattr(fields.get("init_args"), "__dict__"):
            path.append("init_args")
            fields = vars(fields["init_args"])
        if part not in fields:
            return None
        path.append(part)
        node = fields[part]
    return ".".join(path)


def keep_typed_model_args(typed_ns, merged, argv):
    """Puts the ``--model.*`` values of ``argv`` (as parsed into ``typed_ns``) back into ``merged``, the
    config after the checkpoint's hyperparameters replaced them, and prints one note naming the
    config-file values that the checkpoint's replaced."""
    kept = []
    for key in typed_keys(argv):
        path = stored_key(typed_ns, key)
        if path is not None:
            merged[path] = typed_ns[path]
            kept.append(path)
    old, new = dict(typed_ns.model.items()), dict(merged.model.items())
    replaced = [f"model.{k}" for k in old if k in new and old[k] != new[k]
                and not any(f"model.{k}.".startswith(p + ".") for p in kept)]
    if replaced:
        print(f"ayf: note: the checkpoint's hyperparameters replace the config's {', '.join(sorted(replaced))}; "
              "give --model.* options on the command line to change them", file=sys.stderr)


# --- one-line config errors ------------------------------------------------------------------------
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
_UNKNOWN_ARG = re.compile(r"(?:unrecognized arguments: |does not accept option ')-*([\w.]+)")
_CLASS = re.compile(r"Problem with given class_path '([\w.]+)'")


def config_error_line(message: str) -> str:
    """One line for jsonargparse's report of a config that does not parse: the innermost
    complaint, the class it is about, and the nearest valid name (``did you mean ...?``)."""
    lines = [line.strip() for line in message.strip().splitlines()]
    classes = [m.group(1) for line in lines for m in [_CLASS.search(line)] if m]
    for line in lines:
        if m := _NOT_ACCEPTED.search(line):
            owner = next((c for c in reversed(classes) if _importable(c)), None)
            options = _init_args(owner) if owner else []
            return f"{owner or 'the class'} has no option {m.group(1)!r}" + _nearest(m.group(1), options)
        if m := _NO_ATTRIBUTE.search(line):
            module, name = m.groups()
            return f"{module} has no class {name!r}" + _nearest(name, _public_classes(module))
        if m := _NO_MODULE.search(line):
            return f"no module {m.group(1)!r} (a misspelt class_path?)"
        if m := _UNKNOWN_ARG.search(line):
            key = m.group(1)
            group, _, leaf = key.rpartition(".")
            return f"unknown option {key!r}" + _nearest(leaf, _trainer_args() if group == "trainer" else [], group)
    useful = [line for line in lines if line and not line.startswith(("usage:", "[", "tip:", "Subtypes:", "Errors:",
                                                                        "Given value", "- Expected a <class"))]
    last = (useful[-1] if useful else lines[-1]).removeprefix("error: ")
    keys = [m.group(1) for line in useful[:-1] for m in [re.match(r'Parser key "([\w.]+)":$', line)] if m]
    owner = next((c for c in reversed(classes) if _importable(c)), None)
    if keys and keys[-1] not in ("model", "data"):  # the value of one argument: name it and its class
        return f"{keys[-1]}" + (f" of {owner}" if owner else "") + f": {last}"
    return last


def _nearest(name: str, options, group: str = "") -> str:
    import difflib

    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else ""


def _importable(class_path: str) -> bool:
    return _resolve(class_path) is not None


def _resolve(class_path: str):
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_args(class_path: str) -> list:
    import inspect

    params = []
    for cls in inspect.getmro(_resolve(class_path)):
        if "__init__" in vars(cls):
            params += [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return params


def _public_classes(module: str) -> list:
    import importlib
    import inspect

    try:
        return [n for n, v in vars(importlib.import_module(module)).items() if inspect.isclass(v) and not n.startswith("_")]
    except ImportError:
        return []


def _trainer_args() -> list:
    import inspect

    return list(inspect.signature(L.Trainer.__init__).parameters)
