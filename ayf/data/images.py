"""ImageShards: a LightningDataModule over WebDataset shards written by ``ayf shards``.

Samples decode to ``{"x": float (C, H, W) in [-1, 1], "label": int64}`` (no label for unlabelled
data). Latent shards (``ayf shards ... --vae``) decode to float latents of the manifest's latent
shape, drawn by the shard set's encoder from the stored moments (for a VAE storing its posterior, a
fresh ``mean + std * eps`` each time an example is read, from a generator seeded like the
shuffle); ``data_shape`` is then the latent shape and ``encoder`` decodes latents to pixels.
Training streams resampled shards (every worker and rank draws its own shard sequence)
through a shuffle buffer, with a fixed epoch length. The training order is a function of the seed,
the epoch, the rank and the worker, so a run repeats exactly (``seed=None``: random per run).
Validation and test read each sample once,
split over ranks (by shard) and then dataloader workers (by shard). A corrupt sample or shard is
skipped, logged and counted, never fatal.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
import webdataset as wds

from ayf.data.loaders import ResumableLoader, device_batch
from ayf.data.shards import LATENT_DTYPES, MANIFEST, encoder_of, read_manifest, to_model_units
from ayf.encoders import Encoder, read_vae_config
from ayf.errors import ConfigError

log = logging.getLogger("ayf.data")


def same_space(encoder: Encoder) -> dict:
    """What two shard sets must share to be read together: their encoder's record, less the VAE's
    folder (the same VAE may lie in another place)."""
    return {k: v for k, v in encoder.to_manifest().items() if k != "folder"}


class SkipCounter:
    """webdataset error handler: logs the error, counts it, and lets the stream continue."""

    def __init__(self):
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipped corrupt sample (%d so far): %s", self.count, exn)
        return True


class ShardSource:
    """Where a split lives: shard URLs plus the manifest.

    ``spec`` is a shard folder, a ``manifest.json`` path, or a webdataset URL pattern such as
    ``https://host/data/shard-{000000..000009}.tar`` or ``pipe:...``; a pattern needs
    ``manifest.json`` beside its first shard (read with webdataset's ``gopen``).
    """

    def __init__(self, spec: str):
        if not spec or not str(spec).strip():
            raise ConfigError("empty shard path")
        spec = str(spec)
        local = Path(spec)
        if local.is_dir() or local.name == MANIFEST:
            self.manifest = read_manifest(local)
            folder = local if local.is_dir() else local.parent
            self.urls = [str(folder / s["file"]) for s in self.manifest["shards"]]
            self.folder: Optional[Path] = folder
            missing = [u for u in self.urls if not Path(u).is_file()]
            if missing:
                raise ConfigError(f"shard {missing[0]} listed in {folder / MANIFEST} is missing")
        else:
            self.urls = list(wds.shardlists.expand_urls(spec))  # braces and "::"-joined lists
            is_local = "://" not in spec and not spec.startswith("pipe:")
            if is_local and not any(Path(u).exists() for u in self.urls):
                raise ConfigError(f"shard path {spec} does not exist")
            base = self.urls[0].rsplit("/", 1)[0] if "/" in self.urls[0] else "."
            try:
                with wds.gopen(f"{base}/{MANIFEST}", "rb") as fh:
                    self.manifest = json.loads(fh.read())
            except Exception as err:  # noqa: BLE001 - any transport error means the same to the user
                raise ConfigError(f"cannot read {base}/{MANIFEST} for {spec}: {err}") from None
            self.folder = Path(base) if is_local else None
        if self.manifest.get("count", 0) <= 0:
            raise ConfigError(f"shard set {spec} is empty")
        self.spec = spec
        self.encoder: Encoder = encoder_of(self.manifest)  # the identity for pixel shards
        if self.space == "latent":
            m = self.manifest
            if m.get("moments_dtype") not in LATENT_DTYPES or not isinstance(m.get("pixel_shape"), list):
                raise ConfigError(f"the latent shard manifest of {spec} lacks moments_dtype or pixel_shape")
            shapes = (self.encoder.moments_shape(m["pixel_shape"]), self.encoder.latent_shape(m["pixel_shape"]))
            if shapes != (tuple(m.get("moments_shape") or ()), self.shape):
                raise ConfigError(f"the latent shard manifest of {spec} gives moments {m.get('moments_shape')} and shape "
                                  f"{m['shape']}; its encoder makes {list(shapes[0])} and {list(shapes[1])}")

    @property
    def shape(self) -> tuple:
        """The shape of one example as the model sees it (latent shards: the latent shape)."""
        return tuple(self.manifest["shape"])

    @property
    def space(self) -> str:
        """``"pixels"`` or ``"latent"``."""
        return self.manifest.get("space", "pixels")

    @property
    def num_classes(self) -> int:
        return int(self.manifest.get("num_classes") or 0)

    def __len__(self) -> int:
        return int(self.manifest["count"])


class _Latents:
    """Reads a latent sample: checks the stored moments and draws latents from them with the
    encoder, from a generator made in the process (dataloader worker) that first needs it, seeded by
    ``seed`` and the worker (``seed=None``: fresh entropy)."""

    def __init__(self, source: ShardSource, seed: Optional[int]):
        self.encoder, self.seed = source.encoder, seed
        self.shape = tuple(source.manifest["moments_shape"])
        self.dtype = np.dtype(source.manifest["moments_dtype"])
        self._gen = None

    def __getstate__(self):
        return {**self.__dict__, "_gen": None}

    def __call__(self, arr: np.ndarray, raw: bool, where: str) -> torch.Tensor:
        if arr.dtype != self.dtype or tuple(arr.shape) != self.shape:
            raise ValueError(f"{where}: moments {arr.dtype} {arr.shape}, manifest says {self.dtype} {self.shape}")
        moments = torch.from_numpy(arr.copy())
        if raw:
            return moments
        if self._gen is None:
            info = torch.utils.data.get_worker_info()
            seed = (wds.utils.make_seed(self.seed, info.id if info is not None else 0) if self.seed is not None
                    else int.from_bytes(os.urandom(8), "little") >> 1)
            self._gen = torch.Generator().manual_seed(seed)
        return self.encoder.sample(moments.float(), generator=self._gen)


#: a prompt's fields in caption shards (``<key>.text.npy`` ...), as :class:`ayf.nn.Cond` names them
TEXT_FIELDS = ("text", "text_mask", "pooled")


def _decoder(shape: tuple, labelled: bool, raw: bool, latents: Optional[_Latents] = None):
    def decode(sample):
        if "npy" not in sample:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no .npy image")
        img = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        if latents is not None:
            out = {"x": latents(img, raw, f"sample {sample.get('__key__')} in {sample.get('__url__')}")}
            if labelled:
                out["label"] = torch.tensor(int(sample["cls"]), dtype=torch.long)
            for name in TEXT_FIELDS:  # caption shards: the prompt's embeddings
                if f"{name}.npy" in sample:
                    value = torch.from_numpy(np.load(io.BytesIO(sample[f"{name}.npy"]), allow_pickle=False))
                    out[name] = value if name == "text_mask" else value.float()
            return out
        if img.dtype != np.uint8 or tuple(img.shape) != shape:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')}: "
                             f"image {img.dtype} {img.shape}, manifest says uint8 {shape}")
        x = torch.from_numpy(img.copy())
        out = {"x": x if raw else to_model_units(x.float())}
        if labelled:
            out["label"] = torch.tensor(int(sample["cls"]), dtype=torch.long)
        return out
    return decode


def split_by_rank(rank: int, world_size: int):
    """Pipeline stage: keep every ``world_size``-th item (shard or sample) starting at ``rank``."""
    def stage(src):
        return itertools.islice(src, rank, None, world_size)
    return stage


def split_samples(rank: int, world_size: int):
    """Pipeline stage: keep every (ranks x workers)-th sample, starting at this rank's and worker's
    slot (the worker is known only inside the worker process, when the stage runs)."""
    def stage(src):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return itertools.islice(src, rank * workers + worker, None, world_size * workers)
    return stage


def sample_pipeline(
    source: ShardSource,
    resampled: bool = False,
    shuffle_buffer: int = 0,
    epoch_samples: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    seed: Optional[int] = 0,
    raw: bool = False,
    counter: Optional[SkipCounter] = None,
    epoch: int = 0,
    split: str = "shards",
) -> wds.DataPipeline:
    """Iterable of decoded samples.

    Without resampling, one pass yields every sample exactly once over all ranks and dataloader
    workers. ``split="shards"`` deals the shards out over ranks, then over workers (a rank or
    worker without a shard yields nothing); ``split="samples"`` has each of them read every
    shard and keep every (ranks x workers)-th sample, so that no rank is left without data even
    when there are fewer shards than ranks (evaluation sets, which are small). With
    resampling, ``epoch_samples`` is the number of samples per rank per epoch, divided over the
    dataloader workers. ``raw``: uint8 pixels, or for latent shards the stored moments (float16
    or float32, as written), instead of model units.

    The shard draws and the shuffle are seeded by ``(seed, epoch, rank, worker)``: the same
    arguments give the same order, and each epoch, rank and worker gets its own. ``seed=None``
    draws fresh randomness instead. So are the draws of latents from a latent shard's moments."""
    handler = counter or SkipCounter()
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    stream_seed = None if seed is None else wds.utils.make_seed(seed, epoch, rank, worker)
    if resampled:
        stages = [wds.ResampledShards(source.urls, seed=stream_seed or 0, deterministic=seed is not None)]
    elif split == "samples":
        stages = [wds.SimpleShardList(source.urls), wds.tarfile_to_samples(handler=handler),
                  split_samples(rank, world_size)]
    else:
        stages = [wds.SimpleShardList(source.urls), split_by_rank(rank, world_size), wds.split_by_worker]
    if resampled or split != "samples":
        stages.append(wds.tarfile_to_samples(handler=handler))
    if shuffle_buffer > 1:
        shuffle_seed = None if seed is None else wds.utils.make_seed(stream_seed, 1)
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=shuffle_seed))
    latents = None
    if source.space == "latent":
        latents = _Latents(source, None if seed is None else wds.utils.make_seed(stream_seed, 2))
    stages.append(wds.map(_decoder(source.shape, source.num_classes > 0, raw, latents), handler=handler))
    pipe = wds.DataPipeline(*stages)
    if resampled:
        if not epoch_samples:
            raise ConfigError("resampled shards need an epoch length")
        pipe = pipe.with_epoch(_per_worker(epoch_samples))
    return pipe


