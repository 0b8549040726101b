"""A run's setup parts, in the order the trainer calls them: the data (datasets, loaders,
image size, the validation source) and the model (built, whitened, initialised).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vggkit.config import IMAGENET_INIT, TrainConfig
from vggkit.errors import UsageError
from vggkit.models import (
    count_parameters,
    create_model,
    get_architecture,
    load_matching,
    read_state_dict,
)
from vggkit.models.pretrained import imagenet_mean_std, imagenet_weights, load_imagenet
from vggkit.models.vgg import init_whitening
from vggkit.models.weights import remap_stagewise, without_last_layer
from vggkit.training import distributed as D
from vggkit.training.checkpoint import check_loadable, find_checkpoint, load_checkpoint
from vggkit.training.engine import Engine

log = logging.getLogger("vggkit.train")


@dataclass
class Data:
    """The prepared dataset and its loaders. ``per_epoch`` is what each epoch is evaluated
    on, sharded across processes: the validation split, or with ``--val-split 0`` the test
    split (monitoring only). ``test`` is the whole test split, for the final test."""

    dataset: Any
    image_size: int
    mean: list[float]
    std: list[float]
    train: Any
    per_epoch: Any
    test: Any
    has_val: bool
    val_source: str
    photo: dict[str, Any] | None = None  # photo folders: the stored side and the eval crop
    bn_stats: Any = None  # --precise-bn: its fixed training images, as evaluation sees them
    bn_loader: Callable[[int], Any] | None = None  # N such images (the health probe's)

    @property
    def channels(self) -> int:
        return int(self.dataset.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)


def resolve_image_size(config: TrainConfig, native: int) -> int:
    """The dataset's side raised to at least 32 (the CIFAR size VGG recipes use) and to a
    multiple the model's poolings divide: digits 8 -> 32, MNIST 28 -> 32, 224 stays."""
    if config.image_size:
        return config.image_size
    arch = get_architecture(config.model)
    side = max(native, 32)
    if (config.head or arch.default_head) == "imagenet":
        return side
    factor = 2 ** arch.num_pools
    return math.ceil(side / factor) * factor


def load_data(config: TrainConfig, engine: Engine, dist: D.DistInfo, progress: bool) -> Data:
    """Each node's local rank 0 decodes (or downloads) first, so that happens once a node,
    while the others wait without the collectives' timeout; then every rank loads the
    prepared copy from the node's cache at the image size the model needs."""
    from vggkit.data import Augment, Loader, load_dataset
    from vggkit.data.store import sample_positions
    from vggkit.data.crops import native_side, photo_crops
    from vggkit.data.sources.folder import MAX_COMMON_SIDE

    args = dict(data_dir=config.data_dir, download_url=config.download_url,
                channels=config.channels, subset=config.subset, val_split=config.val_split,
                seed=config.seed, skip_bad_images=config.skip_bad_images,
                photos=True if config.random_resized_crop or config.stored_size else None,
                stored_size=config.stored_size)
    preparer = dist.local_rank == 0
    group = D.data_wait_group(dist)
    first = config.image_size or None
    probe = load_dataset(config.dataset, download=config.download and preparer,
                         progress=progress and dist.is_main, image_size=first,
                         **args) if preparer else None
    D.wait_for_data(dist, group)
    native, photos, shape = D.broadcast_object(
        (*native_side(probe), tuple(probe.x_train.shape[-2:])) if probe is not None else None,
        dist)
    image_size = resolve_image_size(config, native)
    if not photos and shape[0] != shape[1] and not config.image_size and dist.is_main:
        log.warning("%s: every image is %dx%d, not square; training at %dx%d (the shorter "
                    "side, at most %d, fitted to the model): pass --image-size to choose",
                    config.dataset, shape[1], shape[0], image_size, image_size, MAX_COMMON_SIDE)
    size = first if photos or shape == (image_size, image_size) else image_size
    if size != first:  # resized once a node, by its preparer, while the others wait
        if preparer:
            probe = load_dataset(config.dataset, download=False, progress=False,
                                 image_size=size, **args)
        D.wait_for_data(dist, group)
    D.release_data_group(dist, group)
    dataset = probe if preparer else load_dataset(config.dataset, download=False, progress=False,
                                                  image_size=size, **args)
    channels = dataset.x_train.shape[1]
    mean, std = ((list(dataset.mean), list(dataset.std)) if config.normalize == "meanstd"
                 else imagenet_mean_std(channels) if config.normalize == "imagenet"
                 else ([0.0] * channels, [1.0] * channels))
    common = dict(mean=mean, std=std, device=engine.device, channels_last=engine.channels_last,
                  placement=config.data_placement)
    train_crop, eval_crop = photo_crops(config, image_size) if photos else (None, None)
    augment = Augment(crop_padding=config.crop_padding, pad_mode=config.pad_mode,
                      flip=config.flip, cutout=config.cutout,
                      auto_augment=config.auto_augment or "")
    train = Loader(dataset.x_train, dataset.y_train, config.batch_size, shuffle=True,
                   seed=config.seed, augment=augment, rank=dist.rank,
                   world_size=dist.world_size, drop_last=config.drop_last, photo=train_crop,
                   balanced=config.balanced_sampling, **common)
    if dist.is_main:
        log.info("data: %s", train.describe())
    if len(train) == 0:
        raise UsageError(f"--batch-size {config.batch_size}: no full batch in "
                         f"{len(dataset.x_train)} training images")
    has_val = dataset.x_val is not None and len(dataset.x_val) > 0
    # Per-epoch evaluation is sharded across processes: the validation split, or with
    # --val-split 0 the test split, recorded for monitoring and never acted on.
    split = (dataset.x_val, dataset.y_val) if has_val else (dataset.x_test, dataset.y_test)
    per_epoch = Loader(*split, config.eval_batch_size, shuffle=False, rank=dist.rank,
                       world_size=dist.world_size, photo=eval_crop, **common)
    test = Loader(dataset.x_test, dataset.y_test, config.eval_batch_size, shuffle=False,
                  photo=eval_crop, **common)
    photo_meta = {"stored_side": dataset.x_train.shape[-1], "crop_pct": config.crop_pct} if photos else None

    def bn_loader(count: int) -> Loader:
        """--precise-bn's images (and the health probe's): ``count`` fixed training images,
        sharded, as evaluation sees them."""
        pos = sample_positions(len(dataset.y_train), count, config.seed)  # numpy: either store
        return Loader(dataset.x_train[pos], dataset.y_train[pos],
                      config.batch_size, shuffle=False, rank=dist.rank,
                      world_size=dist.world_size, photo=eval_crop, **common)

    return Data(dataset, image_size, mean, std, train, per_epoch, test, has_val,
                describe_val_source(config, dataset, has_val), photo_meta,
                bn_loader(config.precise_bn) if config.precise_bn else None, bn_loader)


