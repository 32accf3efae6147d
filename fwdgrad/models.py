"""Model zoo: every model is built by name through :func:`build_model`.

All models take ``(N, in_channels, H, W)`` inputs (audio models take ``(N, 1, n_mels, T)`` features),
return logits of shape ``(N, num_classes)`` and trace with ``torch.fx.symbolic_trace`` (the GRU of
``crnn`` is a leaf module of the trace).

Pretrained torchvision weights are optional (``pretrained="IMAGENET1K_V1"`` etc.); they come from
torchvision's cache (``$TORCH_HOME/hub/checkpoints``) or a download. Where neither works (offline machines),
:class:`PretrainedWeightsUnavailable` says so in one line.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

from .config import BUILD_MODEL, check_model, locate, model_options
from .engine.blocks import Attention, Tokens

#: Layers that count as "parametrized layers" for :func:`head_layers` (linear probing of the last k).
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MultiheadAttention, nn.RNNBase)


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights are neither in the local torch cache nor downloadable."""


def _load_weights(enum: type[tvm.WeightsEnum], name: str) -> tuple[dict, int]:
    """Return (state_dict, num_classes) of torchvision weights ``enum[name]`` or raise a one-line error."""
    allowed = [w.name for w in enum]
    if name not in allowed:
        raise ValueError(f"unknown pretrained weights {name!r} for {enum.__name__}; allowed: {allowed}")
    weights = enum[name]
    try:
        state = weights.get_state_dict(progress=False)
    except OSError as err:  # URLError, socket and file errors
        raise PretrainedWeightsUnavailable(
            f"pretrained weights {enum.__name__}.{name} are not in the torch cache ({torch.hub.get_dir()}"
            f"/checkpoints) and cannot be downloaded here ({type(err).__name__}); use pretrained=None"
        ) from None
    return state, len(weights.meta["categories"])


def _new_conv(old: nn.Conv2d, in_channels: int, **overrides) -> nn.Conv2d:
    """A conv like ``old`` with ``in_channels`` inputs (and any overridden kwargs); fresh init."""
    kw = dict(
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        groups=old.groups,
        bias=old.bias is not None,
    )
    kw.update(overrides)
    return nn.Conv2d(in_channels, old.out_channels, **kw)


