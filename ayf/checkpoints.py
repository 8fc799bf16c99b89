"""The checkpoint layer: an ``ayf fit`` checkpoint -> a network, a teacher or a student's net.

The one place that knows the task kinds a checkpoint can hold (by name) and the layout of the
``ayf`` record that the tasks write next to Lightning's state. Checkpoints of an older layout are
upgraded in memory when read; ``ayf upgrade OLD NEW`` writes the upgraded file (what
``ayf fit/test --ckpt_path`` needs).
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Optional

import torch

from ayf.errors import CheckpointError, ConfigError
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import NetTeacher

#: layout of the ``ayf`` record: 2 since FlowMap's ``guidance_input`` and the tasks' objectives
FORMAT = 2
#: the kind of a teacher converted from another codebase by ``ayf convert``
CONVERTED_KIND = "Converted"
#: task kinds whose checkpoints hold a velocity model (a teacher)
TEACHER_KINDS = ("FlowMatching", "Realignment", CONVERTED_KIND)
#: task kinds whose checkpoints hold a flow map (sampled with the flow-map sampler)
FLOW_MAP_KINDS = ("FlowMapDistillation", "AdversarialFinetuning")
#: the EMA callback's key in ``checkpoint["callbacks"]``
EMA_STATE_KEY = "EMA"


def load_ayf_file(path: str, what: str, accept, writer: str, weights_only: bool = False, hint: str = None):
    """``torch.load`` on CPU of a file that ``writer`` wrote; a missing, unreadable or foreign
    file (``accept(obj)`` false) is a one-line CheckpointError. ``hint``: what a missing file's
    message tells the user to do (default: write one with ``writer``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path} ({hint or f'write one with `{writer}`'})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read {what} {path}: {type(err).__name__}: {err}") from None
    if not accept(obj):
        raise CheckpointError(f"{path} is not an ayf {what} (written by `{writer}`)")
    return obj


# --- older layouts ----------------------------------------------------------------------------
_RENAMED_CLASSES = {"ayf.nn.CheckpointTeacher": "ayf.checkpoints.CheckpointTeacher"}
_RENAMED_STATE = {"adaptive.": "objective.adaptive."}


