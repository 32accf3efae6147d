"""Weight imprinting (`train.head_init=imprint`): the head becomes the nearest-class-mean classifier of its
input features."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.pipeline.steps import IMPRINT_MARGIN, imprint_head


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _features(model, x):
    with torch.no_grad():
        return model[:3](x).double()


def test_imprinted_head_is_the_nearest_class_mean_classifier():
    model = _model()
    x, y = torch.randn(50, 2, 4), torch.randint(0, 3, (50,))  # class 3 has no examples
    before = model[3].weight.detach().clone(), model[3].bias.detach().clone()
    assert imprint_head(model, x, y, batch_size=16) == 4  # forward passes: ceil(50 / 16)
    f = _features(model, x)
    mu = torch.stack([f[y == k].mean(0) for k in range(3)])
    with torch.no_grad():
        logits = model(x).double()[:, :3]
    assert torch.equal(logits.argmax(1), torch.cdist(f, mu).argmin(1))  # the nearest class mean
    # the logits are tau·(mu_k·f − |mu_k|²/2) up to a shift all classes share: the same softmax
    d = torch.cdist(mu, mu).pow(2) / 2
    tau = IMPRINT_MARGIN / float(d.sum() / 6)
    plain = tau * (f @ mu.T - mu.pow(2).sum(1) / 2)
    assert torch.allclose(F.log_softmax(logits, 1), F.log_softmax(plain, 1), atol=1e-4)
    assert abs(logits.mean(1)).max() < abs(plain.mean(1)).max()  # centred: a narrower range to quantize
    assert torch.equal(model[3].weight[3], before[0][3]) and model[3].bias[3] == before[1][3]  # no examples


def test_imprint_refuses_what_it_cannot_do():
    x = torch.randn(10, 2, 4)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        imprint_head(_model(), x, torch.zeros(10, dtype=torch.long))
    conv_head = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Flatten())
    with pytest.raises(ValueError, match="needs a linear head"):
        imprint_head(conv_head, torch.randn(4, 2, 2, 2), torch.tensor([0, 1, 0, 1]))
