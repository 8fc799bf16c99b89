"""Writing image datasets as WebDataset shards: size-capped ``.tar`` files (optionally gzipped)
plus a JSON manifest.

Each sample is ``<key>.npy`` (a ``uint8`` array ``(C, H, W)``, stored bit-exactly) and, for
labelled data, ``<key>.cls`` (the class index as ASCII). A shard is written under a ``.tmp``
name and renamed when complete, and ``manifest.json`` is written last: a folder without a
manifest is an interrupted write, and no truncated file ever carries a shard's name.

Manifest fields: ``format``, ``count``, ``shape`` [C, H, W], ``num_classes`` (0: unlabelled),
``class_names``, ``mean``/``std`` per channel in model units ([-1, 1]), ``shards`` (file and
sample count of each) and ``source``.

Latent shards (the encoder's moments instead of pixels, resumable): :mod:`ayf.data.latent_shards`.
"""
from __future__ import annotations

import gzip as gzip_module
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ayf.data.sources import (  # noqa: F401  (re-exported: the shard writers' sources)
    IMAGE_SUFFIXES,
    CaptionSource,
    Source,
    arrays_source,
    as_chw,
    caption_records,
    center_crop,
    digits_source,
    folder_images,
    idx_source,
    load_image,
    read_idx,
)
from ayf.encoders import Encoder, IdentityEncoder, encoder_from_manifest
from ayf.errors import ConfigError
from ayf.figures import to_model_units, to_uint8  # noqa: F401  (re-exported)

MANIFEST = "manifest.json"
#: the resume record of an interrupted latent write (removed once the manifest is written)
PARTIAL = MANIFEST + ".partial"
LATENT_DTYPES = ("float16", "float32")
FORMAT = "ayf-shards/1"


def read_manifest(folder) -> dict:
    """The manifest of a shard folder, with a one-line error when it is missing or unreadable."""
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"shard path {folder} does not exist")
    path = folder / MANIFEST if folder.is_dir() else folder
    if not path.is_file():
        raise ConfigError(f"no {MANIFEST} in {folder}: not an ayf shard folder, or its write was interrupted")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an {FORMAT} manifest")
    return manifest


def encoder_of(manifest: dict) -> Encoder:
    """The encoder of a shard set: the one its manifest records for latent shards (decode its
    samples with it), :class:`~ayf.encoders.IdentityEncoder` for pixel shards."""
    if manifest.get("space", "pixels") == "pixels":
        return IdentityEncoder()
    if manifest.get("space") != "latent" or not isinstance(manifest.get("encoder"), dict):
        raise ConfigError(f"shard manifest of space {manifest.get('space')!r} without an encoder record: "
                          "written by a newer ayf, or edited?")
    return encoder_from_manifest(manifest["encoder"])


class ShardWriter:
    """Streams ``(uint8 image (C, H, W), label or None)`` pairs into capped shards.

    Args:
        folder: output folder (created; must be empty unless ``overwrite``).
        max_bytes: start a new shard once the current one holds this many bytes (uncompressed).
        gzip: write ``.tar.gz`` shards.
        overwrite: replace an existing shard folder's contents.
        prepare: check and clear the folder (False: a subclass resuming in it has done so).
    """

    def __init__(self, folder, max_bytes: int = 64 << 20, gzip: bool = False, overwrite: bool = False,
                 prepare: bool = True):
        self.folder = Path(folder)
        if prepare:
            prepare_output(self.folder, overwrite)
        self.max_bytes = max_bytes
        self.gzip = gzip
        self.shards: list = []
        self.count = 0
        self.shape: Optional[tuple] = None
        self.labelled: Optional[bool] = None
        self._sum = self._sq = None
        self._tar = self._raw = None
        self._bytes = 0

    def _open(self):
        name = f"shard-{len(self.shards):06d}.tar" + (".gz" if self.gzip else "")
        self._tmp = self.folder / (name + ".tmp")
        self._raw = open(self._tmp, "wb")
        stream = gzip_module.GzipFile(fileobj=self._raw, mode="wb", mtime=0) if self.gzip else self._raw
        self._tar = tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT)
        self._stream = stream
        self.shards.append({"file": name, "count": 0})
        self._bytes = 0

    def _finish_shard(self):
        self._tar.close()
        if self.gzip:
            self._stream.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._tmp, self.folder / self.shards[-1]["file"])
        self._tar = None

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self._bytes += 512 + -(-len(data) // 512) * 512

    def write(self, image: np.ndarray, label: Optional[int] = None) -> None:
        """Add one uint8 ``(C, H, W)`` image (and its label) to the current shard."""
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ConfigError(f"shard images must be uint8 (C, H, W); got {image.dtype} {image.shape}")
        if self.shape is None:
            self.shape, self.labelled = tuple(image.shape), label is not None
            self._sum = np.zeros(image.shape[0])
            self._sq = np.zeros(image.shape[0])
        if tuple(image.shape) != self.shape:
            raise ConfigError(f"image {self.count} has shape {tuple(image.shape)}, the first had {self.shape}")
        if (label is not None) != self.labelled:
            raise ConfigError(f"image {self.count}: either every image has a label or none has")
        self._append(image, label)
        x = to_model_units(image.astype(np.float64)).reshape(image.shape[0], -1)
        self._sum += x.mean(1)
        self._sq += (x**2).mean(1)

    def _append(self, array: np.ndarray, label: Optional[int], extra: Optional[dict] = None) -> None:
        """Store one example as ``<key>.npy`` (and ``<key>.cls``, and each ``extra`` array as
        ``<key>.<name>.npy``: a prompt's embeddings), in a new shard when the current one is full,
        and count it."""
        if self._tar is None or self._bytes >= self.max_bytes:
            if self._tar is not None:
                self._finish_shard()
            self._open()
        key = f"{self.count:08d}"
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        self._add(f"{key}.npy", buf.getvalue())
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode())
        for name, value in (extra or {}).items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
            self._add(f"{key}.{name}.npy", buf.getvalue())
        self.shards[-1]["count"] += 1
        self.count += 1

    def close(self, num_classes: int = 0, class_names: Optional[Sequence[str]] = None, source: str = "") -> dict:
        """Finish the last shard and write the manifest (which marks the folder complete)."""
        if self.count == 0:
            raise ConfigError("no images to write")
        if self._tar is not None:  # (None only where a resumed write found every shard complete)
            self._finish_shard()
        mean = self._sum / self.count
        std = np.sqrt(np.maximum(self._sq / self.count - mean**2, 0.0))
        manifest = {
            "format": FORMAT,
            "count": self.count,
            "shape": list(self.shape),
            "num_classes": int(num_classes) if self.labelled else 0,
            "class_names": list(class_names) if (self.labelled and class_names) else None,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "shards": self.shards,
            "source": source,
        }
        manifest.update(self._extra_fields())
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.folder / MANIFEST)
        return manifest

    def _extra_fields(self) -> dict:
        return {}

    def abort(self) -> None:
        """Drop the shard being written (leaves no file that looks complete)."""
        if self._tar is not None:
            self._raw.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None


