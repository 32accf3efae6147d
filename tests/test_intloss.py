"""Integer cross-entropy: torch (fwdgrad.ff.intloss) and numpy (fwdgrad.edge.loss) bit-identical, close to the
float64 cross-entropy, and QZO-FF steps with it bit-identical between the engine and the edge runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.edge import load_bundle
from fwdgrad.edge import loss as EL
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle
from fwdgrad.ff import intloss as IL
from fwdgrad.ff import qzo_ff
from fwdgrad.models import build_model

#: max |integer loss − float64 cross-entropy| in nats allowed (measured: 1.55e-5 ≈ 1.01 · 2^-16)
MAX_ERROR = 2 * 2.0**-16


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _logits(rng, n, c, lo, hi):
    """Random codes with extremes (all at lo/hi, one hot at hi) and ties (equal maxima) mixed in."""
    q = rng.integers(lo, hi + 1, size=(n, c))
    q[0], q[1], q[2] = lo, hi, lo
    q[2, 3 % c] = hi
    q[3, :] = (lo + hi) // 2
    q[4, : c // 2] = hi  # half of the classes tie at the maximum
    q[5, 1::2] = hi
    return q


def _float_ce(q, y, scale, zp):
    z = (q.astype(np.float64) - zp) * scale
    return F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y), reduction="none").numpy()


@pytest.mark.parametrize(
    "scale,lo,hi,c",
    [
        (0.05, -128, 127, 10),
        (0.2, 0, 255, 10),
        (1e-3, -32768, 32767, 7),
        (1.7, -128, 127, 100),
        (0.01, 0, 15, 2),
    ],
)
def test_bit_identical_and_close_to_float(scale, lo, hi, c):
    rng = np.random.default_rng(0)
    q = _logits(rng, 400, c, lo, hi)
    y = rng.integers(0, c, size=len(q))
    y[2] = 3 % c  # the one-hot winner, and its opposite
    spec = EL.loss_spec(scale, hi - lo)
    ref = EL.cross_entropy_q(q, y, spec)
    out = IL.cross_entropy_q(torch.from_numpy(q).float(), torch.from_numpy(y), spec)
    assert out.dtype == torch.int64 and np.array_equal(out.numpy(), ref)
    assert EL.mean_loss(ref, spec) == IL.mean_loss(out, spec)
    err = np.abs(ref / 2.0**spec.loss_bits - _float_ce(q, y, scale, 17))
    assert err.max() < MAX_ERROR, err.max()
    assert (ref >= 0).all()


def test_table_and_log2():
    spec = EL.loss_spec(0.1)  # no span: the table runs until exp underflows 2^-P/2
    assert spec.table[0] == 2**EL.EXP_BITS and spec.table[-1] == 0 and (spec.table[:-1] > 0).all()
    x = np.array([1, 2, 3, 2**30, 2**30 + 1, 2**40 - 1, 10 * 2**30, 2**52 + 12345], dtype=np.int64)
    got = EL.log2_fixed(x) / 2.0**EL.LOG_BITS
    assert np.abs(got - np.log2(x.astype(np.float64))).max() < 4 * 2.0**-EL.LOG_BITS
    assert np.array_equal(IL._log2_fixed(torch.from_numpy(x), EL.LOG_BITS).numpy(), EL.log2_fixed(x))
    with pytest.raises(ValueError, match="exp table"):
        EL.loss_spec(1e-7)
    with pytest.raises(ValueError, match="scale"):
        EL.loss_spec(float("nan"))


def test_mean_is_monotone_in_the_sum():
    spec = EL.loss_spec(0.1, 255)
    a = np.array([5, 7, 2**40 + 3], dtype=np.int64)
    b = a.copy()
    b[0] += 1
    assert EL.mean_loss(b, spec) > EL.mean_loss(a, spec)


def _small_cnn():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = build_model("small_cnn", 10, 1)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    return convert(m, "w16a8", x), x, y


@pytest.mark.parametrize("difference, m", [("sign", 2), ("median", 4)])
def test_qzo_ff_steps_engine_equals_edge(tmp_path, difference, m):
    """5 QZO-FF steps deciding signs by the integer loss: the engine and the numpy runtime agree on every
    loss and every weight (sign-m-SPSA, and the median difference)."""
    q, x, y = _small_cnn()
    trainable = list(q.weight_nodes())[-1:]
    export_bundle(q, tmp_path / "b.npz", trainable, eps=1e-2, lr=1e-2, m=m, seed=7, difference=difference)
    bundle = load_bundle(tmp_path / "b.npz")
    trainer = EL.IntegerLossTrainer(bundle)
    opt = qzo_ff(q, 1e-2, 1e-2, m, 7, trainable=trainable, difference=difference)
    closure = IL.integer_closure(q, lambda: trainable[0])
    start = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    for k in range(5):
        xb, yb = x[k * 8 : (k + 1) * 8], y[k * 8 : (k + 1) * 8]
        assert opt.step(closure(xb, yb)) == trainer.step(xb.numpy(), yb.numpy())
    for n, node in q.weight_nodes().items():
        assert np.array_equal(bundle.arrays[f"{n}.weight"], node.weight_q.numpy()), n
    assert not torch.equal(q.weight_nodes()[trainable[0]].weight_q, start[trainable[0]])


def test_model_loss_spec_of_a_qmodel():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    q = convert(lin, "w16a8", torch.randn(8, 1, 2, 2))
    spec = IL.model_loss_spec(q)
    assert spec.table[0] == 2**EL.EXP_BITS


def test_train_with_the_integer_loss():
    """train.loss=integer: QZO-FF decides every step on the integer cross-entropy; deterministic, a different
    trajectory from the float loss, and refused for the other methods."""
    from fwdgrad.data.digits import load_digits_tensors
    from fwdgrad.models import build_model
    from fwdgrad.train import TrainConfig, train

    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    x, y = (t[:256] for t in load_digits_tensors())
    runs = {}
    for loss in ("float", "integer", "integer"):
        q = convert(model, "w16a8", x[:64])
        cfg = TrainConfig(method="qzo_ff", loss=loss, steps=5, batch_size=32, eval_every=5, lr=0.01, eps=0.01)
        r = train(q, cfg, (x, y), (x[:64], y[:64]))
        w = torch.cat([n.weight_q.reshape(-1).float() for n in r.model.weight_nodes().values()])
        runs.setdefault(loss, []).append((w, [row["loss"] for row in r.log]))
    (_, lf), [(wi1, li1), (wi2, li2)] = runs["float"][0], runs["integer"]
    assert torch.equal(wi1, wi2) and li1 == li2 and li1 != lf
    with pytest.raises(ValueError, match="train.loss='integer' is invalid for method 'bp'; allowed: float"):
        TrainConfig(method="bp", loss="integer")
