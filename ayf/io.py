"""File helpers below every other module: atomic writes, safe loading, RNG capture.

Nothing here imports another ayf package but :mod:`ayf.errors`, nor Lightning: the checkpoint
layer, the commands and the tasks build on these.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Optional

import numpy as np
import torch

from ayf.errors import CheckpointError, ConfigError


def atomic_write(path: str, write: Callable) -> None:
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


def check_output(path: str, overwrite: bool, inputs=(), suffixes=None) -> str:
    """The file a command will write at ``path``, checked first: its name ends in one of
    ``suffixes`` (so that no library appends another), it is none of ``inputs`` (not even with
    ``overwrite``), and it does not exist unless ``overwrite``. Raises a one-line ConfigError."""
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise ConfigError(f"the output {path} is the input {source}: write to another file")
    if suffixes and not path.endswith(tuple(suffixes)):
        raise ConfigError(f"the output {path} must end in {' or '.join(suffixes)}")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    return path


def refuse_existing(path: Optional[str], what: str) -> None:
    """A one-line ConfigError if a file named by a config (not a fresh run folder) already exists."""
    if path and os.path.exists(path):
        raise ConfigError(f"{what} {path} exists (from an earlier run?): give another path, or move it away")


def save_torch(obj, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`, creating the folder."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_torch(path: str, what: str, accept: Callable = lambda obj: True, writer: Optional[str] = None,
               hint: Optional[str] = None, explain: Optional[Callable] = None):
    """``torch.load`` on the CPU with ``weights_only=True`` (tensors and plain data only: no code
    in a file ever runs). A missing, unreadable or foreign file (``accept(obj)`` false) is a
    one-line CheckpointError; ``writer`` names the command that writes such files, ``hint`` what a
    missing file's message tells the user to do (default: write one with ``writer``), and
    ``explain(obj, path)`` what a foreign file is and which command handles it (or None)."""
    if not os.path.isfile(path):
        todo = hint or (f"write one with `{writer}`" if writer else "check the path")
        where = "" if os.path.isabs(path) else f" (from {os.getcwd()})"
        raise CheckpointError(f"{what} not found: {path}{where}: {todo}", missing=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read {what} {path}: {unreadable(path, err)}") from None
    if not accept(obj):
        said = explain(obj, path) if explain is not None else None
        raise CheckpointError(f"{path} is not an ayf {what}: " + (said or (f"write one with `{writer}`" if writer
                                                                          else "no such file is written by ayf")))
    return obj


def unreadable(path: str, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in the user's terms."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):  # torch.save's zip format, whose pickle refers to code
        return ("it holds Python objects besides tensors and plain data (a whole pickled model?), and ayf never "
                "runs code from a file; save the model's state_dict instead")
    if head[:1] == b"\x80":  # a bare pickle
        return ("it is a Python pickle, which ayf never unpickles (an EDM2 network .pkl? export its tensors and "
                "convert them: `ayf convert edm2 --help`)")
    first = (str(err).strip().splitlines() or [""])[0][:120]
    return f"it is not a file that torch.save wrote ({type(err).__name__}: {first})"


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, python) as plain data (tensors, ints), so a
    checkpoint holding them still loads with ``torch.load(weights_only=True)``."""
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
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))
