"""The checkpoint record: what ``ayf fit`` (and ``ayf convert``) write beside Lightning's state,
and the networks and teachers rebuilt from it.

The record (``checkpoint["ayf"]``) is written by :func:`make_record` and read by
:func:`read_checkpoint`, which upgrades the layouts of older ayf versions in memory (``ayf
upgrade OLD NEW`` writes the upgraded file, which ``ayf fit/test --ckpt_path`` needs). The
sampling settings of a model are derived from its record by :func:`sampling_defaults` alone.
This is the one module that knows the task kinds (by name).
"""
from __future__ import annotations

import copy
import os
from typing import Optional

from torch import nn

from ayf.errors import CheckpointError, ConfigError
from ayf.io import load_torch
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import NetTeacher

#: layout of the record: 2 since FlowMap's ``guidance_input``; 3 since objectives are objects
#: (``objective: {class_path, init_args}``) and the record holds the sampling settings
FORMAT = 3
#: the kind of a teacher converted from another codebase by ``ayf convert``
CONVERTED_KIND = "Converted"
#: task kinds whose checkpoints hold a velocity model (a teacher)
TEACHER_KINDS = ("FlowMatching", "Realignment", CONVERTED_KIND)
#: task kinds whose checkpoints hold a flow map (sampled with the flow-map sampler)
FLOW_MAP_KINDS = ("FlowMapDistillation", "AdversarialFinetuning")
#: the EMA callback's key in ``checkpoint["callbacks"]``
EMA_STATE_KEY = "EMA"


# --- the record ----------------------------------------------------------------------------------
def make_record(kind: str, net: Optional[dict], data_shape, solver: str, gamma: float = 0.0,
                guidance: Optional[float] = None, **extra) -> dict:
    """The ``ayf`` record of a checkpoint: the task ``kind``, the network's ``class_path`` /
    ``init_args`` config, the data shape, the sampling settings the model was validated with
    (``solver``, ``gamma``, guidance scale) and ``extra`` plain data (``label_dropout`` of a
    teacher, a realignment report, a conversion's source)."""
    return {"format": FORMAT, "kind": kind, "net": net, "data_shape": [int(d) for d in data_shape],
            "sampling": {"solver": solver, "gamma": float(gamma), "guidance": guidance}, **extra}


def sampling_defaults(record: dict, solver: Optional[str] = None, gamma: Optional[float] = None,
                      guidance: Optional[float] = None) -> dict:
    """``{"solver", "gamma", "guidance"}``: the record's sampling settings, each replaced by the
    argument given (None keeps the record's). The one place that turns a model's record and a
    user's choices into sampling settings (``ayf sample``, ``ayf test``, the callbacks)."""
    saved = record.get("sampling") or {}
    out = {"solver": solver or saved.get("solver", "flow_map"),
           "gamma": float(saved.get("gamma", 0.0) if gamma is None else gamma),
           "guidance": saved.get("guidance") if guidance is None else guidance}
    if not 0.0 <= out["gamma"] <= 1.0:
        raise ConfigError(f"gamma must lie in [0, 1], got {out['gamma']}")
    return out


def describe(obj, path: str) -> Optional[str]:
    """What a file that ayf read is, when it is not what was asked for, and the command that
    handles it (None: nothing ayf knows)."""
    if not isinstance(obj, dict):
        return None
    if {"state_dict", "init_kwargs"} <= set(obj):
        return f"it is an EDM2 export; convert it into a teacher with `ayf convert edm2 {path} --output TEACHER.ckpt`"
    if obj.get("kind") == "ayf-classifier":
        return "it is a feature extractor of `ayf features fit`, which FidelityMetrics' extractor reads"
    if isinstance(obj.get("ayf"), dict):
        return f"it is an ayf {obj['ayf'].get('kind')} checkpoint"
    if "pytorch-lightning_version" in obj:
        return "it is a Lightning checkpoint without ayf's record (written by another program)"
    return None


def read_checkpoint(path: str, what: str = "checkpoint", hint: Optional[str] = None) -> dict:
    """A checkpoint written by ``ayf fit`` or ``ayf convert``, on the CPU, in the current layout
    (tensors and plain data only; ``what``/``hint``: how errors name the file and what a missing
    one's message says to do)."""
    ckpt = load_torch(path, what, lambda c: isinstance(c, dict) and "ayf" in c, "ayf fit", hint=hint,
                      explain=describe)
    return upgrade(ckpt)