def _adapt_in_channels(old: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """Replace an RGB stem conv for ``in_channels`` inputs; pretrained kernels are averaged over RGB."""
    if in_channels == old.in_channels:
        return old
    new = _new_conv(old, in_channels)
    if not pretrained:
        return new
    with torch.no_grad():
        new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


def _replace_linear(old: nn.Linear, num_classes: int) -> nn.Linear:
    return old if old.out_features == num_classes else nn.Linear(old.in_features, num_classes)


class ResNet8(nn.Module):
    """CIFAR-style ResNet-8: conv3x3 stem, three BasicBlocks (16w/32w/64w ch, strides 1/2/2), GAP, linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 64))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(c1, c1)
        self.layer2 = BasicBlock(c1, c2, stride=2, downsample=_shortcut(c1, c2, 2))
        self.layer3 = BasicBlock(c2, c3, stride=2, downsample=_shortcut(c2, c3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def resnet8(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-8 (78k parameters at width 1 with 10 classes)."""
    return ResNet8(num_classes, in_channels, width)


def resnet18(
    num_classes: int, in_channels: int = 3, small_input: bool = False, pretrained: str | None = None
) -> nn.Module:
    """torchvision ResNet-18; ``small_input`` swaps the 7x7/2 stem + maxpool for a conv3x3/1 (<= 32 px)."""
    if pretrained is None:
        model = tvm.resnet18(weights=None, num_classes=num_classes)
    else:
        state, n = _load_weights(tvm.ResNet18_Weights, pretrained)
        model = tvm.resnet18(weights=None, num_classes=n)
        model.load_state_dict(state)
        model.fc = _replace_linear(model.fc, num_classes)
    if small_input:
        model.conv1 = _new_conv(model.conv1, in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = _adapt_in_channels(model.conv1, in_channels, pretrained is not None)
    return model


def mobilenet_v2(
    num_classes: int,
    in_channels: int = 3,
    width_mult: float = 1.0,
    small_input: bool = False,
    pretrained: str | None = None,
) -> nn.Module:
    """torchvision MobileNetV2; ``small_input`` makes the first conv stride 1 (overall stride 16, not 32)."""
    if pretrained is None:
        model = tvm.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    else:
        if width_mult != 1.0:
            raise ValueError(f"pretrained MobileNetV2 weights need width_mult=1.0, got {width_mult}")
        state, n = _load_weights(tvm.MobileNet_V2_Weights, pretrained)
        model = tvm.mobilenet_v2(weights=None, num_classes=n)
        model.load_state_dict(state)
        model.classifier[1] = _replace_linear(model.classifier[1], num_classes)
    stem = model.features[0][0]
    stem = _adapt_in_channels(stem, in_channels, pretrained is not None)
    if small_input:
        stem.stride = (1, 1)
    model.features[0][0] = stem
    return model


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x ← x + attn(ln_1(x)); x ← x + mlp(ln_2(x)), after splicing in this
    layer's deep prompts when it has some (`add_prompts`)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.prompts: Tokens | None = None
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        if self.prompts is not None:
            x = self.prompts(x)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """Vision transformer (Dosovitskiy et al., ICLR 2021) on (C, H, W) inputs, written with the blocks the
    integer engine and the edge runtime run (`fwdgrad.engine.blocks`):

        patches = conv(p×p, stride p)(x) → (B, N, D);  x = cat(cls, patches) + pos
        x = encoder layers (pre-norm, `EncoderLayer`);  logits = head(ln(x)[:, 0])

    Rectangular inputs (spectrograms) take a (h, w) `image_size` and `patch_size`; a remainder that no
    patch covers is dropped, as the convolution does. `prompts` > 0 builds it with deep prompts
    (`add_prompts`), as a model trained in the "dvpt" scope is saved.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size,
        patch_size,
        hidden_dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int = 4,
        prompts: int = 0,
        prompt_init: str = "uniform",
    ):
        super().__init__()
        (h, w), (ph, pw) = _hw(image_size), _hw(patch_size)
        if h < ph or w < pw:
            raise ValueError(f"image_size={image_size!r} is smaller than patch_size={patch_size!r}")
        self.patch = nn.Conv2d(in_channels, hidden_dim, (ph, pw), (ph, pw))
        self.cls = Tokens(1, hidden_dim)
        self.pos = nn.Parameter(torch.empty(1, (h // ph) * (w // pw) + 1, hidden_dim).normal_(std=0.02))
        self.layers = nn.Sequential(
            *(EncoderLayer(hidden_dim, heads, mlp_ratio * hidden_dim) for _ in range(depth))
        )
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.head = nn.Linear(hidden_dim, num_classes)
        if prompts:
            add_prompts(self, prompts, prompt_init)

    def forward(self, x):
        x = self.cls(self.patch(x).flatten(2).transpose(1, 2)) + self.pos
        return self.head(self.ln(self.layers(x))[:, 0])


def _hw(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def add_prompts(model: nn.Module, count: int, init: str = "uniform", seed: int = 0) -> list[str]:
    """Deep visual prompt tuning (Jia et al., ECCV 2022): `count` learned tokens before every encoder layer
    of a `ViT`, after the class token; each layer's prompts replace the previous layer's prompt outputs.
    Returns the prompt parameters' names (what the "dvpt" scope trains besides the head)."""
    layers = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    if not layers:
        raise ValueError(
            f"deep prompts need a fwdgrad ViT (vit_tiny, ast_tiny); {type(model).__name__} has none"
        )
    if count < 1:
        raise ValueError(f"prompt count {count!r} is invalid; allowed: integers >= 1")
    dim = layers[0].ln_1.normalized_shape[0]
    for i, layer in enumerate(layers):
        layer.prompts = Tokens(count, dim, 1, 0 if i == 0 else count, init, seed + i, prompt=True)
    return [n for n, _ in model.named_parameters() if ".prompts." in f".{n}"]


def vit_tiny(
    num_classes: int,
    in_channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    patch_size: int | tuple[int, int] = 4,
    hidden_dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    mlp_ratio: int = 4,
    prompts: int = 0,
    prompt_init: str = "uniform",
    pretrained: str | None = None,
) -> nn.Module:
    """`ViT` with DeiT-tiny dims by default (192 wide, 12 deep, 3 heads, MLP 4x).

    ``image_size=224, patch_size=16, num_classes=1000`` is DeiT-tiny exactly (5,717,416 parameters).
    """
    if pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r}: no ViT-tiny weights ship with fwdgrad; allowed: None "
            "(load a checkpoint of your own with load_state_dict)"
        )
    return ViT(
        num_classes,
        in_channels,
        image_size,
        patch_size,
        hidden_dim,
        depth,
        heads,
        mlp_ratio,
        prompts,
        prompt_init,
    )


