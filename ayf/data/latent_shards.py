"""Latent shards: per sample the moments of an encoder (:mod:`ayf.encoders`) instead of uint8
pixels, written through :class:`ayf.data.shards.ShardWriter`'s format.

Latent shards (``write_dataset(..., encoder=VAEEncoder(...))``, ``ayf shards ... --vae DIR``) hold
per sample the encoder's moments instead of pixels: ``<key>.npy`` is a float16 or float32 array of
the moments' shape (for a VAE storing its posterior, the mean and std of the latents, concatenated
on the channel axis). Their manifest adds ``space: "latent"``, ``encoder`` (the encoder's
:meth:`~ayf.encoders.Encoder.to_manifest`), ``pixel_shape``, ``moments_shape``, ``moments_dtype``,
``latent_shape`` and ``job`` (what :func:`write_dataset` checks to resume); its ``shape`` is the
latent shape (the data shape a model sees) and its ``mean``/``std`` are those of the latents (the
exact expectation over the posterior's noise). A pixel manifest has no ``space`` (it reads as
``"pixels"``). :func:`encoder_of` gives a manifest's encoder.

A latent write resumes: it keeps ``manifest.json.partial`` beside its shards (the job's arguments,
and per complete shard its size, sample count, statistics and a hash of its first image), updated
each time a shard is renamed complete. Run again with the same arguments and no ``--overwrite``,
it checks that record (and re-reads the first image of each complete shard to check that the
source is the same), keeps the complete shards and encodes only the rest; other arguments are a
one-line error that asks for ``--overwrite``. The kept shards are not rewritten; the images after
them are encoded in other batches than an uninterrupted write would have used, which may change the
VAE's output in its last bits. Pixel writes, which are cheap, start over (``--overwrite``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ayf.data.shards import (
    FORMAT,
    LATENT_DTYPES,
    MANIFEST,
    PARTIAL,
    ShardWriter,
    Source,
    prepare_output,
    read_manifest,
)
from ayf.encoders import Encoder
from ayf.errors import ConfigError
from ayf.io import atomic_write


class LatentShardWriter(ShardWriter):
    """Streams an encoder's moments (float16 or float32 arrays) into capped shards, keeping the
    resume record :data:`PARTIAL` up to date (see the module docstring).

    Args:
        folder, max_bytes, gzip, overwrite: as for :class:`ShardWriter`.
        encoder: the encoder whose :meth:`~ayf.encoders.Encoder.encode` made the moments.
        pixel_shape: the pixels' ``(C, H, W)``.
        latent_dtype: ``"float16"`` or ``"float32"``: the stored arrays' type.
        job: plain JSON naming the write (its arguments); a resumed write must have the same.
        resume: continue from the folder's :data:`PARTIAL` record instead of clearing the folder.
    """

    def __init__(self, folder, encoder: Encoder, pixel_shape, latent_dtype: str = "float32", job: Optional[dict] = None,
                 max_bytes: int = 64 << 20, gzip: bool = False, overwrite: bool = False, resume: bool = False,
                 text: Optional[dict] = None):
        super().__init__(folder, max_bytes, gzip, overwrite, prepare=not resume)
        self.text = text  # the manifest's record of the prompts' embeddings (caption shards)
        if latent_dtype not in LATENT_DTYPES:
            raise ConfigError(f"latent_dtype must be one of {', '.join(LATENT_DTYPES)}; got {latent_dtype!r}")
        self.encoder, self.dtype, self.job = encoder, np.dtype(latent_dtype), job or {}
        self.pixel_shape = tuple(int(d) for d in pixel_shape)
        self.shape = encoder.moments_shape(self.pixel_shape)
        self.latent_shape = encoder.latent_shape(self.pixel_shape)
        self._sum, self._sq = np.zeros(self.latent_shape[0]), np.zeros(self.latent_shape[0])
        self._done: list = []  # resume entries of the complete shards
        self._next_digest = ""
        if resume:
            self._restore()
        else:
            self._save_partial()

    def _restore(self) -> None:
        path = self.folder / PARTIAL
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {path} ({err}): pass --overwrite to start the write again") from None
        if record.get("job") != self.job:
            theirs = record.get("job") or {}
            diff = sorted(k for k in set(theirs) | set(self.job) if theirs.get(k) != self.job.get(k))
            raise ConfigError(f"{self.folder} holds an interrupted write of another job (it differs in "
                              f"{', '.join(diff) or 'its record'}): pass --overwrite to start again")
        kept = []
        for entry in record.get("shards", []):  # the complete shards, up to the first one that is not intact
            file = self.folder / entry["file"]
            if entry["file"] != self._name(len(kept)) or not file.is_file() or file.stat().st_size != entry["bytes"]:
                break
            kept.append(entry)
        keep = {e["file"] for e in kept}
        for stale in self.folder.iterdir():  # a killed writer's .tmp, and shards after the kept ones
            if stale.is_file() and stale.name.startswith("shard-") and stale.name not in keep:
                stale.unlink()
        self._done = kept
        self.shards = [{"file": e["file"], "count": e["count"]} for e in kept]
        self.count = sum(e["count"] for e in kept)
        self.labelled = record.get("labelled") if kept else None
        self._save_partial()

    def _name(self, index: int) -> str:
        return f"shard-{index:06d}.tar" + (".gz" if self.gzip else "")

    def _save_partial(self) -> None:
        record = {"format": FORMAT, "job": self.job, "labelled": self.labelled, "shards": self._done}
        atomic_write(str(self.folder / PARTIAL), lambda fh: fh.write(json.dumps(record, indent=1).encode()))

    def _open(self):
        super()._open()
        self._shard_sum, self._shard_sq = np.zeros_like(self._sum), np.zeros_like(self._sq)
        self._shard_digest = self._next_digest

    def _finish_shard(self):
        super()._finish_shard()
        file = self.shards[-1]["file"]
        self._done.append({"file": file, "count": self.shards[-1]["count"],
                           "bytes": (self.folder / file).stat().st_size, "first": self._shard_digest,
                           "sum": self._shard_sum.tolist(), "sq": self._shard_sq.tolist()})
        self._save_partial()

    @property
    def first_digests(self) -> list:
        """The hash of the first image of each complete shard (see :func:`image_digest`)."""
        return [e["first"] for e in self._done]

    def write(self, moments: np.ndarray, label: Optional[int] = None, stats: Optional[tuple] = None,
              digest: str = "", extra: Optional[dict] = None) -> None:
        """Add one example: its moments (of the writer's dtype and moments shape), its label,
        ``stats`` = per-channel means of the latents' expectation and of their expected square,
        the :func:`image_digest` of its pixels (kept for the first example of each shard), and
        ``extra`` arrays (its prompt's embeddings)."""
        if moments.dtype != self.dtype or tuple(moments.shape) != self.shape:
            raise ConfigError(f"moments {self.count}: {moments.dtype} {tuple(moments.shape)}, expected "
                              f"{self.dtype} {self.shape}")
        if self.labelled is None:
            self.labelled = label is not None
        if (label is not None) != self.labelled:
            raise ConfigError(f"image {self.count}: either every image has a label or none has")
        self._next_digest = digest  # read by _open when this example starts a shard
        self._append(moments, label, extra)
        if stats is not None:
            self._shard_sum += stats[0]
            self._shard_sq += stats[1]

    def _extra_fields(self) -> dict:
        return {"shape": list(self.latent_shape), "space": "latent", "encoder": self.encoder.to_manifest(),
                "pixel_shape": list(self.pixel_shape), "moments_shape": list(self.shape),
                "moments_dtype": self.dtype.name, "latent_shape": list(self.latent_shape), "job": self.job,
                **({"text": self.text} if self.text else {})}

    def close(self, num_classes: int = 0, class_names: Optional[Sequence[str]] = None, source: str = "") -> dict:
        """Finish the last shard, write the manifest and drop the resume record."""
        if self.count and self._tar is not None:
            self._finish_shard()
        if self._done:  # the sums of the shards' sums: the same whether or not the write was resumed
            self._sum = np.sum([e["sum"] for e in self._done], axis=0)
            self._sq = np.sum([e["sq"] for e in self._done], axis=0)
        manifest = super().close(num_classes, class_names, source)
        (self.folder / PARTIAL).unlink(missing_ok=True)
        return manifest


def image_digest(image: np.ndarray, label: Optional[int]) -> str:
    """A hash of one source image (its shape and bytes) and its label: a resumed write checks
    with it that its source still gives the images the complete shards were encoded from."""
    h = hashlib.sha256(repr((tuple(image.shape), str(image.dtype), None if label is None else int(label))).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def _padded(source: Source, i: int, pad: int) -> tuple:
    img, label = source[int(i)]
    if pad:
        img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    return img, label


def write_latent_split(source: Source, folder, indices, encoder: Encoder, pad: int = 0, desc: str = "",
                       latent_dtype: str = "float32", batch_size: int = 32, device=None, resume: bool = False,
                       max_bytes: int = 64 << 20, gzip: bool = False, prompts=None) -> dict:
    """Encode ``source[indices]`` in batches of ``batch_size`` on ``device`` (default: CUDA when
    available; the encoder is moved there) and write its moments into one shard folder; returns its
    manifest. ``resume``: the folder may hold a complete or interrupted write of the same job, which
    is kept (see the module docstring); otherwise it is cleared of ayf's files first.

    ``prompts`` (an :class:`ayf.text.PromptEncoder`, with a :class:`~ayf.data.sources.CaptionSource`):
    each example also holds its caption's ``text``, ``text_mask`` and ``pooled`` embeddings (as
    ``<key>.text.npy`` ...; text and pooled of ``latent_dtype``), the folder the empty prompt's
    (``null_prompt.pt``), and the manifest a ``text`` record."""
    import torch
    from tqdm.auto import tqdm

    folder, indices = Path(folder), np.asarray(indices, dtype=np.int64)
    pixel_shape = _padded(source, indices[0], pad)[0].shape
    encoder.latent_shape(pixel_shape)  # a size or channel count the encoder cannot take fails here, before any file
    job = {"encoder": encoder.to_manifest(), "latent_dtype": latent_dtype, "pixel_shape": list(pixel_shape),
           "pad": int(pad), "max_bytes": int(max_bytes), "gzip": bool(gzip), "count": int(len(indices)),
           "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(), "source_count": len(source)}
    if prompts is not None:
        if not hasattr(source, "caption"):
            raise ConfigError("prompt embeddings need a source of captioned images (ayf shards captions)")
        job["prompts"] = prompts.to_manifest()
    if resume and (folder / MANIFEST).is_file() and not (folder / PARTIAL).exists():
        done = read_manifest(folder)
        if done.get("job") != job:
            raise ConfigError(f"{folder} holds a complete shard set of another job: pass --overwrite to start again")
        return done
    resume = resume and (folder / PARTIAL).is_file()
    text = None if prompts is None else {**job["prompts"], "null_prompt": NULL_PROMPT}
    writer = LatentShardWriter(folder, encoder, pixel_shape, latent_dtype, job, max_bytes=max_bytes, gzip=gzip,
                               overwrite=True, resume=resume, text=text)
    start = 0
    for entry, digest in zip(writer.shards, writer.first_digests, strict=True):
        if image_digest(*_padded(source, indices[start], pad)) != digest:
            raise ConfigError(f"{folder / entry['file']} was encoded from another image {start} than the source gives "
                              "now (another source?): pass --overwrite to start again")
        start += entry["count"]
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder.to(device)
    if writer.count:
        tqdm.write(f"{folder}: resuming after {len(writer.shards)} complete shard(s), {writer.count} of "
                   f"{len(indices)} images")
    try:
        with tqdm(total=len(indices), initial=writer.count, desc=desc or str(folder), unit="img",
                  mininterval=1.0) as bar:
            for begin in range(writer.count, len(indices), batch_size):
                items = [_padded(source, i, pad) for i in indices[begin: begin + batch_size]]
                for j, (img, _) in enumerate(items):
                    if img.dtype != np.uint8 or img.shape != pixel_shape:
                        raise ConfigError(f"image {begin + j} is {img.dtype} {img.shape}; the first was uint8 {pixel_shape}")
                pixels = torch.from_numpy(np.stack([img for img, _ in items]))
                moments = encoder.encode(pixels.to(device)).cpu().numpy().astype(writer.dtype)
                if not np.isfinite(moments).all():
                    raise ConfigError(f"images {begin}..{begin + len(items) - 1} encode to non-finite moments"
                                      + (" in float16: use latent_dtype float32" if latent_dtype == "float16" else ""))
                mean, var = encoder.latent_mean_var(torch.from_numpy(moments.astype(np.float32)))
                mean, var = mean.double(), var.double()
                firsts = mean.mean((-2, -1)).numpy(), (mean**2 + var).mean((-2, -1)).numpy()
                extras = [None] * len(items)
                if prompts is not None:
                    extras = prompt_arrays(prompts, [source.caption(i) for i in indices[begin: begin + batch_size]],
                                           writer.dtype)
                for j, (img, label) in enumerate(items):
                    writer.write(moments[j], label, (firsts[0][j], firsts[1][j]), image_digest(img, label), extras[j])
                bar.update(len(items))
        if prompts is not None:
            import torch

            atomic_write(str(folder / NULL_PROMPT), lambda fh: torch.save(prompts.null_prompt(), fh))
    except BaseException:
        writer.abort()
        raise
    return writer.close(source.num_classes, source.class_names, source=desc)


NULL_PROMPT = "null_prompt.pt"  # the empty prompt's embeddings, beside caption shards


def prompt_arrays(prompts, captions, dtype) -> list:
    """Per caption ``{"text", "text_mask", "pooled"}`` arrays: its embeddings by ``prompts``."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond = prompts(captions)
    for w in caught:  # a truncated caption, said above the progress bar
        from tqdm.auto import tqdm

        tqdm.write(f"warning: {w.message}")
    text, mask, pooled = (v.cpu().numpy() for v in (cond.text, cond.text_mask, cond.pooled))
    return [{"text": text[j].astype(dtype), "text_mask": mask[j], "pooled": pooled[j].astype(dtype)}
            for j in range(len(captions))]


def interrupted_latent_write(out) -> bool:
    """Whether ``out`` holds an interrupted latent write (no complete manifest at its top, and a
    resume record in it or in its ``train``/``val`` folders, or a complete ``train`` beside no
    complete ``val``)."""
    out = Path(out)
    if not out.is_dir() or (out / MANIFEST).exists():
        return False
    if any((folder / PARTIAL).is_file() for folder in (out, out / "train", out / "val")):
        return True
    return (out / "train" / MANIFEST).is_file() and not (out / "val" / MANIFEST).exists()


def write_latent_dataset(source: Source, out: Path, n: int, val_fraction: float, seed: int, pad: int, overwrite: bool,
                          encoder: Encoder, latent_dtype: str, batch_size: int, device, **writer_kw) -> dict:
    if latent_dtype not in LATENT_DTYPES:
        raise ConfigError(f"latent_dtype must be one of {', '.join(LATENT_DTYPES)}; got {latent_dtype!r}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    unknown = set(writer_kw) - {"max_bytes", "gzip", "prompts"}
    if unknown:
        raise ConfigError(f"unknown shard writer options {sorted(unknown)}")
    resume = not overwrite and interrupted_latent_write(out)
    if resume and (out / PARTIAL).is_file() != (val_fraction == 0):
        had = "without" if (out / PARTIAL).is_file() else "with"
        raise ConfigError(f"{out} holds an interrupted write {had} a train/val split: pass --overwrite to start again")
    if not resume:
        prepare_output(out, overwrite)
    kw = dict(encoder=encoder, pad=pad, latent_dtype=latent_dtype, batch_size=int(batch_size), device=device,
              resume=resume, **writer_kw)
    if val_fraction == 0:
        return {"all": write_latent_split(source, out, range(n), desc=str(out), **kw)}
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return {
        "train": write_latent_split(source, out / "train", np.sort(order[n_val:]), desc=str(out / "train"), **kw),
        "val": write_latent_split(source, out / "val", np.sort(order[:n_val]), desc=str(out / "val"), **kw),
    }
