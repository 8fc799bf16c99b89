"""Workaround for a LightningCLI limitation: with ``--ckpt_path``, the checkpoint's stored
hyperparameters replace the model's arguments, and ``--model.*`` options typed on the command
line are dropped silently (upstream: Lightning-AI/pytorch-lightning#21455, which makes typed
arguments win). These helpers put the typed values back and name the config-file values that the
checkpoint replaced. Remove them once the installed Lightning includes that change."""
from __future__ import annotations

import sys


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
