"""batching: augmentation as a pure function of (seed, epoch, index), the resumable sampler."""

import numpy as np
import pytest
import torch

from transferlab import batching


@pytest.mark.parametrize("crop", ["pad", "rrc"])
def test_augmentation_is_a_pure_function_of_seed_epoch_index(crop):
    aug = batching.Augment(crop=crop, pad=2, flip=True)
    x = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    a, b, c = (aug.params(10, 8, seed=1, epoch=e) for e in (2, 2, 3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    idx = torch.tensor([3, 7, 0, 9])
    out = aug(x, {k: v[idx] for k, v in a.items()})
    assert out.shape == x.shape and out.dtype == torch.uint8
    # the same index gets the same crop whatever batch it lands in
    one = aug(x[1:2], {k: v[idx[1:2]] for k, v in a.items()})
    assert torch.equal(one[0], out[1])


def test_no_crop_no_flip_is_identity_and_full_box_rrc_is_identity():
    x = torch.randint(0, 255, (3, 8, 8, 1), dtype=torch.uint8)
    plain = batching.Augment(crop="none", flip=False)
    assert torch.equal(plain(x, plain.params(3, 8, 0, 1)), x)
    rrc = batching.Augment(crop="rrc", flip=False)
    full = {"flip": torch.zeros(3, dtype=torch.bool), "box": torch.tensor([[0.0, 0, 8, 8]] * 3)}
    assert torch.equal(rrc(x, full), x)


def test_rrc_boxes_stay_inside_the_image():
    box = batching.Augment(crop="rrc").params(1000, 64, 0, 1)["box"]
    assert (box[:, :2] >= 0).all() and (box[:, 2:] <= 64 + 1e-4).all()
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / 64**2
    assert 0.3 < area.min() and area.max() <= 1.0 + 1e-4


def test_sampler_order_depends_on_seed_and_epoch_and_never_yields_a_batch_of_one():
    s = batching.EpochSampler(33, 8, seed=0, epoch=1, shuffle=True)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(33))
    assert min(len(b) for b in batches) > 1
    assert batches == list(batching.EpochSampler(33, 8, seed=0, epoch=1, shuffle=True))
    assert batches != list(batching.EpochSampler(33, 8, seed=0, epoch=2, shuffle=True))
    assert list(batching.EpochSampler(33, 8, 0, 1, True, start=2)) == batches[2:]
    # hostile pass 38: under 2 processes a last batch of 3 left one rank a single image
    for rank in (0, 1):
        shares = list(batching.EpochSampler(35, 8, 0, 1, True, rank=rank, world=2))
        assert len(shares) == 4 and min(map(len, shares)) >= 2 and sum(map(len, shares)) in (17, 18)
    ordered = list(batching.EpochSampler(33, 8, 0, 1, shuffle=False))
    assert sum(len(b) for b in ordered) == 33  # evaluation counts every image


def test_loader_yields_every_index_with_workers():
    images = np.zeros((20, 4, 4, 1), np.uint8)
    labels = np.arange(20)
    for workers in (0, 2):
        seen = [
            i
            for _, _, idx in batching.loader(images, labels, 6, 0, 1, True, workers)
            for i in idx.tolist()
        ]
        assert sorted(seen) == list(range(20))