def refuse_old_layout(path: str) -> None:
    """A one-line CheckpointError when ``path`` is an ayf checkpoint of an older layout, which
    ``ayf fit/test --ckpt_path`` cannot resume; it names the command that converts it."""
    if not os.path.isfile(path):
        return
    ckpt = load_torch(path, "checkpoint", explain=describe)
    if isinstance(ckpt, dict) and "ayf" in ckpt and not is_current(ckpt):
        stem, ext = os.path.splitext(path)
        raise CheckpointError(f"{path} was written by an older ayf; convert it with "
                              f"`ayf upgrade {path} {stem}.v{FORMAT}{ext}` and pass that file")


# --- older layouts -------------------------------------------------------------------------------
_RENAMED_CLASSES = {"ayf.nn.CheckpointTeacher": "ayf.checkpoints.CheckpointTeacher"}
_RENAMED_STATE = {"adaptive.": "objective.adaptive."}
_OBJECTIVES = {"emd": "ayf.objectives.EMD", "lmd": "ayf.objectives.LMD", "consistency": "ayf.objectives.Consistency"}
#: format-2 task arguments that became the distillation objective's (``compile`` too, for flow maps)
_OBJECTIVE_ARGS = ("weighting", "tangent_norm", "time_sampler", "guidance_range", "semigroup", "jvp_float32", "compile")
#: format-2 arguments that are gone (ayf/objectives, benchmarks/ablation.py)
_DROPPED_ARGS = ("mask_nonfinite", "shared_primal", "semigroup_pick", "net", "init_weights", "distilled_ckpt",
                 "lambda_adv", "r1_gamma", "fake_steps", "fake_steps_schedule", "nonfinite", "max_skips")


def _upgrade_config_1(node):
    """Format 1 -> 2 of a config tree: FlowMap's ``guidance`` is ``guidance_input``; classes moved;
    TimePairSampler lost ``s_zero_only`` (the consistency objective owns its s = 0 rule)."""
    if isinstance(node, list):
        return [_upgrade_config_1(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _upgrade_config_1(v) for k, v in node.items()}
    if node.get("class_path") in _RENAMED_CLASSES:
        node["class_path"] = _RENAMED_CLASSES[node["class_path"]]
    args = node.get("init_args") if isinstance(node.get("init_args"), dict) else {}
    if node.get("class_path") == "ayf.nn.FlowMap" and "guidance" in args:
        args["guidance_input"] = args.pop("guidance")
    if node.get("class_path") == "ayf.math.TimePairSampler":
        args.pop("s_zero_only", None)
    return node


def _renamed_key(key: str) -> str:
    for old, new in _RENAMED_STATE.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _upgrade_sampler(config):
    """TimePairSampler lost its proposals other than the default (uniform s) in format 3."""
    if isinstance(config, dict) and isinstance(config.get("init_args"), dict):
        args = config["init_args"]
        if args.get("proposal", "uniform_s") == "uniform_s":
            for key in ("proposal", "gap_mean", "gap_std", "p_long"):
                args.pop(key, None)
    return config


def _upgrade_hparams_2(hp: dict, kind: str) -> dict:
    """Format 2 -> 3 of a task's hyperparameters: the objective string and its flattened settings
    become an ``objective`` config (with no tangent warm-up: a format-2 task without the warm-up
    callback kept r = 0.99, as ``ayf test`` always did); the adversarial task's checkpoint, GAN
    settings and student become ``student`` and ``adversary`` configs; ``nonfinite`` and
    ``max_skips`` become ``skip_nonfinite``."""
    hp = dict(hp)
    skip = int(hp.get("max_skips", 10)) if hp.get("nonfinite") == "skip" else 0
    if kind in FLOW_MAP_KINDS:
        args = {k: hp.pop(k) for k in _OBJECTIVE_ARGS if k in hp}
        if "time_sampler" in args:
            args["time_sampler"] = _upgrade_sampler(args["time_sampler"])
        name = hp.get("objective") or "emd"
        hp["objective"] = {"class_path": _OBJECTIVES.get(name, name), "init_args": {**args, "warmup": 0}}
    if kind == "AdversarialFinetuning":
        hp["student"] = {"class_path": "ayf.checkpoints.CheckpointFlowMap",
                         "init_args": {"ckpt_path": hp.get("distilled_ckpt"), "weights": hp.get("init_weights", "ema")}}
        hp["adversary"] = {"class_path": "ayf.objectives.RpGAN", "init_args": {
            k: hp[k] for k in ("lambda_adv", "r1_gamma", "fake_steps", "fake_steps_schedule") if k in hp}}
    for key in _DROPPED_ARGS:
        if not (key == "net" and kind != "AdversarialFinetuning"):
            hp.pop(key, None)
    hp["skip_nonfinite"] = skip
    return hp


def is_current(ckpt: dict) -> bool:
    return ckpt.get("ayf", {}).get("format", 1) >= FORMAT


def upgrade(ckpt: dict) -> dict:
    """A checkpoint of an older layout in the current one (a copy; current ones are returned as they are)."""
    if is_current(ckpt):
        return ckpt
    ckpt, record = copy.copy(ckpt), dict(ckpt["ayf"])
    version = record.get("format", 1)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), dict) else None
    if version < 2:
        record, hp = _upgrade_config_1(record), _upgrade_config_1(hp)
        ckpt["state_dict"] = {_renamed_key(key): value for key, value in ckpt.get("state_dict", {}).items()}
    kind = record.get("kind")
    objective = record.pop("objective", None)
    record = make_record(kind, record.get("net"), record.get("data_shape") or [],
                         solver="flow_map" if kind in FLOW_MAP_KINDS else "euler",
                         gamma=1.0 if objective == "consistency" else 0.0, guidance=record.pop("sample_guidance", None),
                         **{k: v for k, v in record.items() if k not in ("format", "kind", "net", "data_shape")})
    ckpt["ayf"] = record
    if hp is not None:
        ckpt["hyper_parameters"] = _upgrade_hparams_2(hp, kind)
    return ckpt


