"""Conv2d lowered to GEMMs with ``F.unfold`` (im2col), shared by both kernel families."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import IntPair, pair


class ConvGeom:
    """Validated conv2d geometry shared by the int and LUT convs."""

    def __init__(
        self,
        x_shape: torch.Size,
        w_shape: torch.Size,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
    ) -> None:
        if len(x_shape) != 4:
            raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
        if len(w_shape) != 4:
            raise ValueError(f"w_idx must be 4-D (O, C/groups, kH, kW), got shape {tuple(w_shape)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        n, c, h, w = x_shape
        o, cg, kh, kw = w_shape
        if c % groups or o % groups:
            raise ValueError(
                f"in_channels={c} and out_channels={o} must both be divisible by groups={groups}"
            )
        if cg * groups != c:
            raise ValueError(
                f"w_idx has {cg} input channels per group but input has {c} channels and "
                f"groups={groups} (expected {c // groups})"
            )
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        self.kernel = (kh, kw)
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        self.h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        self.w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if self.h_out < 1 or self.w_out < 1:
            raise ValueError(
                f"kernel {kh}x{kw} (dilation {self.dilation}) does not fit the padded input "
                f"{h + 2 * ph}x{w + 2 * pw}"
            )
        self.n, self.c, self.o, self.groups = n, c, o, groups
        self.h_in, self.w_in = h, w
        self.kg = cg * kh * kw

    def im2col(self, x: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """(N, C, H, W) float -> (G, N * L, Cg * kH * kW) patches, padded with ``pad_value``."""
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph), value=pad_value)
        cols = F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)
        # unfold orders the patch dimension as (channel, kh, kw) with channel slowest, so the
        # channels of group g are the contiguous slice g*Cg*kH*kW ... and match w_idx's layout.
        n, l_out = cols.shape[0], cols.shape[-1]
        cols = cols.view(n, self.groups, self.kg, l_out)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, n * l_out, self.kg)

    def valid_mask(self, device: torch.device) -> torch.Tensor:
        """(L, kH*kW) float64: 1 where the kernel tap reads the input, 0 where it reads padding."""
        ones = torch.ones((1, 1, self.h_in, self.w_in), dtype=torch.float64, device=device)
        mask = F.unfold(
            ones, self.kernel, dilation=self.dilation, padding=self.padding, stride=self.stride
        )
        return mask[0].transpose(0, 1)

    def to_nchw(self, y: torch.Tensor) -> torch.Tensor:
        """(N * L, O) -> (N, O, H_out, W_out)."""
        y = y.view(self.n, self.h_out * self.w_out, self.o).permute(0, 2, 1)
        return y.reshape(self.n, self.o, self.h_out, self.w_out).contiguous()
