"""linear: the L2 logistic regression shared by probes, stacking and fusion."""

import numpy as np
import torch

from transferlab import linear
from transferlab import probe as probing


def test_probe_strength_is_cross_validated_on_train_and_never_looks_at_val(monkeypatch):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    w0, b0 = torch.zeros(3, 20), torch.zeros(3)
    noise = torch.randn(120, 20, generator=g)  # labels unrelated to features: the strongest
    assert linear.cv_strength(noise, y.numpy(), w0, b0, linear.PROBE_L2)[0] == 1.0
    clean = noise + 4 * torch.nn.functional.one_hot(y, 20).float()  # separable: a weak one
    lam, cv_loss = linear.cv_strength(clean, y.numpy(), w0, b0, linear.PROBE_L2)
    assert lam <= 0.01 and cv_loss.shape == (len(linear.PROBE_L2),)

    class Frozen(torch.nn.Module):  # features() is patched: only the head matters
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(20, 3)
            torch.nn.init.zeros_(self.head.weight), torch.nn.init.zeros_(self.head.bias)

        def get_classifier(self):
            return self.head

    feats = {"train": clean[:90], "val": clean[90:]}
    monkeypatch.setattr(
        probing, "features", lambda m, x, *a, **k: {s: feats[v] for s, v in x.items()}
    )

    def probe(val_labels):
        model, labels = Frozen(), {"train": y[:90].numpy(), "val": val_labels}
        images = {"train": "train", "val": "val"}
        rows, best = probing.linear_probe(model, images, labels, {}, "fp32", "auto", print)
        return best["l2"], model.head.weight.detach(), rows

    lam_a, w_a, rows = probe(y[90:].numpy())
    lam_b, w_b, _ = probe(np.roll(y[90:].numpy(), 1))  # val labels scrambled: same head
    assert lam_a == lam_b and torch.equal(w_a, w_b)
    assert all("cv_loss" in r for r in rows)


def test_the_strength_walk_chooses_what_fitting_every_strength_chooses_with_fewer_fits():
    """cv_strength walks from the grid's middle towards the lower CV loss and stops where it
    rises: on problems from pure noise (the strongest wins) to separable (the weakest), the
    exhaustive search's choice, fitting at most 5 of the 7 strengths."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(150) % 3
    w0, b0 = torch.zeros(3, 12), torch.zeros(3)
    noise = torch.randn(150, 12, generator=g)
    chosen = set()
    for signal in (0.0, 0.3, 0.6, 1.0, 2.0, 4.0):
        x = noise + signal * torch.nn.functional.one_hot(y, 12).float()
        walked, loss = linear.cv_strength(x, y.numpy(), w0, b0, linear.PROBE_L2)
        every, _ = linear.cv_strength(x, y.numpy(), w0, b0, linear.PROBE_L2, walk=False)
        assert walked == every, signal
        assert 3 <= np.isfinite(loss).sum() <= 5, loss
        chosen.add(walked)
    assert len(chosen) >= 3  # the problems span the grid


def test_walk_order_finds_the_minimum_of_any_single_minimum_curve():
    for m in range(1, 9):
        for low in range(m):
            walk, seen = linear.walk_order(m), []
            i = next(walk)
            while i is not None:
                seen.append(i)
                i = walk.send(abs(i - low))
            assert low in seen and len(seen) == len(set(seen)) <= max(3, m // 2 + 2), (m, seen)
            path = linear.path_to(tuple(range(m)), low)
            assert path[0] == (m - 1) // 2 and path[-1] == low


def test_large_training_sets_choose_the_strength_on_three_folds(monkeypatch):
    fits = []
    real = linear.Regression.fit
    monkeypatch.setattr(
        linear.Regression, "fit", lambda self, lam: fits.append(lam) or real(self, lam)
    )
    g = torch.Generator().manual_seed(0)
    for n, folds in ((9_999, 5), (10_000, 3)):
        fits.clear()
        y = torch.arange(n) % 2
        x = torch.randn(n, 4, generator=g) + y[:, None].float()
        _, loss = linear.cv_strength(
            x, y.numpy(), torch.zeros(2, 4), torch.zeros(2), linear.PROBE_L2
        )
        assert len(fits) == folds * np.isfinite(loss).sum(), (n, len(fits))


def test_a_bf16_strength_search_rounds_its_matmuls_yet_chooses_as_fp32_does():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 4
    x = torch.randn(600, 24, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 24).float()
    w0, b0 = torch.zeros(4, 24), torch.zeros(4)
    fp32 = linear.cv_strength(x, y.numpy(), w0, b0, linear.PROBE_L2, walk=False)
    bf16 = linear.cv_strength(x, y.numpy(), w0, b0, linear.PROBE_L2, walk=False, precision="bf16")
    assert bf16[0] == fp32[0]
    np.testing.assert_allclose(bf16[1], fp32[1], rtol=0.01)
    assert not np.array_equal(bf16[1], fp32[1])  # the bf16 path was taken