# --- networks ------------------------------------------------------------------------------------
def build_object(config: dict, base):
    """Instantiates a ``class_path``/``init_args`` config of a subclass of ``base``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--obj", type=base)
    return parser.instantiate_classes(parser.parse_object({"obj": config})).obj


def build_network(config: dict) -> FlowMap:
    """Instantiates a FlowMap from its ``class_path``/``init_args`` config."""
    return build_object(config, FlowMap)


def ema_weights(ckpt: dict):
    """The EMA weights of the student saved by :class:`ayf.callbacks.EMA`, or None."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith(EMA_STATE_KEY) and isinstance(state, dict) and state.get("ema") is not None:
            return state["ema"]
    return None


def network_weights(ckpt: dict, use_ema: bool = True) -> dict:
    """The network's state dict in a checkpoint: its EMA (when asked and saved) or the trained weights."""
    state = ema_weights(ckpt) if use_ema else None
    if state is None:
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    return state


def checked_record(ckpt: dict, path: str, kinds=None) -> dict:
    """The record of a read checkpoint, checked to be of one of ``kinds`` and to name its network."""
    record = ckpt["ayf"]
    if kinds is not None and record.get("kind") not in kinds:
        raise CheckpointError(f"{path} is a {record.get('kind')} checkpoint, but this needs {' or '.join(kinds)}")
    if not isinstance(record.get("net"), dict):
        raise CheckpointError(f"{path} does not record its network config; was it written by `ayf fit`?")
    return record


def load_weights(net, state: dict, path: str, base: Optional[dict] = None) -> None:
    """``state`` into ``net``; a net with a frozen base (a LoRA student, :meth:`ayf.nn.FlowMap.frozen_key`)
    takes the rest of its weights from its own folder, which must be the ``base`` the checkpoint names."""
    frozen = getattr(net, "frozen_key", None)
    if base is not None and frozen is not None:
        here = net.base_record()
        if here is None or here["fingerprint"] != base.get("fingerprint"):
            raise CheckpointError(f"{path}: a LoRA of another base model (trained on {base.get('folder')}, weights "
                                  f"{base.get('fingerprint')}; the model here is {None if here is None else here['folder']}, "
                                  f"{None if here is None else here['fingerprint']})")
        state = {**{k: v for k, v in net.state_dict().items() if frozen(k)}, **state}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the recorded network: {str(err).splitlines()[0]}") from None


