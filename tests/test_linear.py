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
    monkeypatch.setattr(probing, "features", lambda m, x, *a, **k: feats[x])

    def probe(val_labels):
        model, labels = Frozen(), {"train": y[:90].numpy(), "val": val_labels}
        images = {"train": "train", "val": "val"}
        rows, best = probing.linear_probe(model, images, labels, {}, "fp32", "auto", print)
        return best["l2"], model.head.weight.detach(), rows

    lam_a, w_a, rows = probe(y[90:].numpy())
    lam_b, w_b, _ = probe(np.roll(y[90:].numpy(), 1))  # val labels scrambled: same head
    assert lam_a == lam_b and torch.equal(w_a, w_b)
    assert all("cv_loss" in r for r in rows)
