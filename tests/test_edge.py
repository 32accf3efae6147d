"""Export bundle + numpy edge runtime: bit-exact inference and QZO-FF training against the PyTorch engine,
torch-free import, bundle validation, atomic saves, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.edge import BundleError, Runtime, Trainer, load_bundle, save_bundle
from fwdgrad.edge import bundle as B
from fwdgrad.edge.__main__ import main as edge_main
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle, export_main, save_model
from fwdgrad.ff import qzo_ff
from fwdgrad.fixed_point import FixedPointSettings
from fwdgrad.models import build_model
from fwdgrad.quant import dequantize
from fwdgrad.rng.streams import SR_STREAM

SHAPES = {"resnet8": (3, 16, 16), "ds_cnn": (1, 20, 25), "small_cnn": (1, 8, 8)}


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _model(name: str, seed: int = 0, **convert_kw):
    """A converted model with randomized BatchNorm statistics, its calibration batch and labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = build_model(name, 10, SHAPES[name][0])
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
            mod.weight.data.uniform_(0.5, 1.5, generator=g)
            mod.bias.data.uniform_(-0.2, 0.2, generator=g)
    x = torch.randn(48, *SHAPES[name], generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    return convert(m, convert_kw.pop("scheme", "w16a8"), x, **convert_kw), x, y


def _f64_closure(q, xb, yb):
    """Float64 cross-entropy of the dequantized integer logits (what the runtime computes)."""
    oq = q.output_qparams()
    s, zp = float(oq.scale.reshape(-1)[0]), int(oq.zero_point.reshape(-1)[0])
    return lambda: F.cross_entropy((q.run(xb, mode="integer").double() - zp) * s, yb)


def _export(q, path, trainable=None, **kw):
    args = dict(eps=1e-3, lr=1e-3, m=2, seed=7)
    args.update(kw)
    return export_bundle(q, path, trainable, **args)


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("name", ["resnet8", "ds_cnn"])
def test_inference_bit_exact(tmp_path, name):
    q, x, _ = _model(name)
    _export(q, tmp_path / "b.npz")
    rt = Runtime(load_bundle(tmp_path / "b.npz"))
    codes, logits = rt.logits(x.numpy())
    ref = q.run(x, mode="integer")
    assert np.array_equal(codes.astype(np.int64), ref.numpy().astype(np.int64))
    assert np.array_equal(logits, dequantize(ref, q.output_qparams(), torch.float64).numpy())
    assert len(np.unique(codes)) > 5  # a non-degenerate output


@pytest.mark.parametrize(
    "kw",
    [
        dict(requant="gemmlowp"),
        dict(acc_bits=16, overflow="wrap"),
        dict(acc_bits=16, overflow="saturate"),
        dict(per_channel=True),
    ],
    ids=["gemmlowp", "wrap16", "sat16", "per_channel"],
)
def test_inference_engine_variants(tmp_path, kw):
    q, x, _ = _model("small_cnn", **kw)
    _export(q, tmp_path / "b.npz")
    ref = q.run(x, mode="integer").numpy().astype(np.int64)
    assert np.array_equal(Runtime(load_bundle(tmp_path / "b.npz")).run(x.numpy()), ref)
    if "acc_bits" in kw:
        assert q.stats.total > 0  # the narrow accumulator really overflowed


class _Zoo(nn.Module):
    """Every other exportable op: LUT, max/avg pooling, concat, standalone ReLU, transpose, flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 4, 3, padding=2, dilation=2)
        self.act, self.pool, self.avg = nn.Hardswish(), nn.MaxPool2d(2), nn.AvgPool2d(2, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        y = torch.cat([self.pool(self.act(self.a(x))), torch.sigmoid(self.pool(self.b(x)))], 1)
        y = self.avg(F.relu(y)).transpose(2, 3)
        return self.fc(torch.flatten(y, 1))


def test_inference_other_ops(tmp_path):
    x = torch.randn(16, 2, 4, 4)
    q = convert(_Zoo(), "w8a8", x)
    bundle = _export(q, tmp_path / "b.npz")
    assert {"lut", "maxpool", "concat", "clamp", "avgpool", "transpose", "flatten"} <= {
        o["kind"] for o in bundle.ops
    }
    ref = q.run(x, mode="integer").numpy().astype(np.int64)
    assert np.array_equal(Runtime(load_bundle(tmp_path / "b.npz")).run(x.numpy()), ref)


def test_preprocessing_and_integer_inputs(tmp_path):
    q, x, _ = _model("small_cnn")
    mean, std = 0.3, 2.0
    _export(q, tmp_path / "b.npz", input_preprocessing={"mean": [mean], "std": [std], "shape": [1, 8, 8]})
    rt = Runtime(load_bundle(tmp_path / "b.npz"))
    raw = (x * std + mean).numpy()
    ref = q.run(torch.from_numpy((raw - np.float32(mean)) / np.float32(std)), mode="integer").numpy()
    assert np.array_equal(rt.run(raw), ref.astype(np.int64))
    assert np.array_equal(rt.run(rt.quantize_input(raw)), rt.run(raw))  # already-quantized input
    with pytest.raises(ValueError, match="does not match"):
        rt.run(raw[:, :, :4])


# ------------------------------------------------------------------------------------------- training
def _train_both(tmp_path, q, x, y, trainable, steps, batch=8, **kw):
    bundle_path = tmp_path / "t.npz"
    _export(q, bundle_path, trainable, **kw)
    opt_kw = {k: v for k, v in kw.items() if k not in ("masks", "distribution")}
    opt = qzo_ff(
        q, 1e-3, 1e-3, 2, 7, trainable=trainable, distribution=kw.get("distribution", "qgaussian"), **opt_kw
    )
    if "masks" in kw:
        opt.space.masks = {i: kw["masks"][n] for i, n in enumerate(opt.space.names)}
    bundle = load_bundle(bundle_path)
    trainer = Trainer(bundle)
    names = trainable or list(q.weight_nodes())
    start = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    for k in range(steps):
        xb, yb = x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        ref_loss = opt.step(_f64_closure(q, xb, yb))
        loss = trainer.step(xb.numpy(), yb.numpy())
        assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert bundle.training["step"] == steps == opt.step_count
    changed = 0
    for n, node in q.weight_nodes().items():
        assert np.array_equal(bundle.arrays[f"{n}.weight"], node.weight_q.numpy()), n
        changed += int((node.weight_q != start[n]).sum())
        if n not in names:
            assert torch.equal(node.weight_q, start[n])
    assert changed > 0  # training moved the weights
    return bundle, opt


@pytest.mark.parametrize("name", ["resnet8", "ds_cnn"])
def test_training_bit_exact(tmp_path, name):
    q, x, y = _model(name)
    trainable = None if name == "resnet8" else list(q.weight_nodes())[-4:]
    _, opt = _train_both(tmp_path, q, x, y, trainable, steps=5)
    assert any(c != 0 for c in opt.last_coeffs)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rounding="stochastic"),
        dict(rounding="floor", perturb_scale="delta_z", distribution="qrademacher", eps_min_q=300),
        dict(rounding="nearest", sparse=True),
        dict(layerwise="cycle"),
        dict(layerwise="sample", rounding="stochastic"),
        # 8-bit weights: ±1-LSB Rademacher perturbations, stochastic rounding of the update (the w8a8 preset)
        dict(scheme="w8a8", distribution="qrademacher", rounding="stochastic", eps_min_q=1),
        # one-sided passes signed against the step's median loss, 16- and 8-bit weights
        dict(difference="median"),
        dict(
            difference="median", scheme="w8a8", distribution="qrademacher", rounding="stochastic", eps_min_q=2
        ),
    ],
    ids=[
        "stochastic",
        "floor-deltaz-rademacher",
        "sparse",
        "layerwise-cycle",
        "layerwise-sample",
        "w8-lsb",
        "median",
        "median-w8-lsb",
    ],
)
def test_training_variants_bit_exact(tmp_path, kw):
    q, x, y = _model("small_cnn", per_channel=True, scheme=kw.pop("scheme", "w16a8"))
    if kw.pop("sparse", False):
        g = torch.Generator().manual_seed(1)
        kw["masks"] = {
            n: torch.rand(node.weight_q.shape, generator=g) < 0.3 for n, node in q.weight_nodes().items()
        }
    bundle, _ = _train_both(tmp_path, q, x, y, None, steps=4, **kw)
    assert bundle.training["difference"] == kw.get("difference", "sign")
    for t in bundle.training["tensors"]:
        assert bundle.arrays[t["eps_q"]].ndim == 1  # per-channel ε_q


@pytest.mark.parametrize(
    "kw",
    [
        dict(difference="central"),
        dict(difference="central", loss="integer"),
        dict(difference="central", rounding="stochastic", scheme="w8a8"),
        dict(difference="central", distribution="qgaussian", per_channel=True),
        dict(difference="sign"),
        dict(difference="median", m=3),
    ],
    ids=["central", "central-integer-loss", "central-w8-stochastic", "central-qgaussian", "sign", "median"],
)
def test_perturbed_outputs_bit_exact(tmp_path, kw):
    """Perturbed outputs (`method.ff.perturb=outputs`): the numpy runtime's steps equal the engine's
    `ActivityGradient` to the last weight bit, from the same exported head."""
    from fwdgrad.edge.loss import IntegerLossTrainer
    from fwdgrad.ff import ActivityGradient, example_closure

    kw = dict(kw)
    loss, m = kw.pop("loss", "float"), kw.pop("m", 2)
    q, x, y = _model("small_cnn", scheme=kw.pop("scheme", "w16a8"), per_channel=kw.pop("per_channel", False))
    head = list(q.weight_nodes())[-1]
    settings = FixedPointSettings(**{"distribution": "qrademacher", **kw})
    _export(q, tmp_path / "o.npz", [head], lr=2.0, m=m, settings=settings, loss=loss, perturb="outputs")
    bundle = load_bundle(tmp_path / "o.npz")
    assert bundle.training["target"] == "outputs"
    trainer = (IntegerLossTrainer if loss == "integer" else Trainer)(bundle)
    opt = ActivityGradient(q, head, lr=2.0, eps=1e-3, m=m, seed=7, settings=settings)
    closure = example_closure(q, loss)
    start = q.weight_nodes()[head].weight_q.clone()
    for k in range(4):
        xb, yb = x[k * 12 : (k + 1) * 12], y[k * 12 : (k + 1) * 12]
        ref = opt.step(closure(xb, yb))
        got = trainer.step(xb.numpy(), yb.numpy())
        assert got == pytest.approx(ref, rel=1e-9)
        assert np.array_equal(bundle.arrays[f"{head}.weight"], q.weight_nodes()[head].weight_q.numpy()), k
    assert not torch.equal(q.weight_nodes()[head].weight_q, start)
    assert bundle.training["step"] == 4


def test_perturbed_outputs_export_refusals(tmp_path):
    q, x, y = _model("small_cnn")
    head = list(q.weight_nodes())[-1]
    with pytest.raises(ValueError, match="perturb=outputs trains one linear layer whose output is the model"):
        _export(q, tmp_path / "a.npz", list(q.weight_nodes())[-2:], perturb="outputs")
    with pytest.raises(ValueError, match="difference='central' needs perturb=outputs"):
        _export(q, tmp_path / "b.npz", [head], difference="central")
    bundle = _export(q, tmp_path / "c.npz", [head], perturb="outputs", difference="central")
    from fwdgrad.edge.cgen import CExportError, generate_c

    with pytest.raises(CExportError, match="training.difference='central'"):
        generate_c(bundle, tmp_path / "c_out")
    bundle.training["difference"] = "sign"
    with pytest.raises(CExportError, match="training.target='outputs'"):
        generate_c(bundle, tmp_path / "c_out")


def test_sr_stream_matches_engine():
    from fwdgrad.edge import train

    assert train.SR_STREAM == SR_STREAM


def test_runtime_trains_without_torch(tmp_path):
    q, x, y = _model("small_cnn")
    _export(q, tmp_path / "b.npz")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from fwdgrad.edge import Trainer, load_bundle, save_bundle
        from fwdgrad.edge.__main__ import main
        b = load_bundle({str(tmp_path / "b.npz")!r})
        d = np.load({str(tmp_path / "d.npz")!r})
        t = Trainer(b)
        losses = [t.step(d["x"][i * 8:(i + 1) * 8], d["y"][i * 8:(i + 1) * 8]) for i in range(3)]
        save_bundle(b)
        assert main(["eval", {str(tmp_path / "b.npz")!r}, {str(tmp_path / "d.npz")!r}]) == 0
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("OK", b.training["step"], losses)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "OK 3" in res.stdout
    assert load_bundle(tmp_path / "b.npz").training["step"] == 3


# -------------------------------------------------------------------------------- bundle validation
@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory):
    q, _, _ = _model("small_cnn")
    path = tmp_path_factory.mktemp("bundle") / "b.npz"
    _export(q, path)
    return path


def _rewrite(src, dst, header_fn=None, arrays_fn=None):
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    header = json.loads(arrays.pop(B.HEADER_KEY).item())
    if header_fn:
        header_fn(header)
    if arrays_fn:
        arrays_fn(arrays)
    np.savez(dst, **{B.HEADER_KEY: np.array(json.dumps(header))}, **arrays)
    return dst


def test_bundle_round_trip(bundle_file, tmp_path):
    b = load_bundle(bundle_file)
    save_bundle(b, tmp_path / "copy.npz")
    c = load_bundle(tmp_path / "copy.npz")
    assert c.header == b.header and c.arrays.keys() == b.arrays.keys()
    assert all(np.array_equal(c.arrays[k], v) and c.arrays[k].dtype == v.dtype for k, v in b.arrays.items())
    assert b.header["format"] == "fwdgrad-bundle" and b.header["version"] == "1.1"
    assert b.arrays["_0.weight"].dtype == np.int16 and b.arrays["_0.bias"].dtype == np.int32


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda raw: raw[: len(raw) // 2], "truncated or corrupt"),
        (lambda raw: raw[:100], "truncated or corrupt"),
        (lambda raw: b"", "no zip signature"),
        (lambda raw: b"hello, not a bundle", "no zip signature"),
    ],
    ids=["half", "head", "empty", "text"],
)
def test_truncated_or_garbage_rejected(bundle_file, tmp_path, damage, match):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(damage(bundle_file.read_bytes()))
    with pytest.raises(BundleError, match=match):
        load_bundle(bad)


def test_corrupt_member_rejected(bundle_file, tmp_path):
    raw = bytearray(bundle_file.read_bytes())
    with zipfile.ZipFile(bundle_file) as zf:
        info = zf.getinfo("_3.weight.npy")
    pos = info.header_offset + 30 + len(info.filename) + 200  # inside the stored (uncompressed) data
    raw[pos] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="truncated or corrupt.*CRC"):
        load_bundle(bad)


def test_missing_file_and_header(bundle_file, tmp_path):
    with pytest.raises(BundleError, match="cannot read bundle"):
        load_bundle(tmp_path / "nope.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(BundleError, match="no '__header__'"):
        load_bundle(tmp_path / "plain.npz")


def _set(path, value):
    def fn(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return fn


@pytest.mark.parametrize(
    "header_fn,arrays_fn,match",
    [
        (_set(["version"], "2.0"), None, "newer than this runtime supports"),
        (_set(["version"], "one"), None, "version 'one' is invalid"),
        (_set(["format"], "other"), None, "not a fwdgrad bundle"),
        (None, lambda a: a.pop("_3.weight"), "missing array '_3.weight'"),
        (
            None,
            lambda a: a.update({"_3.weight": a["_3.weight"].astype(np.int32)}),
            "'_3.weight' has dtype int32",
        ),
        (_set(["arrays", "_3.bias", "dtype"], "float32"), None, "documented dtype"),
        (_set(["ops", 1, "kind"], "gru"), None, "unknown kind 'gru'"),
        (_set(["ops"], [1, 2]), None, "malformed header"),
        (_set(["training", "loss"], "hinge"), None, "training.loss is 'hinge'"),
        (_set(["training", "difference"], "central"), None, "training.difference is 'central'"),
        (lambda h: h["training"].update(difference="median", m=1), None, "training.m is 1"),
    ],
    ids=[
        "major",
        "bad-version",
        "format",
        "missing-array",
        "wrong-dtype",
        "undocumented-dtype",
        "op-kind",
        "malformed",
        "loss",
        "difference",
        "median-m1",
    ],
)
def test_invalid_bundles_rejected(bundle_file, tmp_path, header_fn, arrays_fn, match):
    bad = _rewrite(bundle_file, tmp_path / "bad.npz", header_fn, arrays_fn)
    with pytest.raises(BundleError, match=match):
        load_bundle(bad)


def test_newer_minor_version_accepted(bundle_file, tmp_path):
    def fn(h):
        h["version"], h["future_field"] = "1.7", {"ignored": True}

    assert load_bundle(_rewrite(bundle_file, tmp_path / "minor.npz", fn)).header["version"] == "1.7"


def test_failed_save_keeps_original(bundle_file, tmp_path, monkeypatch):
    path = tmp_path / "b.npz"
    path.write_bytes(bundle_file.read_bytes())
    before = path.read_bytes()
    b = load_bundle(path)
    b.arrays["_3.weight"][...] += 1

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial zip")
        raise OSError("disk full")

    monkeypatch.setattr(B.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(b)
    monkeypatch.undo()
    b.header["meta"]["bad"] = object()
    with pytest.raises(TypeError):
        save_bundle(b)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["b.npz"]  # no temp files left behind
    del b.header["meta"]["bad"]
    save_bundle(b)
    assert np.array_equal(load_bundle(path).arrays["_3.weight"], b.arrays["_3.weight"])


# ------------------------------------------------------------------------------------------- export
def test_export_rejects_fallback_and_bad_settings(tmp_path):
    class WithNorm(nn.Module):  # Softplus has no integer kernel: a fallback op
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(6, 6), nn.Softplus()

        def forward(self, x):
            return self.norm(self.fc(x))

    x = torch.randn(8, 6)
    with pytest.warns(UserWarning):
        q = convert(WithNorm(), "w16a8", x)
    with pytest.raises(ValueError, match=r"QFallback.*norm"):
        _export(q, tmp_path / "b.npz")
    q, _, _ = _model("small_cnn", requant="float")
    with pytest.raises(ValueError, match="requant='float' cannot be exported"):
        _export(q, tmp_path / "b.npz")
    q, _, _ = _model("small_cnn")
    with pytest.raises(ValueError, match="not conv/linear layers"):
        _export(q, tmp_path / "b.npz", ["nope"])
    with pytest.raises(ValueError, match="outside the representable range"):
        _export(q, tmp_path / "b.npz", lr=1e-15)
    assert not (tmp_path / "b.npz").exists()


def test_export_main(tmp_path, capsys):
    q, x, _ = _model("small_cnn")
    save_model(
        tmp_path / "q.pt", q, {"_target_": "fwdgrad.models.build_model", "name": "small_cnn"}, 10, x.shape[1:]
    )
    argv = ["--lr", "1e-4", "--m", "1", "--trainable", "_8", "--mean", "0.5", "--std", "0.25"]
    assert export_main([str(tmp_path / "q.pt"), str(tmp_path / "a.npz"), *argv]) == 0
    a = load_bundle(tmp_path / "a.npz")
    assert (
        a.training["trainable"] == ["_8"]
        and a.training["m"] == 1
        and a.header["preprocessing"]["std"] == [0.25]
    )
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    assert export_main([str(tmp_path / "bad.pt"), str(tmp_path / "c.npz"), "--lr", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("fwdgrad export: error:") and "is not a fwdgrad state file" in err and "\n" not in err
    )
    assert not (tmp_path / "c.npz").exists()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_finetune_resume_equals_uninterrupted(tmp_path, capsys):
    q, x, y = _model("small_cnn")
    _export(q, tmp_path / "a.npz")
    _export(q, tmp_path / "b.npz")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy().astype(np.int32))
    data = str(tmp_path / "d.npz")
    assert (
        edge_main(
            [
                "finetune",
                str(tmp_path / "a.npz"),
                data,
                "--steps",
                "6",
                "--batch",
                "8",
                "--checkpoint-every",
                "2",
                "--log-every",
                "3",
                "--eval",
                data,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "step 6/6  loss" in out
        and "checkpoint step 4" in out
        and "eval accuracy" in out
        and "peak RSS" in out
    )
    # interrupted after 4 steps (as if killed after the checkpoint), then the same command again
    assert edge_main(["finetune", str(tmp_path / "b.npz"), data, "--steps", "4", "--batch", "8"]) == 0
    assert edge_main(["finetune", str(tmp_path / "b.npz"), data, "--steps", "6", "--batch", "8"]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    a, b = load_bundle(tmp_path / "a.npz"), load_bundle(tmp_path / "b.npz")
    assert a.training["step"] == b.training["step"] == 6
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    assert not np.array_equal(a.arrays["_3.weight"], q.weight_nodes()["_3"].weight_q.numpy())


def test_cli_eval_and_errors(tmp_path, capsys):
    q, x, y = _model("small_cnn")
    _export(q, tmp_path / "b.npz")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    assert edge_main(["eval", str(tmp_path / "b.npz"), str(tmp_path / "d.npz")]) == 0
    logits = dequantize(q.run(x, mode="integer"), q.output_qparams())
    acc = float((logits.argmax(1) == y).double().mean())
    assert f"accuracy {acc:.4f}" in capsys.readouterr().out
    np.savez(tmp_path / "nolabels.npz", x=x.numpy())
    (tmp_path / "junk.npz").write_bytes(b"junk")
    for argv in (
        ["eval", str(tmp_path / "b.npz"), str(tmp_path / "nolabels.npz")],
        ["eval", str(tmp_path / "junk.npz"), str(tmp_path / "d.npz")],
    ):
        assert edge_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m fwdgrad.edge: error:") and "\n" not in err


def test_finetune_takes_the_bundles_loss(tmp_path, capsys):
    """A bundle exported with loss="integer" (header training.loss cross_entropy_q, as `fwdgrad export`
    writes for a train.loss=integer run) fine-tunes on the integer loss without --loss: the same arrays as
    `--loss integer` on a float-loss bundle."""
    q, x, y = _model("small_cnn")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy().astype(np.int32))
    data = str(tmp_path / "d.npz")
    _export(q, tmp_path / "int.npz", loss="integer", lr=5e-2, eps=1e-2)
    for name in ("flag.npz", "float.npz"):
        _export(q, tmp_path / name, lr=5e-2, eps=1e-2)
    assert load_bundle(tmp_path / "int.npz").training["loss"] == "cross_entropy_q"
    common = [data, "--steps", "4", "--batch", "8"]
    assert edge_main(["finetune", str(tmp_path / "int.npz"), *common]) == 0
    assert "loss integer (from the bundle)" in capsys.readouterr().out
    assert edge_main(["finetune", str(tmp_path / "flag.npz"), *common, "--loss", "integer"]) == 0
    assert edge_main(["finetune", str(tmp_path / "float.npz"), *common]) == 0
    a, b, c = (load_bundle(tmp_path / n) for n in ("int.npz", "flag.npz", "float.npz"))
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
    with pytest.raises(ValueError, match="loss='hinge' is invalid; allowed: float, integer"):
        _export(q, tmp_path / "x.npz", loss="hinge")
    assert c.training["loss"] == "cross_entropy_f64" and c.training["step"] == 4
