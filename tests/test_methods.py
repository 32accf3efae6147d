"""The method registry: every method through the same checks (its spec agrees with what its builder makes)."""

import subprocess
import sys

import pytest
import torch

from fwdgrad.engine import QModel, convert
from fwdgrad.methods import METHODS, SCOPES, check_hyper, spec
from fwdgrad.models import build_model
from fwdgrad.train import BUILDERS, Method, TrainConfig


def _model(s):
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=5, in_channels=1, width=8).eval()
    return convert(model, s.default_quant, torch.randn(16, 1, 8, 8)) if s.trains == "qmodel" else model


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "m, ff", [(1, {}), (3, {}), (2, {"sharpness_rho": 1e-2}), (4, {"difference": "median"})]
)
def test_spec_matches_what_its_builder_makes(name, m, ff):
    s = spec(name)
    assert s.builder in BUILDERS and s.trains in ("float", "qmodel") and s.default_quant in ("fp32", "w16a8")
    assert set(s.hyper) <= {"lr", "eps", "m"} and "lr" in s.hyper
    takes = set(ff) <= set(s.ff_options) and not (ff.get("difference") and "m" in s.fixed)
    ff = ff if takes else {}
    model = _model(s)
    layers = 2 if name == "hybrid" else 1  # hybrid needs a layer below its BP-trained head
    cfg = TrainConfig(method=name, scope="lp", lp_layers=layers, lr=0.01, eps=1e-2, m=m, steps=1, ff=ff)
    method = Method(model, cfg)
    assert method.forwards_per_step == s.forwards_per_step(m, ff)
    assert isinstance(model, QModel) == (s.trains == "qmodel")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = method.step(x, y)
    assert loss == loss  # finite, not NaN
    if s.forward_only:  # forward-only methods never leave gradients behind
        assert all(p.grad is None for p in model.parameters())
    method.finish()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed or s.forward_only  # BP moves the head in one step; a sign step may tie on random data


@pytest.mark.parametrize("name", list(METHODS))
def test_wrong_model_kind_is_one_line(name):
    s = spec(name)
    other = spec("bp" if s.trains == "qmodel" else "qzo_ff")
    with pytest.raises(ValueError, match="quantized model|trains a float model"):
        Method(_model(other), TrainConfig(method=name, steps=1))


def test_hyperparameters_a_method_pins_or_ignores():
    check_hyper("bp", 0.1, None, None)  # BP reads lr only
    with pytest.raises(ValueError, match=r"method\.m=3 is invalid for method 'zo_fp32'; allowed: 1"):
        check_hyper("zo_fp32", 0.1, 1e-3, 3, where="method.")
    with pytest.raises(ValueError, match=r"eps=0 is invalid; allowed: > 0"):
        check_hyper("qzo_ff", 0.1, 0, 3)
    with pytest.raises(ValueError, match="method 'adam' is invalid; allowed: bp, "):
        spec("adam")
    qzo = spec("qzo_ff")
    assert qzo.forwards_per_step(12, {"difference": "median"}) == qzo.forwards_per_step(6) == 12
    assert SCOPES == ("ft", "lp", "sparse", "dvpt", "ln", "bias")


def test_registry_and_config_validation_import_no_torch():
    code = "import sys, fwdgrad.methods, fwdgrad.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