def _upgrade_config(node):
    """Format 1 -> 2 of a config tree: FlowMap's ``guidance`` is ``guidance_input``; classes moved;
    TimePairSampler lost ``s_zero_only`` (the consistency objective owns its s = 0 rule)."""
    if isinstance(node, list):
        return [_upgrade_config(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _upgrade_config(v) for k, v in node.items()}
    if node.get("class_path") in _RENAMED_CLASSES:
        node["class_path"] = _RENAMED_CLASSES[node["class_path"]]
    if node.get("class_path") == "ayf.nn.FlowMap" and isinstance(node.get("init_args"), dict):
        args = node["init_args"]
        if "guidance" in args:
            args["guidance_input"] = args.pop("guidance")
    if node.get("class_path") == "ayf.math.TimePairSampler" and isinstance(node.get("init_args"), dict):
        node["init_args"].pop("s_zero_only", None)
    return node


def is_current(ckpt: dict) -> bool:
    return ckpt.get("ayf", {}).get("format", 1) >= FORMAT


def upgrade(ckpt: dict) -> dict:
    """A checkpoint of an older layout in the current one (a copy; current ones are returned as they are)."""
    if is_current(ckpt):
        return ckpt
    ckpt = copy.copy(ckpt)
    ckpt["ayf"] = _upgrade_config(dict(ckpt["ayf"]))
    ckpt["ayf"]["format"] = FORMAT
    if isinstance(ckpt.get("hyper_parameters"), dict):
        ckpt["hyper_parameters"] = _upgrade_config(ckpt["hyper_parameters"])
    state = {}
    for key, value in ckpt.get("state_dict", {}).items():
        for old, new in _RENAMED_STATE.items():
            if key.startswith(old):
                key = new + key[len(old):]
        state[key] = value
    ckpt["state_dict"] = state
    return ckpt


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, python) as plain data (tensors, ints), so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "words": list(words), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    """Restores :func:`rng_state`'s states (CUDA only where as many devices are visible)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))


def atomic_write(path: str, write) -> None:
    """Calls ``write(fh)`` on a temporary file beside ``path``, then renames it to ``path``
    (fsync'd, one ``os.replace`` on the same file system): a reader or a kill at any moment sees
    the old file or the new one, never a part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem = f".{os.path.basename(path)}.tmp"
    tmp = os.path.join(folder, f"{stem}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for stale in os.listdir(folder):  # the temporary files of writers killed before their rename
        if stale.startswith(stem):
            os.remove(os.path.join(folder, stale))
    try:  # the rename itself survives a power cut once the folder is synced
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def read_checkpoint(path: str, what: str = "checkpoint", hint: str = None) -> dict:
    """Loads a checkpoint written by ``ayf fit`` on CPU, in the current layout
    (``what``/``hint``: see :func:`load_ayf_file`)."""
    ckpt = load_ayf_file(path, what, lambda c: isinstance(c, dict) and "ayf" in c, "ayf fit", hint=hint)
    return upgrade(ckpt)


def refuse_old_layout(path: str) -> None:
    """A one-line CheckpointError when ``path`` is an ayf checkpoint of an older layout, which
    ``ayf fit/test --ckpt_path`` cannot resume; it names the command that converts it."""
    if not os.path.isfile(path):
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and "ayf" in ckpt and not is_current(ckpt):
        stem, ext = os.path.splitext(path)
        raise CheckpointError(f"{path} was written by an older ayf; convert it with "
                              f"`ayf upgrade {path} {stem}.v{FORMAT}{ext}` and pass that file")


# --- networks ---------------------------------------------------------------------------------
def build_network(config: dict) -> FlowMap:
    """Instantiates a FlowMap from its ``class_path``/``init_args`` config."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=FlowMap)
    cfg = parser.parse_object({"net": config})
    return parser.instantiate_classes(cfg).net


def ema_weights(ckpt: dict):
    """The EMA weights of the student saved by :class:`ayf.callbacks.EMA`, or None."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith(EMA_STATE_KEY) and isinstance(state, dict) and state.get("ema") is not None:
            return state["ema"]
    return None


def load_network(path: str, use_ema: bool = True, kinds=None, what: str = "checkpoint", hint: str = None):
    """Returns ``(net, meta)`` for a checkpoint, net in eval mode.

    kinds: accepted task names (e.g. :data:`TEACHER_KINDS`); others raise CheckpointError.
    what, hint: how errors name the file, and what a missing one's message says to do.
    """
    return network_from_checkpoint(read_checkpoint(path, what, hint), path, use_ema, kinds)


def network_from_checkpoint(ckpt: dict, path: str, use_ema: bool = True, kinds=None):
    """:func:`load_network` on a checkpoint already read by :func:`read_checkpoint`."""
    meta = ckpt["ayf"]
    if kinds is not None and meta.get("kind") not in kinds:
        raise CheckpointError(
            f"{path} is a {meta.get('kind')} checkpoint, but this needs {' or '.join(kinds)}"
        )
    if not isinstance(meta.get("net"), dict):
        raise CheckpointError(f"{path} does not record its network config; was it written by `ayf fit`?")
    net = build_network(meta["net"])
    state = ema_weights(ckpt) if use_ema else None
    if state is None:
        prefix = "net."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded network: {str(err).splitlines()[0]}") from None
    return net.eval(), meta


def student_config(teacher_config: dict, guidance_input: bool = False) -> dict:
    """The net config of a student of a teacher: the teacher's architecture with the s branch
    (``s_embedding: t_minus_s``) and, for a guided teacher, the guidance input added."""
    config = copy.deepcopy(teacher_config)
    args = config.setdefault("init_args", {})
    args["s_embedding"] = "t_minus_s"
    args["guidance_input"] = bool(guidance_input)
    return config


# --- teachers ---------------------------------------------------------------------------------
class CheckpointTeacher(NetTeacher):
    """A velocity network loaded from a ``FlowMatching`` checkpoint written by ``ayf fit``.

    Args:
        ckpt_path: path of the FlowMatching checkpoint.
        use_ema: use the EMA weights saved in the checkpoint when it has them.
    """

    def __init__(self, ckpt_path: str, use_ema: bool = True):
        net, meta = load_network(ckpt_path, use_ema=use_ema, kinds=TEACHER_KINDS, what="teacher checkpoint",
                                 hint="train a teacher with `ayf fit`, or pass its path, e.g. "
                                 "--model.teacher.init_args.ckpt_path PATH")
        super().__init__(net, unconditional=bool(meta.get("label_dropout")))
        self.net_config = meta["net"]
        self.ckpt_path = ckpt_path


def teacher_net_config(teacher) -> Optional[dict]:
    """The recorded net config of a (possibly guided) checkpoint teacher, or None."""
    strong = getattr(teacher, "teacher", teacher)
    return getattr(strong, "net_config", None)


# --- ayf upgrade ------------------------------------------------------------------------------
def main(argv) -> int:
    """``ayf upgrade OLD NEW``: writes a checkpoint of an older ayf in the current layout."""
    p = argparse.ArgumentParser(prog="ayf upgrade", description="Convert a checkpoint written by an older ayf to the "
                                "current layout (the original file is left as it is).")
    p.add_argument("old", help="checkpoint written by an older `ayf fit`")
    p.add_argument("new", help="where to write the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    if os.path.exists(args.new) and not args.overwrite:
        raise ConfigError(f"{args.new} exists; pass --overwrite to replace it")
    ckpt = load_ayf_file(args.old, "checkpoint", lambda c: isinstance(c, dict) and "ayf" in c, "ayf fit")
    if is_current(ckpt):
        print(f"{args.old} is already in the current layout (format {FORMAT}); nothing written")
        return 0
    torch.save(upgrade(ckpt), args.new)
    print(f"wrote {args.new} (format {FORMAT})")
    return 0