def network_from(ckpt: dict, path: str, use_ema: bool = True, kinds=None):
    """``(net in eval mode, record, source)`` of a read checkpoint; ``source`` says which file and
    weights it is (the absolute path, the task kind, the step, EMA or trained weights)."""
    record = checked_record(ckpt, path, kinds)
    net = build_network(record["net"])
    load_weights(net, network_weights(ckpt, use_ema), path, record.get("base"))
    return net.eval(), record, source_of(ckpt, path, use_ema)


def source_of(ckpt: dict, path: str, use_ema: bool) -> str:
    """Which file and weights a network came from: the absolute path, the task kind, the step,
    EMA or trained weights."""
    step = ckpt.get("global_step")
    ema = use_ema and ema_weights(ckpt) is not None
    return (f"{os.path.realpath(path)} ({ckpt['ayf'].get('kind')}" + ("" if step is None else f", step {step}")
            + f", {'EMA' if ema else 'trained'} weights)")


def load_network(path: str, use_ema: bool = True, kinds=None, what: str = "checkpoint", hint: str = None):
    """``(net in eval mode, record)`` of a checkpoint. kinds: accepted task names (e.g.
    :data:`TEACHER_KINDS`); what, hint: how errors name the file, and what a missing one's message says."""
    return network_from(read_checkpoint(path, what, hint), path, use_ema, kinds)[:2]


def student_config(teacher_config: dict, guidance_input: bool = False) -> dict:
    """The net config of a student of a teacher: the teacher's architecture with the s branch
    (``s_embedding: t_minus_s``) and, for a guided teacher, the guidance input added."""
    config = copy.deepcopy(teacher_config)
    args = config.setdefault("init_args", {})
    args["s_embedding"] = "t_minus_s"
    args["guidance_input"] = bool(guidance_input)
    return config


class CheckpointFlowMap(FlowMap):
    """A distilled flow map rebuilt from its checkpoint (``FlowMapDistillation`` or an earlier
    ``AdversarialFinetuning`` run): the recorded architecture with the saved weights. The
    checkpoint's EMA is kept as :attr:`initial_ema`, which the EMA callback continues.

    Args:
        ckpt_path: the flow map's checkpoint.
        weights: start from its ``ema`` weights (default) or its ``raw`` trained weights.
    """

    def __init__(self, ckpt_path: str, weights: str = "ema"):
        if weights not in ("ema", "raw"):
            raise ConfigError(f"unknown weights {weights!r}; choose ema or raw")
        ckpt = read_checkpoint(ckpt_path, "flow-map checkpoint",
                               hint="distil it with `ayf fit`, or give its path")
        config = checked_record(ckpt, ckpt_path, FLOW_MAP_KINDS)["net"]
        if config.get("class_path") != "ayf.nn.FlowMap":
            raise CheckpointError(f"{ckpt_path} records a {config.get('class_path')} network, not an ayf.nn.FlowMap")
        args = dict(config.get("init_args", {}))
        super().__init__(build_object(args.pop("backbone"), nn.Module), **args)
        load_weights(self, network_weights(ckpt, weights == "ema"), ckpt_path, ckpt["ayf"].get("base"))
        self.net_config, self.ckpt_path = config, ckpt_path
        self.source = source_of(ckpt, ckpt_path, weights == "ema")
        self.initial_ema = ema_weights(ckpt)


# --- teachers ------------------------------------------------------------------------------------
class CheckpointTeacher(NetTeacher):
    """A velocity network loaded from a teacher checkpoint (``FlowMatching``, ``Realignment``, or
    ``ayf convert``).

    Args:
        ckpt_path: path of the teacher checkpoint.
        use_ema: use the EMA weights saved in the checkpoint when it has them.
    """

    def __init__(self, ckpt_path: str, use_ema: bool = True):
        ckpt = read_checkpoint(ckpt_path, "teacher checkpoint", hint="train the teacher with `ayf fit`, or give its path")
        net, record, self.source = network_from(ckpt, ckpt_path, use_ema, TEACHER_KINDS)
        super().__init__(net, unconditional=bool(record.get("label_dropout")))
        self.net_config = record["net"]
        self.ckpt_path = ckpt_path

    def describe(self) -> list:
        return [self.source]


def teacher_net_config(teacher) -> Optional[dict]:
    """The recorded net config of a (possibly guided) checkpoint teacher, or None."""
    strong = getattr(teacher, "teacher", teacher)
    return getattr(strong, "net_config", None)
