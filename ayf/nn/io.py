"""Rebuilding networks from ``ayf fit`` checkpoints without their training task."""
from __future__ import annotations

import os

import torch

from ayf.errors import CheckpointError


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


#: task kinds whose checkpoints hold a flow map (sampled with the flow-map sampler)
FLOW_MAP_KINDS = ("FlowMapDistillation", "AdversarialFinetuning")


def read_checkpoint(path: str, what: str = "checkpoint", hint: str = None) -> dict:
    """Loads a checkpoint written by ``ayf fit`` on CPU (``what``/``hint``: see :func:`load_ayf_file`)."""
    return load_ayf_file(path, what, lambda c: isinstance(c, dict) and "ayf" in c, "ayf fit", hint=hint)


def build_network(config: dict):
    """Instantiates a FlowMap from its ``class_path``/``init_args`` config."""
    from jsonargparse import ArgumentParser

    from ayf.nn.flow_map import FlowMap

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--net", type=FlowMap)
    cfg = parser.parse_object({"net": config})
    return parser.instantiate_classes(cfg).net


def ema_weights(ckpt: dict):
    """The EMA weights of the student saved by :class:`ayf.callbacks.EMA`, or None."""
    for key, state in ckpt.get("callbacks", {}).items():
        if key.startswith("EMA") and isinstance(state, dict) and state.get("ema") is not None:
            return state["ema"]
    return None


def load_network(path: str, use_ema: bool = True, kinds=None, what: str = "checkpoint", hint: str = None):
    """Returns ``(net, meta)`` for a checkpoint, net in eval mode.

    kinds: accepted task names (e.g. ``("FlowMatching",)``); others raise CheckpointError.
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
