"""Image sources for the shard writers: arrays, IDX files, scikit-learn's digits and folders of
image files, each an indexable :class:`Source` of ``(uint8 (C, H, W), label or None)``."""
from __future__ import annotations

import gzip as gzip_module
from pathlib import Path
from typing import Optional

import numpy as np

from ayf.data.arrays import read_arrays
from ayf.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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




def caption_records(spec) -> tuple:
    """``(records, skipped)`` of an image-caption list: a JSONL file of ``{"image": path, "caption":
    text}`` (and optionally ``"label"``: an int), or a folder holding ``captions.jsonl``. Paths are
    relative to the list's folder. A record whose line does not parse, lacks a field, or whose image
    is missing or unreadable is skipped: ``skipped`` is ``(count, the first one's reason)``."""
    import json

    from PIL import Image

    spec = Path(spec)
    file = spec / "captions.jsonl" if spec.is_dir() else spec
    if not file.is_file():
        raise ConfigError(f"no caption list at {file}: give a JSONL file of {{\"image\": ..., \"caption\": ...}} "
                          "lines, or a folder with captions.jsonl", missing=str(file))
    records, bad, first = [], 0, None
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, text = rec["image"], rec["caption"]
            if not isinstance(text, str) or not isinstance(image, str):
                raise ValueError("image and caption must be strings")
            path = (file.parent / image).resolve()
            with Image.open(path) as im:
                im.verify()
            label = rec.get("label")
            records.append((str(path), text, None if label is None else int(label)))
        except (OSError, ValueError, KeyError, TypeError) as err:
            bad += 1
            first = first or f"{file.name} line {n}: {type(err).__name__}: {err}"
    if not records:
        raise ConfigError(f"{file}: no usable image-caption record" + (f" ({first})" if first else ""))
    labelled = {label is not None for _, _, label in records}
    if len(labelled) > 1:
        raise ConfigError(f"{file}: either every record has a label or none has")
    return records, (bad, first)


class CaptionSource(Source):
    """Images with captions (:func:`caption_records`): ``[i] -> (uint8 (C, H, W), label or None)``
    and :meth:`caption` ``(i) -> str``."""

    def __init__(self, records, channels: Optional[int] = None, resolution: Optional[int] = None):
        super().__init__(None, paths=[(path, label) for path, _, label in records], channels=channels,
                         resolution=resolution)
        self.captions = [text for _, text, _ in records]

    def caption(self, i: int) -> str:
        return self.captions[int(i)]

    def subset(self, n: int, seed: int = 0) -> "CaptionSource":
        keep = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return CaptionSource([(self.paths[i][0], self.captions[i], self.paths[i][1]) for i in keep],
                             self.channels, self.resolution)
