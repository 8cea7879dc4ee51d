"""evaluate: metrics (golden values), test-time augmentation views."""

import numpy as np
import pytest
import torch

from transferlab import evaluate


def test_ece_known_answer():
    # two bins: confidence 0.9 with 50% right, confidence 0.6 with 100% right
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    assert evaluate.ece(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_metrics_known_answer():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    m = evaluate.metrics(logits, np.array([0, 1]))
    assert m["top1"] == 0.5 and m["top5"] == 1.0 and m["n"] == 2
    assert m["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3)) / 2)


def test_tta_views_flip_and_ten_crops():

    x = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128)
    flip = list(evaluate.views(x, "flip"))
    assert len(flip) == 2 and torch.equal(flip[0], x) and torch.equal(flip[1], x.flip(-1))
    crops = list(evaluate.views(x, "crops"))
    assert len(crops) == 10 and all(v.shape == x.shape for v in crops)
    assert not torch.equal(crops[0], crops[2])  # different corners
