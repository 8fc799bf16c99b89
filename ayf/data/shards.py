"""Writing image datasets as WebDataset shards: size-capped ``.tar`` files (optionally gzipped)
plus a JSON manifest.

Each sample is ``<key>.npy`` (a ``uint8`` array ``(C, H, W)``, stored bit-exactly) and, for
labelled data, ``<key>.cls`` (the class index as ASCII). A shard is written under a ``.tmp``
name and renamed when complete, and ``manifest.json`` is written last: a folder without a
manifest is an interrupted write, and no truncated file ever carries a shard's name.

Manifest fields: ``format``, ``count``, ``shape`` [C, H, W], ``num_classes`` (0: unlabelled),
``class_names``, ``mean``/``std`` per channel in model units ([-1, 1]), ``shards`` (file and
sample count of each) and ``source``.

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

import gzip as gzip_module
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ayf.data.arrays import read_arrays
from ayf.encoders import Encoder, IdentityEncoder, encoder_from_manifest
from ayf.errors import ConfigError
from ayf.figures import to_model_units, to_uint8  # noqa: F401  (re-exported)
from ayf.io import atomic_write

MANIFEST = "manifest.json"
#: the resume record of an interrupted latent write (removed once the manifest is written)
PARTIAL = MANIFEST + ".partial"
LATENT_DTYPES = ("float16", "float32")
FORMAT = "ayf-shards/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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

    def _append(self, array: np.ndarray, label: Optional[int]) -> None:
        """Store one example as ``<key>.npy`` (and ``<key>.cls``), in a new shard when the current
        one is full, and count it."""
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
                 max_bytes: int = 64 << 20, gzip: bool = False, overwrite: bool = False, resume: bool = False):
        super().__init__(folder, max_bytes, gzip, overwrite, prepare=not resume)
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
              digest: str = "") -> None:
        """Add one example: its moments (of the writer's dtype and moments shape), its label,
        ``stats`` = per-channel means of the latents' expectation and of their expected square,
        and the :func:`image_digest` of its pixels (kept for the first example of each shard)."""
        if moments.dtype != self.dtype or tuple(moments.shape) != self.shape:
            raise ConfigError(f"moments {self.count}: {moments.dtype} {tuple(moments.shape)}, expected "
                              f"{self.dtype} {self.shape}")
        if self.labelled is None:
            self.labelled = label is not None
        if (label is not None) != self.labelled:
            raise ConfigError(f"image {self.count}: either every image has a label or none has")
        self._next_digest = digest  # read by _open when this example starts a shard
        self._append(moments, label)
        if stats is not None:
            self._shard_sum += stats[0]
            self._shard_sq += stats[1]

    def _extra_fields(self) -> dict:
        return {"shape": list(self.latent_shape), "space": "latent", "encoder": self.encoder.to_manifest(),
                "pixel_shape": list(self.pixel_shape), "moments_shape": list(self.shape),
                "moments_dtype": self.dtype.name, "latent_shape": list(self.latent_shape), "job": self.job}

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


# --- sources: each yields (uint8 (C, H, W), label or None) ------------------------------------------

def as_chw(images: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) with C in {1, 3, 4} or (N, C, H, W) -> uint8 (N, C, H, W).

    Floats must lie in [0, 1] and are rounded to 8 bits."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4:
        raise ConfigError(f"{what}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W); got shape {images.shape}")
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if np.issubdtype(images.dtype, np.floating):
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ConfigError(f"{what}: float images must lie in [0, 1] (or give uint8)")
        return np.round(images * 255).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer) and images.size and images.min() >= 0 and images.max() <= 255:
        return images.astype(np.uint8)
    raise ConfigError(f"{what}: unsupported image dtype {images.dtype}")


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST / Fashion-MNIST format; ``.gz`` allowed) as a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"IDX file {path} does not exist")
    opener = gzip_module.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(f"cannot read IDX file {path}: {err}") from None
    types = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in types:
        raise ConfigError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(types[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise ConfigError(f"{path}: IDX file is truncated or padded ({len(data)} bytes, expected {expected})")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def idx_source(images, labels=None):
    x = as_chw(read_idx(images), str(images))
    y = read_idx(labels).astype(np.int64) if labels else None
    if y is not None and len(y) != len(x):
        raise ConfigError(f"{labels} has {len(y)} labels for {len(x)} images")
    return x, y, None


def arrays_source(images, labels=None, images_key=None, labels_key=None):
    """``.npy`` images (+ optional ``.npy`` labels), or one ``.npz`` holding both."""
    x, y = read_arrays(images, images_key, labels, labels_key, data_keys=("images", "x", "X", "data"),
                       what="images", key_option="--images_key")
    return as_chw(x, str(images)), y, None


def digits_source():
    """scikit-learn's bundled 8x8 digits (values 0..16) scaled to 8-bit pixels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the digits source needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return x, d.target.astype(np.int64), [str(i) for i in range(10)]


def folder_images(root) -> tuple:
    """Image paths and labels: class sub-folders (sorted names -> 0, 1, ...) or a flat folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        items = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).rglob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        items = [(p, None) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return items, (classes or None)


def center_crop(im, resolution: int):
    """A square ``resolution`` crop of a PIL image from its centre, after scaling its short side to
    ``resolution`` (halving with a box filter while it stays at least twice as long, then bicubic):
    the crop of the ADM and EDM2 ImageNet data sets."""
    from PIL import Image

    while min(im.size) >= 2 * resolution:
        im = im.resize(tuple(d // 2 for d in im.size), resample=Image.BOX)
    scale = resolution / min(im.size)
    im = im.resize(tuple(round(d * scale) for d in im.size), resample=Image.BICUBIC)
    left, top = (im.size[0] - resolution) // 2, (im.size[1] - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


def load_image(path, channels: Optional[int], resolution: Optional[int] = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(center_crop(im, resolution) if resolution else im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"cannot read image {path}: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class Source:
    """An indexable image source: ``len``, ``[i] -> (uint8 (C, H, W), label or None)``."""

    def __init__(self, images, labels=None, class_names=None, paths=None, channels=None, resolution=None):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.paths, self.channels, self.resolution = paths, channels, resolution

    def __len__(self):
        return len(self.paths) if self.paths is not None else len(self.images)

    def __getitem__(self, i):
        if self.paths is not None:
            path, label = self.paths[i]
            img = load_image(path, self.channels, self.resolution)
            if self.channels is None:
                self.channels = img.shape[0]
            return img, label
        return self.images[i], (None if self.labels is None else int(self.labels[i]))

    def subset(self, n: int, seed: int = 0) -> "Source":
        """A seeded random ``n`` of this source's images (in their order), with the whole
        source's classes: a reference set that samples every class, where ``limit`` takes the first."""
        if not 0 < n <= len(self):
            raise ConfigError(f"--subset must lie in 1..{len(self)} (the source's images), got {n}")
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        if self.paths is not None:
            sub = Source(None, class_names=self.class_names, paths=[self.paths[i] for i in keep],
                         channels=self.channels, resolution=self.resolution)
        else:
            sub = Source(self.images[keep], None if self.labels is None else self.labels[keep], self.class_names)
        sub.fixed_classes = self.num_classes
        return sub

    @property
    def num_classes(self) -> int:
        if getattr(self, "fixed_classes", None) is not None:
            return self.fixed_classes
        if self.class_names:
            return len(self.class_names)
        if self.labels is not None:
            return int(np.max(self.labels)) + 1
        if self.paths is not None and self.paths[0][1] is not None:
            return max(lbl for _, lbl in self.paths) + 1
        return 0


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
                       max_bytes: int = 64 << 20, gzip: bool = False) -> dict:
    """Encode ``source[indices]`` in batches of ``batch_size`` on ``device`` (default: CUDA when
    available; the encoder is moved there) and write its moments into one shard folder; returns its
    manifest. ``resume``: the folder may hold a complete or interrupted write of the same job, which
    is kept (see the module docstring); otherwise it is cleared of ayf's files first."""
    import torch
    from tqdm.auto import tqdm

    folder, indices = Path(folder), np.asarray(indices, dtype=np.int64)
    pixel_shape = _padded(source, indices[0], pad)[0].shape
    encoder.latent_shape(pixel_shape)  # a size or channel count the encoder cannot take fails here, before any file
    job = {"encoder": encoder.to_manifest(), "latent_dtype": latent_dtype, "pixel_shape": list(pixel_shape),
           "pad": int(pad), "max_bytes": int(max_bytes), "gzip": bool(gzip), "count": int(len(indices)),
           "indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(), "source_count": len(source)}
    if resume and (folder / MANIFEST).is_file() and not (folder / PARTIAL).exists():
        done = read_manifest(folder)
        if done.get("job") != job:
            raise ConfigError(f"{folder} holds a complete shard set of another job: pass --overwrite to start again")
        return done
    resume = resume and (folder / PARTIAL).is_file()
    writer = LatentShardWriter(folder, encoder, pixel_shape, latent_dtype, job, max_bytes=max_bytes, gzip=gzip,
                               overwrite=True, resume=resume)
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
                for j, (img, label) in enumerate(items):
                    writer.write(moments[j], label, (firsts[0][j], firsts[1][j]), image_digest(img, label))
                bar.update(len(items))
    except BaseException:
        writer.abort()
        raise
    return writer.close(source.num_classes, source.class_names, source=desc)


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
        return _write_latent_dataset(source, out, n, val_fraction, seed, pad, overwrite, encoder, latent_dtype,
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


def _write_latent_dataset(source: Source, out: Path, n: int, val_fraction: float, seed: int, pad: int, overwrite: bool,
                          encoder: Encoder, latent_dtype: str, batch_size: int, device, **writer_kw) -> dict:
    if latent_dtype not in LATENT_DTYPES:
        raise ConfigError(f"latent_dtype must be one of {', '.join(LATENT_DTYPES)}; got {latent_dtype!r}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    unknown = set(writer_kw) - {"max_bytes", "gzip"}
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
