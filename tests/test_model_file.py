"""model.pt holds plain data only (fwdgrad.statefile, fwdgrad.export.save_model): the model rebuilt from it is
the trained one bit for bit, and `fwdgrad export` refuses in one line, running nothing and writing nothing, a
planted pickle, a corrupted file, a file of another kind and a model built by a callable the file names."""

import struct
import zipfile

import numpy as np
import pytest
import torch
from pipeline_runs import run

from fwdgrad.cli import main as fwdgrad
from fwdgrad.config import BUILD_MODEL
from fwdgrad.export import export_bundle, load_model
from fwdgrad.models import small_cnn
from fwdgrad.pipeline import transfer
from fwdgrad.statefile import StateFileError, load_state, save_state


def digits_cnn(num_classes: int, in_channels: int):
    """A callable of one's own building the run's small_cnn (width 32)."""
    return small_cnn(num_classes, in_channels, width=32)


class Plant:
    """Unpickled, it would create `path` (what a planted model.pt could do instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny pipeline runs, qzo_ff w16a8 ("q") and bp fp32 ("fp"): their folder, and the trained models as
    the pipeline handed them to save_model."""
    root, trained = tmp_path_factory.mktemp("model_file"), {}
    save = transfer.save_model

    def keep(path, model, *args, **kw):
        trained[path.parent.name] = model
        save(path, model, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer, "save_model", keep)
        run(root, out="q")
        run(root, "method=bp", out="fp")
    return root, trained


def _refused(capsys, path, out, *args) -> str:
    """`fwdgrad export path out` exits 2 with one line naming the file and writes nothing; that line."""
    assert fwdgrad(["export", str(path), str(out), "--lr", "0.05", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fwdgrad export: error: ") and "\n" not in err and repr(str(path)) in err, err
    assert not out.exists()
    return err


def test_rebuilt_qmodel_is_the_trained_one(runs):
    root, trained = runs
    q, payload = load_model(root / "q" / "model.pt")
    t = trained["q"]
    assert payload["training"]["fixed_point"]["weight_headroom"] == 4  # training changed the head's scale
    x = torch.rand(64, *payload["model"]["input_shape"], generator=torch.Generator().manual_seed(0))
    for mode in ("integer", "fake"):
        assert torch.equal(q.run(x, mode=mode), t.run(x, mode=mode)), mode
    a = export_bundle(t, root / "a.npz", None, 1e-2, 0.05, 3, 0)
    b = export_bundle(q, root / "b.npz", None, 1e-2, 0.05, 3, 0)
    assert a.ops == b.ops and a.training == b.training and a.arrays.keys() == b.arrays.keys()
    assert all(
        np.array_equal(a.arrays[k], b.arrays[k]) and a.arrays[k].dtype == b.arrays[k].dtype for k in a.arrays
    )


def test_fp32_model_round_trips(runs, capsys):
    root, trained = runs
    f, payload = load_model(root / "fp" / "model.pt")
    t = trained["fp"]
    assert payload["model"]["qmodel"] is None and payload["training"]["method"] == "bp"
    assert f.state_dict().keys() == t.state_dict().keys()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in f.state_dict().items())
    x = torch.rand(8, *payload["model"]["input_shape"])
    assert torch.equal(f(x), t.eval()(x))
    assert "holds a float Sequential (an fp32 run)" in _refused(
        capsys, root / "fp" / "model.pt", root / "fp.npz"
    )


def test_planted_pickle_runs_nothing(runs, capsys, tmp_path):
    root, _ = runs
    marker, planted = tmp_path / "marker", tmp_path / "model.pt"
    torch.save({"model": Plant(marker), "training": None}, planted)
    err = _refused(capsys, planted, tmp_path / "b.npz")
    assert "holds pickled Python objects" in err and not marker.exists()
    torch.load(planted, weights_only=False)  # the plant is live: an unchecked load runs it
    assert marker.exists()


@pytest.mark.parametrize("kind", ["text", "checkpoint", "pickled QModel", "state of another kind"])
def test_files_other_than_a_model_file_are_refused(runs, capsys, tmp_path, kind):
    root, trained = runs
    path = tmp_path / "in.pt"
    if kind == "text":
        path.write_text("not a model\n")
    elif kind == "checkpoint":
        path = root / "q" / "checkpoint.pt"
    elif kind == "pickled QModel":  # what export accepted before
        torch.save(trained["q"], path)
    else:
        save_state(path, "checkpoint", load_state(root / "q" / "model.pt", "model"))
    _refused(capsys, path, tmp_path / "b.npz")


def test_flipped_byte_is_one_line_naming_the_file(runs, capsys, tmp_path):
    root, _ = runs
    raw = bytearray((root / "q" / "model.pt").read_bytes())
    with zipfile.ZipFile(root / "q" / "model.pt") as z:  # the largest tensor's bytes (stored uncompressed)
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    path = tmp_path / "model.pt"
    path.write_bytes(raw)
    with pytest.raises(StateFileError, match="checksum does not match") as e:
        load_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert "is corrupted" in _refused(capsys, path, tmp_path / "b.npz")


def test_model_built_by_a_named_callable_needs_trust(runs, capsys, tmp_path):
    """Building the model calls what the file names: a callable of one's own only with --trust-model-target,
    and never hydra's nested `_target_` nodes or interpolations in the options."""
    root, _ = runs
    marker, path = tmp_path / "marker", tmp_path / "model.pt"
    payload = load_state(root / "q" / "model.pt", "model")
    for config, why in (
        ({"_target_": "os.system", "command": f"touch {marker}"}, "a callable of your own"),
        (
            {
                "_target_": BUILD_MODEL,
                "name": "small_cnn",
                "width": {"_target_": "os.system", "command": "x"},
            },
            "model options ['width'] are not plain values",
        ),
        ({"_target_": BUILD_MODEL, "name": "small_cnn", "width": "${oc.env:HOME}"}, "not plain values"),
    ):
        payload["model"]["config"] = config
        save_state(path, "model", payload)
        assert why in _refused(capsys, path, tmp_path / "b.npz") and not marker.exists()
    payload["model"]["config"] = {"_target_": f"{__name__}.digits_cnn"}
    save_state(path, "model", payload)
    assert "--trust-model-target" in _refused(capsys, path, tmp_path / "b.npz")
    assert fwdgrad(["export", str(path), str(tmp_path / "b.npz"), "--trust-model-target"]) == 0
    assert (tmp_path / "b.npz").exists()