def describe_val_source(config: TrainConfig, dataset: Any, has_val: bool) -> str:
    if not has_val:
        return ("none: trained on all training images (--val-split 0); nothing is selected, "
                "the per-epoch test curve is for monitoring only")
    how = "the dataset's default" if config.val_split is None else f"--val-split {config.val_split:g}"
    return (f"train holdout: {len(dataset.x_val):,} training images, stratified, seed "
            f"{config.seed} ({how})")


def build_model(config: TrainConfig, data: Data, engine: Engine, dist: D.DistInfo,
                fresh: bool) -> tuple[nn.Module, dict[str, int]]:
    """The network on its device; a fresh run also takes its whitening stem from the data
    and --init-from's weights (a resume loads its own)."""
    arch = get_architecture(config.model)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=data.num_classes, in_channels=data.channels,
                         input_size=data.image_size, head=config.head or arch.default_head,
                         dropout=config.dropout)
    if arch.whiten_kernel and data.photo is not None:
        raise UsageError(f"--model {config.model}: its whitening stem is set from images held in "
                         "memory at one size; photo folders are not supported")
    if arch.whiten_kernel and fresh:
        whiten_from_data(model, data.dataset.x_train, data.mean, data.std)
    if arch.whiten_kernel and config.whiten_bias_epochs is not None and dist.enabled:
        raise UsageError("--whiten-bias-epochs freezes a parameter mid-run, which "
                         "DistributedDataParallel does not allow; leave it unset under torchrun")
    if config.init_from and fresh:
        load_init_weights(config, model, data.dataset.classes)
    params = count_parameters(model)
    model = engine.prepare(model)
    if config.sync_bn and engine.device.type != "cuda":
        raise UsageError(f"--sync-bn: SyncBatchNorm needs CUDA devices (torchrun on GPUs), not "
                         f"{engine.device.type}; leave it off here (each process keeps its own "
                         "BatchNorm statistics)")
    if dist.enabled and config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, params


def whiten_from_data(model: nn.Module, images: torch.Tensor, mean, std,
                     count: int = 5000) -> None:
    """Set the model's whitening stem from the first ``count`` training images, normalised
    as the loader normalises them (airbench uses 5,000)."""
    x = images[:count].to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    init_whitening(model.features[0], (x - m) / s)


def load_init_weights(config: TrainConfig, model: nn.Module, classes: list[str] | None = None) -> None:
    """--init-from: another run's or checkpoint's matching layers (a run gives its best
    checkpoint, chosen on validation), or a torchvision-layout weights file; ``imagenet``:
    torchvision's ImageNet weights for --model (a resume never gets here: it has its own)."""
    if config.init_from == IMAGENET_INIT:
        path = imagenet_weights(config.model, download=config.download,
                                download_url=config.download_url)
        log.info("--init-from imagenet: %s", load_imagenet(model, path, partial=config.partial))
        return
    source = Path(config.init_from)
    if source.is_dir() or (source.suffix == ".safetensors" and check_loadable(source)):
        ckpt = load_checkpoint(find_checkpoint(source, "best"))
        state = ckpt.model_state
        src_arch = get_architecture(ckpt.meta["model"]["name"])
        dst_arch = get_architecture(config.model)
        if src_arch.config != dst_arch.config:
            state = remap_stagewise(state, src_arch, dst_arch)
        if classes is not None and list(ckpt.meta["classes"]) != list(classes):
            state = without_last_layer(state, model)  # other classes: a fresh last layer
        report = load_matching(model, state, partial=True, only_features=False,
                               source=f"--init-from {source}")
    else:
        state = read_state_dict(source)
        report = load_matching(model, state, partial=config.partial,
                               source=f"--init-from {source}")
    log.info("--init-from %s: %s", source, report)
