"""Prompts as conditions: a text-to-image pipeline's text encoders, read from its local folder.

A FLUX pipeline folder (what ``pipe.save_pretrained(folder)`` writes) holds two text encoders:
``text_encoder`` (CLIP: its pooled embedding is the transformer's ``pooled_projections``) with
``tokenizer``, and ``text_encoder_2`` (T5: its last hidden states are the transformer's
``encoder_hidden_states``) with ``tokenizer_2``. :class:`PromptEncoder` turns prompts into a
:class:`ayf.nn.Cond` with ``text``, ``text_mask`` and ``pooled``, the way the pipeline does (each
tokenizer pads to its fixed length and truncates beyond it), and says which prompts it truncated.
Nothing is downloaded: the folders are read with ``local_files_only``.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import torch

from ayf.errors import ConfigError
from ayf.nn.cond import Cond

#: the pipeline's sub-folders: (tokenizer, encoder) of the pooled embedding, then of the sequence
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("prompts need the optional extra: pip install 'ayf[text]'") from None
    return transformers


def load_encoder(folder: str):
    """A transformers text encoder from its folder (its config names the class)."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ConfigError(f"{folder}: unknown text encoder {arch!r}")
    return cls.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)


class PromptEncoder:
    """Prompts -> ``Cond(text, text_mask, pooled)`` with a pipeline's text encoders.

    Args:
        pipeline: the pipeline folder (with ``tokenizer``, ``text_encoder``, ``tokenizer_2`` and
            ``text_encoder_2``).
        max_length: tokens of the sequence encoder (T5) per prompt; None: its tokenizer's
            ``model_max_length``, at most 512 (FLUX.1-dev's).
        device: where the encoders run.
    """

    def __init__(self, pipeline: str, max_length: Optional[int] = None, device="cpu"):
        if not os.path.isdir(pipeline):
            where = "" if os.path.isabs(pipeline) else f" (from {os.getcwd()})"
            raise ConfigError(f"pipeline folder not found: {pipeline}{where}", missing=pipeline)
        missing = [sub for pair in ENCODERS for sub in pair if not os.path.isdir(os.path.join(pipeline, sub))]
        if missing:
            raise ConfigError(f"{pipeline}: no {', '.join(missing)} in it; a FLUX pipeline folder has "
                              f"{', '.join(sub for pair in ENCODERS for sub in pair)} (pipe.save_pretrained)")
        transformers = _transformers()
        self.folder, self.device = os.path.abspath(pipeline), torch.device(device)
        self.tokenizers, self.encoders, self.lengths = [], [], []
        for tok_dir, enc_dir in ENCODERS:
            tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(pipeline, tok_dir), local_files_only=True)
            encoder = load_encoder(os.path.join(pipeline, enc_dir)).to(self.device)
            self.tokenizers.append(tokenizer)
            self.encoders.append(encoder)
        clip_positions = getattr(self.encoders[0].config, "max_position_embeddings", None)
        self.lengths = [min(v for v in (self.tokenizers[0].model_max_length, clip_positions) if v),
                        int(max_length or min(self.tokenizers[1].model_max_length, 512))]

    def to_manifest(self) -> dict:
        """What a shard manifest records of the prompts' encoding."""
        return {"pipeline": self.folder, "lengths": list(self.lengths)}

    def _tokens(self, which: int, prompts: Sequence[str]):
        tokenizer, length = self.tokenizers[which], self.lengths[which]
        full = tokenizer(list(prompts), padding=False, truncation=False, verbose=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > length:
                name = os.path.basename(os.path.normpath(tokenizer.name_or_path)) or "the tokenizer"
                warnings.warn(f"prompt {prompts[i][:40]!r}: {len(ids)} tokens, {name} takes {length}: truncated",
                              stacklevel=2)
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Cond:
        """The condition of ``prompts`` (a list of strings); a long prompt is truncated, with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        clip = self._tokens(0, prompts)
        pooled = self.encoders[0](clip["input_ids"].to(self.device)).pooler_output
        t5 = self._tokens(1, prompts)
        text = self.encoders[1](t5["input_ids"].to(self.device))[0]
        return Cond(text=text.float(), text_mask=t5["attention_mask"].to(self.device).bool(), pooled=pooled.float())

    def null_prompt(self) -> dict:
        """The empty prompt's embeddings ``{"text": (L, D), "pooled": (P,)}``: the null condition
        that :class:`ayf.nn.flux.FluxBackbone` reads from ``null_prompt``."""
        cond = self([""])
        return {"text": cond.text[0].cpu(), "pooled": cond.pooled[0].cpu()}
