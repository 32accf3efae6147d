"""Float building blocks of transformers written as the ops the integer engine has, so that `convert` maps
every one of them to an integer node:

* `Attention`: multi-head self-attention as q/k/v linears, ``unflatten``/``transpose``, two ``matmul`` and a
  ``softmax`` (the 1/sqrt(d_head) score scale is folded into the q projection);
* `Tokens`: learned tokens spliced into a sequence (a class token, or deep visual prompts), which the
  engine keeps as trainable integer tensors on the sequence's activation scale;
* `decompose_attention`: replaces every ``nn.MultiheadAttention`` of a model (torchvision's
  VisionTransformer uses it) by the equivalent `Attention`, before tracing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class Attention(nn.Module):
    """Self-attention over x (B, N, D) with `heads` heads of d = D/heads:

        q = x·(W_q/√d)ᵀ + b_q/√d,  k = x·W_kᵀ + b_k,  v = x·W_vᵀ + b_v       (per head)
        y = proj( softmax(q·kᵀ) · v )

    The score scale 1/√d lives in the q projection (`from_multihead` folds it in; a new module starts with
    it in its initial weights), so the graph holds no float multiply.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"attention width {dim} is not divisible by heads={heads}; allowed: divisors of {dim}"
            )
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        with torch.no_grad():
            self.q.weight.mul_((dim // heads) ** -0.5)

    def forward(self, x):
        def split(t):  # (B, N, D) -> (B, heads, N, d)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.matmul(q, k.transpose(-2, -1)).softmax(-1)
        return self.proj(torch.matmul(a, v).transpose(1, 2).flatten(2))

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> Attention:
        """The function of a batch-first self-attention `mha` (no extra k/v biases, no zero attention)."""
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
            raise ValueError(
                "nn.MultiheadAttention can be decomposed only with batch_first=True, one embedding width for "
                "q/k/v, no bias_k/bias_v and add_zero_attn=False"
            )
        dim, heads = mha.embed_dim, mha.num_heads
        out = cls(dim, heads)
        w = mha.in_proj_weight.detach().chunk(3)
        b = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (torch.zeros(dim),) * 3
        scale = (dim // heads) ** -0.5
        with torch.no_grad():
            for lin, wi, bi, s in zip((out.q, out.k, out.v), w, b, (scale, 1.0, 1.0)):
                lin.weight.copy_(wi * s)
                lin.bias.copy_(bi * s)
            out.proj.weight.copy_(mha.out_proj.weight)
            out.proj.bias.copy_(mha.out_proj.bias if mha.out_proj.bias is not None else torch.zeros(dim))
        return out


class _SelfAttentionCall(nn.Module):
    """`Attention` behind nn.MultiheadAttention's call signature (self-attention, no masks)."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.attention = attention

    def forward(
        self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None, **_
    ):
        if attn_mask is not None or key_padding_mask is not None:
            raise ValueError("a decomposed attention takes no attention or padding masks")
        return self.attention(query), None


def decompose_attention(model: nn.Module) -> nn.Module:
    """Replace (in place) every nn.MultiheadAttention of `model` by the equivalent `Attention`; returns the
    model. It must be called as self-attention (query = key = value), as vision transformers do."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.MultiheadAttention):
            parent, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                attr,
                _SelfAttentionCall(Attention.from_multihead(mod)),
            )
    return model


class Tokens(nn.Module):
    """Learned tokens (count, D) spliced into a sequence x (B, N, D) at position `at`, replacing `drop`
    tokens there:  y = cat(x[:, :at], tokens, x[:, at + drop:]).

    A class token is ``Tokens(1, D)``; deep visual prompts (Jia et al., ECCV 2022) are ``Tokens(p, D, at=1)``
    at the first encoder layer and ``Tokens(p, D, at=1, drop=p)`` at every later one (each layer's prompts
    replace the previous layer's prompt outputs; `prompt` marks them). init: "zeros" or "uniform"
    (Xavier-uniform, as VPT).
    """

    def __init__(
        self,
        count: int,
        dim: int,
        at: int = 0,
        drop: int = 0,
        init: str = "zeros",
        seed: int = 0,
        prompt=False,
    ):
        super().__init__()
        self.prompt = prompt
        if count < 1 or at < 0 or drop < 0:
            raise ValueError(f"Tokens(count={count}, at={at}, drop={drop}): count >= 1, at >= 0, drop >= 0")
        self.at, self.drop = at, drop
        self.tokens = nn.Parameter(torch.zeros(1, count, dim))
        if init == "uniform":
            bound = math.sqrt(6.0 / (count + dim))
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                self.tokens.uniform_(-bound, bound, generator=g)
        elif init != "zeros":
            raise ValueError(f"token init {init!r} is invalid; allowed: 'zeros', 'uniform'")

    def forward(self, x):
        t = self.tokens.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.at], t, x[:, self.at + self.drop :]], 1)