def prepare_output(folder: Path, overwrite: bool) -> None:
    """Create ``folder``; refuse a non-empty one unless ``overwrite``, which removes only shard
    files, manifests and cached reference statistics that ayf wrote there."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output {folder} exists and is not a folder")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(f"output folder {folder} is not empty; pass --overwrite to replace its shards")
        for path in folder.iterdir():
            ours = path.name.startswith("shard-") or path.name.startswith(MANIFEST) or path.name.startswith("reference-")
            if path.is_file() and ours:
                path.unlink()
            elif path.is_dir() and path.name in ("train", "val") and (path / MANIFEST).exists():
                shutil.rmtree(path)
    folder.mkdir(parents=True, exist_ok=True)


def write_split(source: Source, folder, indices, pad: int = 0, desc: str = "", **writer_kw) -> dict:
    """Write ``source[indices]`` into one shard folder; returns its manifest."""
    from tqdm.auto import tqdm

    writer = ShardWriter(folder, **writer_kw)
    try:
        for i in tqdm(indices, desc=desc or str(folder), unit="img", mininterval=1.0):
            img, label = source[int(i)]
            if pad:
                img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
            writer.write(img, label)
    except BaseException:
        writer.abort()
        raise
    return writer.close(source.num_classes, source.class_names, source=desc)


def write_dataset(source: Source, out, val_fraction: float = 0.0, seed: int = 0, pad: int = 0,
                  limit: Optional[int] = None, overwrite: bool = False, encoder: Optional[Encoder] = None,
                  latent_dtype: str = "float32", batch_size: int = 32, device=None, **writer_kw) -> dict:
    """Write a whole source: into ``out`` or, with ``val_fraction``, into ``out/train`` and
    ``out/val`` (a seeded random split). Returns ``{split name: manifest}``.

    With an ``encoder`` (a :class:`~ayf.encoders.VAEEncoder`), the shards hold its moments, of
    ``latent_dtype``, encoded in batches of ``batch_size`` on ``device`` (default: CUDA when
    available) by :func:`write_latent_split`; an interrupted latent write run again with the same
    arguments and without ``overwrite`` resumes (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    out = Path(out)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ConfigError("the source holds no images")
    if encoder is not None:
        from ayf.data.latent_shards import write_latent_dataset

        return write_latent_dataset(source, out, n, val_fraction, seed, pad, overwrite, encoder, latent_dtype,
                                     batch_size, device, **writer_kw)
    prepare_output(out, overwrite)
    writer_kw["overwrite"] = True  # the folder was checked (and cleared of old shards) just above
    if val_fraction == 0:
        return {"all": write_split(source, out, range(n), pad, desc=str(out), **writer_kw)}
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return {
        "train": write_split(source, out / "train", np.sort(order[n_val:]), pad, desc=str(out / "train"), **writer_kw),
        "val": write_split(source, out / "val", np.sort(order[:n_val]), pad, desc=str(out / "val"), **writer_kw),
    }
