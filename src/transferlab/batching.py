"""Training batches from a decoded uint8 array: augmentation on whole batches (its randomness a
pure function of seed, epoch and index), normalisation, and a sampler whose order is a pure
function of (seed, epoch) with a skip offset — what makes resume exact."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import UserError
from .shards import ShardImages


@dataclass(frozen=True)
class Augment:
    """Batched training augmentation of uint8 images; randomness from (seed, epoch, index)."""

    crop: str = "pad"  # pad (random crop with reflect padding) | rrc (random-resized-crop) | none
    pad: int = 4  # padding in pixels for crop="pad"
    flip: bool = True  # random horizontal flip
    scale: tuple[float, float] = (0.35, 1.0)  # area fraction range for crop="rrc"
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range for crop="rrc"

    def params(self, n: int, size: int, seed: int, epoch: int) -> dict[str, torch.Tensor]:
        """Per-index parameters for one epoch: index them with a batch's sample indices."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out = {"flip": torch.rand(n, generator=g) < 0.5}
        if self.crop == "pad":
            out["dy"], out["dx"] = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
        elif self.crop == "rrc":
            area = size * size * torch.empty(n).uniform_(*self.scale, generator=g)
            log_r = torch.empty(n).uniform_(
                math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g
            )
            w = (area * log_r.exp()).sqrt().clamp(max=size)
            h = (area / log_r.exp()).sqrt().clamp(max=size)
            x0 = torch.rand(n, generator=g) * (size - w)
            y0 = torch.rand(n, generator=g) * (size - h)
            out["box"] = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)  # (N, 4) pixels
        return out

    def __call__(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment a uint8 batch (B, H, W, C) with its samples' parameters `p`."""
        b, h, w, _ = x.shape
        p = {k: v.to(x.device) for k, v in p.items()}
        if self.crop == "pad" and self.pad > 0:
            x = torch.nn.functional.pad(
                x.permute(0, 3, 1, 2).float(), (self.pad,) * 4, mode="reflect"
            )
            x = x.permute(0, 2, 3, 1).to(torch.uint8)  # (B, H+2p, W+2p, C)
            rows = p["dy"][:, None] + torch.arange(h, device=x.device)  # (B, H)
            cols = p["dx"][:, None] + torch.arange(w, device=x.device)  # (B, W)
            batch = torch.arange(b, device=x.device)[:, None, None]
            x = x[batch, rows[:, :, None], cols[:, None, :]]
        elif self.crop == "rrc":
            from torchvision.ops import roi_align

            index = torch.arange(b, dtype=torch.float32, device=x.device)[:, None]
            boxes = torch.cat([index, p["box"]], dim=1)
            crops = roi_align(
                x.permute(0, 3, 1, 2).float(),
                boxes,
                output_size=(h, w),
                spatial_scale=1.0,
                sampling_ratio=1,
                aligned=True,
            )  # (B, C, H, W)
            x = crops.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        if self.flip:
            x = torch.where(p["flip"][:, None, None, None], x.flip(2), x)
        return x.contiguous()


def normalize(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in channels_last memory, normalised."""
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


class EpochSampler(torch.utils.data.Sampler):
    """Yields batches of indices whose order is a pure function of (seed, epoch).

    `start` skips the first batches (mid-epoch resume). A last batch of one sample is merged
    into the previous batch, since BatchNorm cannot train on a single sample (under
    DistributedDataParallel, one of fewer than 2 x `world`: rank r of `world` takes the r-th
    stride of every global batch).
    `groups` (each sample's WebDataset shard): the shards in a shuffled order, each shard's
    samples shuffled within it, so that reads stay in one shard at a time.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        groups: np.ndarray | None = None,
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.shuffle, self.start, self.rank, self.world = shuffle, start, rank, world
        self.groups = groups

    def batches(self) -> list[torch.Tensor]:
        """The global batches of this epoch (every rank's samples)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if not self.shuffle:
            order = torch.arange(self.n)
        elif self.groups is None:
            order = torch.randperm(self.n, generator=g)
        else:
            by_group = torch.from_numpy(np.argsort(self.groups, kind="stable"))
            parts = by_group.split(np.bincount(self.groups).tolist())
            shuffled = [parts[i][torch.randperm(len(parts[i]), generator=g)]
                        for i in torch.randperm(len(parts), generator=g).tolist()]  # fmt: skip
            order = torch.cat(shuffled)
        out = list(order.split(self.batch_size))
        if self.shuffle and len(out) > 1 and len(out[-1]) < 2 * self.world:
            out[-2] = torch.cat(out[-2:])
            out.pop()
        return out

    def __iter__(self):
        yield from (b[self.rank :: self.world].tolist() for b in self.batches()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start)


class ArrayDataset(torch.utils.data.Dataset):
    """Indexable by a list of indices: returns (uint8 images, labels, indices) for a batch.

    `images` may be a read-only memmap of the decode cache: only the batch is read into memory.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, torch.from_numpy(np.asarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]):
        i = np.asarray(idx, dtype=np.int64)
        if isinstance(self.images, torch.Tensor):  # resident on the GPU: index it there
            batch = self.images[torch.from_numpy(i).to(self.images.device)]
        elif isinstance(self.images, ShardImages) and self.images.device is not None:
            batch = self.images[i].tensor()  # shards decoded on the GPU (nvJPEG)
        else:  # a memmap's rows or a lazy view's decoded batch (shards.ShardImages)
            try:
                batch = torch.from_numpy(np.asarray(self.images[i]))
            except UserError as err:  # returned, so a worker's is raised as it is (_Loader)
                return err
        return batch, self.labels[i], torch.from_numpy(i)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader that raises a batch's UserError (an unreadable image in a shard) as itself,
    not wrapped in a worker's traceback."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, UserError):
                raise batch
            yield batch


def loader(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    num_workers: int = 0,
    start: int = 0,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a decoded split, with its own generator (no global RNG use)."""
    groups = getattr(images, "groups", None)  # sharded: shard by shard
    sampler = EpochSampler(
        len(labels), batch_size, seed, epoch, shuffle, start, rank, world, groups
    )
    return _Loader(
        ArrayDataset(images, labels),
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