def ast_tiny(
    num_classes: int,
    in_channels: int = 1,
    input_size: tuple[int, int] = (40, 101),
    patch_size: tuple[int, int] = (8, 10),
    hidden_dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: int = 4,
    prompts: int = 0,
    prompt_init: str = "uniform",
) -> nn.Module:
    """Audio spectrogram transformer (AST, Gong et al., Interspeech 2021), tiny: log-mel patches → `ViT`
    encoder. The defaults take the keyword features (1, 40 mels, 101 frames) as 5 × 10 patches of 8 mels ×
    10 frames (50 tokens + class token), 64 wide, 4 layers, 4 heads (about 0.2M parameters)."""
    return ViT(
        num_classes,
        in_channels,
        input_size,
        patch_size,
        hidden_dim,
        depth,
        heads,
        mlp_ratio,
        prompts,
        prompt_init,
    )


def _conv_bn_relu(cin: int, cout: int, kernel, stride=1, padding=0, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


def ds_cnn(num_classes: int, in_channels: int = 1, channels: int = 64, blocks: int = 4) -> nn.Module:
    """DS-CNN for keyword spotting (Zhang et al. 2017, "Hello Edge", DS-CNN-S at the defaults).

    conv 10x4/2 -> ``blocks`` x (depthwise 3x3 + pointwise 1x1, each BN+ReLU) -> global avg pool -> linear.
    Input ``(N, 1, n_mels or n_mfcc, T)``.
    """
    layers = _conv_bn_relu(in_channels, channels, (10, 4), stride=2, padding=(5, 1))
    for _ in range(blocks):
        layers += _conv_bn_relu(channels, channels, 3, padding=1, groups=channels)
        layers += _conv_bn_relu(channels, channels, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


class CRNN(nn.Module):
    """Conv blocks (conv3x3-BN-ReLU-maxpool 2x2) -> mean over frequency -> GRU over time -> linear.

    Input ``(N, in_channels, F, T)``; the GRU reads the ``T / 2**len(channels)`` frames and its last hidden
    state feeds the classifier. Defaults give about 250k parameters.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 128),
        hidden: int = 172,
    ):
        super().__init__()
        layers, cin = [], in_channels
        for c in channels:
            layers += _conv_bn_relu(cin, c, 3, padding=1) + [nn.MaxPool2d(2)]
            cin = c
        self.conv = nn.Sequential(*layers)
        self.gru = nn.GRU(cin, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean(2).transpose(1, 2)  # (N, T', C)
        _, h = self.gru(x)
        return self.fc(h[-1])


def crnn(
    num_classes: int, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128), hidden: int = 172
) -> nn.Module:
    """Small CRNN for audio (see :class:`CRNN`); 250k parameters with 10 classes at the defaults."""
    return CRNN(num_classes, in_channels, tuple(channels), hidden)


def small_cnn(num_classes: int, in_channels: int = 1, width: int = 16) -> nn.Module:
    """Tiny CNN for 8x8 digits: conv3x3(w)-BN-ReLU, conv3x3/2(2w)-BN-ReLU, global avg pool, linear."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, width, 3, padding=1),
        *_conv_bn_relu(width, 2 * width, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "vit_tiny": vit_tiny,
    "ast_tiny": ast_tiny,
    "ds_cnn": ds_cnn,
    "crnn": crnn,
    "small_cnn": small_cnn,
}


def build_model(name: str, num_classes: int, in_channels: int, **kw) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`) with extra constructor kwargs ``kw``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kw)


def _accepts(fn: Callable, name: str, through_kwargs: bool) -> bool:
    """Whether ``fn`` names parameter ``name`` (or, with ``through_kwargs``, takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (some builtins)
        return False
    kinds = {p.kind for p in params.values()}
    return name in params or (through_kwargs and inspect.Parameter.VAR_KEYWORD in kinds)


def build_from_config(spec: Mapping[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    """The model of a `model` config node: the zoo (``_target_: fwdgrad.models.build_model``, ``name``,
    options) or any importable callable returning an ``nn.Module`` (``model._target_=...``).

    A callable of your own gets its options (`fwdgrad.config.model_options`: the node without ``_target_``,
    the ``name`` label and the zoo's leftovers), ``num_classes`` when it names it or takes ``**kwargs``
    (torchvision's builders), ``in_channels`` only when it names it. Then the model is made to fit the data:
    a first ``Conv2d`` with another input channel count is replaced by a fresh one taking ``in_channels``
    (torchvision models expect RGB), and a last ``nn.Linear`` with another output count by a fresh one with
    ``num_classes`` outputs (the same head rule as :func:`head_layers`)."""
    spec = dict(spec)
    target = spec.get("_target_", BUILD_MODEL)
    if target == BUILD_MODEL:
        return instantiate(spec, num_classes=num_classes, in_channels=in_channels)
    fn = locate(target)
    if not callable(fn):
        check_model(spec)  # the one-line error
    extra = {"num_classes": num_classes} if _accepts(fn, "num_classes", True) else {}
    extra |= {"in_channels": in_channels} if _accepts(fn, "in_channels", False) else {}
    node = {"_target_": target, "_convert_": "all", **model_options(spec)} | extra
    try:
        model = instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__ or e
        args = ", ".join(f"{k}={v!r}" for k, v in node.items() if not k.startswith("_"))
        raise ValueError(f"model._target_={target!r} failed with ({args}): {cause}".splitlines()[0]) from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={target!r} returned a {type(model).__name__}; allowed: nn.Module")
    _fit_input(model, in_channels)
    _fit_output(model, num_classes)
    return model


def _fit_input(model: nn.Module, in_channels: int) -> None:
    """Replace a first Conv2d that takes another number of channels (fresh initialisation)."""
    modules = dict(model.named_modules())
    first = next((n for n in _forward_order(model) if isinstance(modules.get(n), LAYER_TYPES)), None)
    conv = modules.get(first)
    if isinstance(conv, nn.Conv2d) and conv.in_channels != in_channels:
        _set_module(model, first, _new_conv(conv, in_channels))


def _fit_output(model: nn.Module, num_classes: int) -> None:
    """Replace a last nn.Linear with another number of outputs (fresh initialisation)."""
    name = head_layers(model, 1)[0]
    head = model.get_submodule(name)
    if isinstance(head, nn.Linear) and head.out_features != num_classes:
        _set_module(model, name, nn.Linear(head.in_features, num_classes))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _forward_order(model: nn.Module) -> list[str]:
    """Module names in the order ``forward`` calls them (fx trace; registration order if untraceable)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any trace failure: fall back to registration order
        return [name for name, _ in model.named_modules()]
    return list(dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"))


def head_layers(model: nn.Module, k: int) -> list[str]:
    """Qualified names of the last ``k`` parametrized layers (:data:`LAYER_TYPES`) in forward order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    modules = dict(model.named_modules())
    layers = [n for n in _forward_order(model) if isinstance(modules.get(n), LAYER_TYPES)]
    if k > len(layers):
        raise ValueError(f"k={k} but the model has only {len(layers)} parametrized layers")
    return layers[-k:]


def head_params(model: nn.Module, k: int) -> list[str]:
    """Parameter names of the last ``k`` parametrized layers: the trainable set of "lp" (linear probing)."""
    layers = head_layers(model, k)
    return [n for n, _ in model.named_parameters() if any(n.startswith(layer + ".") for layer in layers)]


#: what the scopes beyond ft/lp/sparse train besides the head
SCOPE_PARTS = {"dvpt": "deep prompt tokens (fwdgrad.models.add_prompts)", "ln": "LayerNorm", "bias": "bias"}


def scope_params(model: nn.Module, scope: str, lp_layers: int = 1) -> list[str]:
    """Parameter names the training scope trains: every one ("ft", "sparse"), the last `lp_layers` layers'
    ("lp"), or a transformer's deep prompts ("dvpt") or LayerNorm affine parameters ("ln"), or every bias
    ("bias": a parameter whose own name contains "bias": conv/linear, BatchNorm and LayerNorm biases, a GRU's
    bias_ih/bias_hh; TinyTL, Cai et al., NeurIPS 2020) plus the head's."""
    if scope in ("ft", "sparse"):
        return [n for n, _ in model.named_parameters()]
    head = head_params(model, lp_layers)
    if scope == "lp":
        return head
    if scope == "bias":
        chosen = [n for n, _ in model.named_parameters() if "bias" in n.rpartition(".")[2]]
    else:
        kind = Tokens if scope == "dvpt" else nn.LayerNorm
        owners = [n for n, m in model.named_modules() if isinstance(m, kind) and getattr(m, "prompt", True)]
        chosen = [n for n, _ in model.named_parameters() if n.rpartition(".")[0] in owners]
    if not chosen:
        raise ValueError(f"training scope {scope!r} found no {SCOPE_PARTS[scope]} in {type(model).__name__}")
    return chosen + [n for n in head if n not in chosen]


class _BlockTracer(torch.fx.Tracer):
    """Traces through nn.Sequential containers only: every other module is one call (a block)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, nn.Sequential)


@dataclass(frozen=True)
class Segment:
    """Consecutive blocks of a chain model (:func:`checkpoint_segments`): its fx nodes, run on the model's own
    modules and parameters. ``modules``: the qualified names of the blocks it calls."""

    model: nn.Module
    nodes: tuple[torch.fx.Node, ...]

    @property
    def modules(self) -> list[str]:
        return [n.target for n in self.nodes if n.op == "call_module"]

    def __call__(self, x):
        env: dict[torch.fx.Node, Any] = {}

        def value(a: torch.fx.Node):  # a chain node reads the previous one (x for the first) and attributes
            if a.op == "get_attr":
                return functools.reduce(getattr, a.target.split("."), self.model)
            return env.get(a, x)

        for n in self.nodes:
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), value)
            if n.op == "call_module":
                env[n] = self.model.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:  # call_method
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        return env[self.nodes[-1]]


def model_blocks(model: nn.Module) -> list[list[torch.fx.Node]]:
    """The model's forward as a chain of blocks: its fx trace through nn.Sequential containers (every other
    module a leaf), in which every op reads only the one before it (and parameters). A block is a module
    call and the function calls after it; an in-place module (``inplace=True``, e.g. ReLU) joins the block
    before it, so that no checkpointed segment modifies its own input; an unpacked value nobody reads (the
    GRU output of ``_, h = gru(x)``) is skipped. One-line ValueError for a model whose
    forward is no such chain (a skip connection or a second input outside a module)."""
    name = type(model).__name__
    try:
        graph = _BlockTracer().trace(model)
    except Exception as e:  # any trace failure
        raise ValueError(f"{name} cannot be segmented: torch.fx cannot trace it ({e})".splitlines()[0]) from e
    blocks: list[list[torch.fx.Node]] = []
    prev = None
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            prev = n if n.op == "placeholder" and prev is None else prev
            continue
        if n.target is operator.getitem and not n.users:  # an unpacked value that is never read
            continue
        reads = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if reads != [prev]:
            raise ValueError(
                f"{name} cannot be segmented: its forward is no chain of blocks ({n.name} reads "
                f"{[a.name for a in reads]}, not just {prev.name}); allowed: models whose forward passes one "
                "tensor from block to block (the zoo's resnet8, resnet18, mobilenet_v2, vit_tiny, ast_tiny, "
                "ds_cnn, crnn, small_cnn)"
            )
        if n.op == "output":
            break
        inplace = n.op == "call_module" and getattr(model.get_submodule(n.target), "inplace", False)
        if not blocks or (n.op == "call_module" and not inplace):
            blocks.append([])
        blocks[-1].append(n)
        prev = n
    return blocks


def frozen_prefix(model: nn.Module, trainable: list[str]) -> tuple[Segment, Segment, str] | None:
    """(prefix, suffix, first): the model's block chain (`model_blocks`) cut before the first block that
    calls a module owning a `trainable` parameter or reads one as an attribute, and the name of that block.
    Forward-only training runs the prefix once per batch and every perturbed pass from its output: the
    prefix's parameters are never perturbed, and it runs the same modules in the same order, so the losses
    are the same floats. None when the model is no chain or its first block trains."""
    try:
        blocks = model_blocks(model)
    except ValueError:
        return None
    owners = {p.rpartition(".")[0] for p in trainable} | set(trainable)

    def owns(target: str) -> bool:
        return any(o == target or o.startswith(target + ".") or target.startswith(o + ".") for o in owners)

    def trains(block: list[torch.fx.Node]) -> bool:
        reads = [a for n in block for a in n.all_input_nodes if a.op == "get_attr"]
        return any(n.op == "call_module" and owns(n.target) for n in block) or any(
            owns(a.target) for a in reads
        )

    first = next((i for i, b in enumerate(blocks) if trains(b)), 0)
    if first == 0:
        return None
    nodes = [tuple(x for b in part for x in b) for part in (blocks[:first], blocks[first:])]
    return Segment(model, nodes[0]), Segment(model, nodes[1]), _block_name(blocks[first])


def _block_name(block: list[torch.fx.Node]) -> str:
    return next((n.target for n in block if n.op == "call_module"), block[0].name)


def checkpoint_segments(model: nn.Module, segments: int | None = None) -> list[Segment]:
    """`model_blocks` in ``segments`` consecutive segments of as equal block counts as can be (the first ones
    one block longer), for activation checkpointing (bp_ckpt). ``None``: round(sqrt(blocks)), at least 2
    (Chen et al. 2016: sqrt(n) segments keep O(sqrt(n)) activations). One-line ValueError for a count outside
    2..blocks."""
    blocks = model_blocks(model)
    n = len(blocks)
    k = max(2, round(math.sqrt(n))) if segments is None else segments
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= n:
        raise ValueError(
            f"method.segments={segments!r} is invalid for {type(model).__name__}; allowed: integers 2..{n} "
            f"(its blocks: {', '.join(_block_name(b) for b in blocks)})"
        )
    out, start = [], 0
    for i in range(k):
        size = n // k + (i < n % k)
        out.append(Segment(model, tuple(x for b in blocks[start : start + size] for x in b)))
        start += size
    return out
