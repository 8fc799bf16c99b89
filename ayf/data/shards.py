"""Writing image datasets as WebDataset shards: size-capped ``.tar`` files (optionally gzipped)
plus a JSON manifest.

Each sample is ``<key>.npy`` (a ``uint8`` array ``(C, H, W)``, stored bit-exactly) and, for
labelled data, ``<key>.cls`` (the class index as ASCII). A shard is written under a ``.tmp``
name and renamed when complete, and ``manifest.json`` is written last: a folder without a
manifest is an interrupted write, and no truncated file ever carries a shard's name.

Manifest fields: ``format``, ``count``, ``shape`` [C, H, W], ``num_classes`` (0: unlabelled),
``class_names``, ``mean``/``std`` per channel in model units ([-1, 1]), ``shards`` (file and
sample count of each) and ``source``.
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

from ayf.data.arrays import read_arrays
from ayf.errors import ConfigError
from ayf.figures import to_model_units, to_uint8  # noqa: F401  (re-exported)

MANIFEST = "manifest.json"
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


class ShardWriter:
    """Streams ``(uint8 image (C, H, W), label or None)`` pairs into capped shards.

    Args:
        folder: output folder (created; must be empty unless ``overwrite``).
        max_bytes: start a new shard once the current one holds this many bytes (uncompressed).
        gzip: write ``.tar.gz`` shards.
        overwrite: replace an existing shard folder's contents.
    """

    def __init__(self, folder, max_bytes: int = 64 << 20, gzip: bool = False, overwrite: bool = False):
        self.folder = Path(folder)
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
        if self._tar is None or self._bytes >= self.max_bytes:
            if self._tar is not None:
                self._finish_shard()
            self._open()
        key = f"{self.count:08d}"
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        self._add(f"{key}.npy", buf.getvalue())
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode())
        x = to_model_units(image.astype(np.float64)).reshape(image.shape[0], -1)
        self._sum += x.mean(1)
        self._sq += (x**2).mean(1)
        self.shards[-1]["count"] += 1
        self.count += 1

    def close(self, num_classes: int = 0, class_names: Optional[Sequence[str]] = None, source: str = "") -> dict:
        """Finish the last shard and write the manifest (which marks the folder complete)."""
        if self.count == 0:
            raise ConfigError("no images to write")
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
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.folder / MANIFEST)
        return manifest

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


def load_image(path, channels: Optional[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ConfigError(f"cannot read image {path}: {err}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class Source:
    """An indexable image source: ``len``, ``[i] -> (uint8 (C, H, W), label or None)``."""

    def __init__(self, images, labels=None, class_names=None, paths=None, channels=None):
        self.images, self.labels, self.class_names = images, labels, class_names
        self.paths, self.channels = paths, channels

    def __len__(self):
        return len(self.paths) if self.paths is not None else len(self.images)

    def __getitem__(self, i):
        if self.paths is not None:
            path, label = self.paths[i]
            img = load_image(path, self.channels)
            if self.channels is None:
                self.channels = img.shape[0]
            return img, label
        return self.images[i], (None if self.labels is None else int(self.labels[i]))

    @property
    def num_classes(self) -> int:
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


def write_dataset(source: Source, out, val_fraction: float = 0.0, seed: int = 0, pad: int = 0,
                  limit: Optional[int] = None, overwrite: bool = False, **writer_kw) -> dict:
    """Write a whole source: into ``out`` or, with ``val_fraction``, into ``out/train`` and
    ``out/val`` (a seeded random split). Returns ``{split name: manifest}``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    out = Path(out)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ConfigError("the source holds no images")
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