def _per_worker(n: int) -> int:
    info = torch.utils.data.get_worker_info()
    workers = info.num_workers if info is not None else 1
    return max(1, -(-n // workers))


class _EpochSized(torch.utils.data.IterableDataset):
    """A pipeline built lazily inside each worker (so worker info is known), with a length in
    samples (the epoch length, for progress bars and Lightning's epoch bookkeeping).

    ``build(epoch)`` makes one epoch's pipeline. ``epoch`` counts up by one per pass; the
    loader sets it from the trainer before each pass (workers that persist keep counting)."""

    def __init__(self, build, length: Optional[int] = None):
        self.build, self.length, self.epoch = build, length, 0

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.build(epoch))

    def __len__(self):
        if self.length is None:
            raise TypeError("no length")
        return self.length


class _EpochLoader(ResumableLoader):
    """A ResumableLoader that tells its ``_EpochSized`` dataset which pass starts (in the main
    process), so a resumed run continues the same order from the same batch."""

    def prepare_epoch(self, epoch: int) -> None:
        super().prepare_epoch(epoch)
        self.dataset.epoch = epoch


class ImageShards(L.LightningDataModule):
    """Images from WebDataset shards (see ``ayf shards``).

    Args:
        train: training shards: a folder written by ``ayf shards``, its manifest.json, or a
            webdataset URL pattern (``.../shard-{000000..000003}.tar``) with manifest.json beside it.
        val: validation shards (same forms); default: none.
        test: test shards; default: the validation shards, else the training shards.
        batch_size: images per batch (per device).
        global_batch_size: the batch over all devices (and accumulated batches) instead: each device's
            ``batch_size`` becomes its share, and it must split evenly (``ayf fit`` checks it first).
        epoch_length: training samples per epoch per device (default: the training set size).
        resampled: draw training shards with replacement (infinite stream cut into epochs);
            False reads each training sample once per epoch instead.
        shuffle_buffer: size of the sample shuffle buffer for training (0 or 1: no shuffling).
        num_workers: dataloader worker processes.
        seed: seeds the training order (shard draws and shuffle, per epoch, rank and worker), so
            a run repeats exactly and a resumed run picks up the same order at its epoch;
            null: a fresh random order every run.
    """

    def __init__(
        self,
        train: str,
        val: Optional[str] = None,
        test: Optional[str] = None,
        batch_size: int = 128,
        epoch_length: Optional[int] = None,
        resampled: bool = True,
        shuffle_buffer: int = 2000,
        num_workers: int = 0,
        seed: Optional[int] = 0,
        global_batch_size: Optional[int] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.train_source = ShardSource(train)
        self.val_source = ShardSource(val) if val else None
        self.test_source = ShardSource(test) if test else (self.val_source or self.train_source)
        for src in (self.val_source, self.test_source):
            if src is not None and (src.shape, src.num_classes) != (self.train_source.shape, self.train_source.num_classes):
                raise ConfigError(f"{src.spec} (shape {src.shape}, {src.num_classes} classes) does not match the "
                                  f"training shards (shape {self.train_source.shape}, {self.train_source.num_classes} classes)")
            if src is not None and same_space(src.encoder) != same_space(self.train_source.encoder):
                raise ConfigError(f"{src.spec} ({src.encoder.describe()}) is not in the space of the training shards "
                                  f"({self.train_source.encoder.describe()})")
        if self.train_source.encoder.kind == "vae":  # grids, FD, --decode and exports decode through it
            try:
                read_vae_config(self.train_source.encoder.folder)
            except ConfigError as err:
                raise ConfigError(f"the VAE of the latent shards {train}: {err} (their manifest.json names it in "
                                  "encoder.folder)") from None
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.global_batch_size = global_batch_size
        self.epoch_length = epoch_length or len(self.train_source)
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.skipped = SkipCounter()

    @property
    def data_shape(self) -> tuple:
        """The shape of one example as the model sees it (latent shards: the latent shape)."""
        return self.train_source.shape

    @property
    def encoder(self) -> Encoder:
        """The data's encoder: ``encoder.decode(x)`` turns model-space samples into pixels in model
        units (the identity for pixel shards)."""
        return self.train_source.encoder

    @property
    def num_classes(self) -> int:
        return self.train_source.num_classes

    def _rank(self):
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _loader(self, source: ShardSource, train: bool):
        rank, world = self._rank()
        if train and self.resampled:
            build = lambda epoch: sample_pipeline(  # noqa: E731
                source, True, self.shuffle_buffer, self.epoch_length, rank, world, self.seed,
                counter=self.skipped, epoch=epoch)
            length = self.epoch_length  # samples; DataLoader divides by the batch size
        else:
            build = lambda epoch: sample_pipeline(  # noqa: E731
                source, False, self.shuffle_buffer if train else 0, rank=rank, world_size=world, seed=self.seed,
                counter=self.skipped, epoch=epoch, split="shards" if train else "samples")
            length = None
        return _EpochLoader(
            _EpochSized(build, length), batch_size=device_batch(self), num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, seed=self.seed or 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_source, True)

    def val_dataloader(self):
        return self._loader(self.val_source, False) if self.val_source is not None else []

    def test_dataloader(self):
        return self._loader(self.test_source, False)

    def validation_examples(self, n: int) -> dict:
        """The first ``n`` validation samples (model units), in order and whole on every rank: the
        fixed examples of a report that must not depend on the number of processes."""
        xs, ys = [], []
        for sample in sample_pipeline(self.val_source or self.train_source, counter=self.skipped):
            xs.append(sample["x"])
            if "label" in sample:
                ys.append(sample["label"])
            if len(xs) >= n:
                break
        return {"x": torch.stack(xs), **({"label": torch.stack(ys)} if ys else {})}

    def reference_source(self, spec: Optional[str] = None) -> ShardSource:
        """The shards FD / KID / precision / recall compare against: ``spec`` (a folder of pixel
        shards, e.g. the images a latent data set was encoded from) or the training shards."""
        if spec is None:
            return self.train_source
        source = ShardSource(spec)
        if source.space != "pixels":
            raise ConfigError(f"the reference {spec} holds latents; give pixel shards (ayf shards without --vae)")
        return source

    def reference_images(self, limit: Optional[int] = None, source: Optional[ShardSource] = None):
        """uint8 ``(N, C, H, W)`` images (and labels or None) read once, in order: the real
        data that FD / KID / precision / recall compare against (default: training shards).
        Latent shards hold no pixels: for them this gives the stored moments (float16 or float32,
        as written); decode them with ``encoder.decode(encoder.mode(moments))``."""
        source = source or self.train_source
        xs, ys = [], []
        for sample in sample_pipeline(source, raw=True, counter=self.skipped):
            xs.append(sample["x"])
            if "label" in sample:
                ys.append(sample["label"])
            if limit is not None and len(xs) >= limit:
                break
        return torch.stack(xs), (torch.stack(ys) if ys else None)

