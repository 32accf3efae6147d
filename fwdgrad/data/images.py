"""Conversion of uint8 image arrays to the float tensors every image loader returns."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_float_images(
    array: np.ndarray | torch.Tensor,
    size: int | None = None,
    scale: float = 255.0,
    channels_last: bool = False,
) -> torch.Tensor:
    """Turn images (N,H,W), (N,C,H,W) or, with ``channels_last``, (N,H,W,C) into float32 (N,C,H,W).

    Pixels are divided by ``scale`` (255 for uint8 pixels, 16 for the 8x8 digits) so they lie in
    [0, 1]. ``size`` resizes to ``size x size`` by bilinear interpolation, a convex combination of
    neighbouring pixels (antialiased when shrinking), so values stay in [0, 1].
    """
    x = torch.as_tensor(np.asarray(array)).to(torch.float32) / scale
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4 and channels_last:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N,H,W), (N,C,H,W) or (N,H,W,C), got {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        if size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()
