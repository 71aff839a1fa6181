"""What both kernel families share: operand types, argument validation, the epilogue.

Helpers of :mod:`ddq.deploy.kernels` (public within the package, not part of the API).
"""

from __future__ import annotations

import torch

Scalar = int | float | torch.Tensor
IntPair = int | tuple[int, int]

# float64 holds every integer up to 2**53 exactly, so a float64 GEMM of integer operands is
# exact as long as every partial sum is below that (BLAS-fast, and also works on CUDA).
F64_EXACT = 2**53
# Default bound on the elements of the LUT kernels' chunked temporaries.
DEFAULT_CHUNK = 1 << 22


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_int_tensor(t: object, name: str) -> torch.Tensor:
    t = check_tensor(t, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (quantization indices), got {t.dtype}")
    return t


def check_float_tensor(t: object, name: str) -> torch.Tensor:
    t = check_tensor(t, name)
    if not t.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {t.dtype}")
    return t


def as_tensor(value: Scalar, device: torch.device | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    # Python floats are doubles; torch.as_tensor would round them to the float32 default dtype.
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def float_param(
    value: Scalar | None, size: int, name: str, device: torch.device, default: float
) -> torch.Tensor:
    """Scalar or per-output-channel float parameter -> float64 tensor of shape (size,)."""
    if value is None:
        value = default
    t = as_tensor(value, device)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return per_channel(t, torch.float64, size, name)


def int_param(value: Scalar, size: int, name: str, device: torch.device) -> torch.Tensor:
    """Scalar or per-output-channel integer zero point -> int64 tensor of shape (size,)."""
    t = as_tensor(value, device)
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer zero point, got dtype {t.dtype}")
    # Zero points saved as floats are fine as long as they are whole numbers; a fractional
    # shift cannot be folded into an integer GEMM and belongs in the float offset.
    if t.is_floating_point() and not bool(torch.all(t == torch.round(t))):
        raise ValueError(
            f"{name} must be integer-valued; pass a fractional shift as the offset instead"
        )
    return per_channel(t, torch.int64, size, name)


def check_linear_shapes(x: torch.Tensor, w_idx: torch.Tensor, x_name: str) -> tuple[int, int]:
    """``(O, K)`` of a 2-D weight index, checked against the last dimension of ``x``."""
    if w_idx.dim() != 2:
        raise ValueError(f"w_idx must be 2-D (out_features, in_features), got {w_idx.dim()}-D")
    o, k = w_idx.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{x_name} last dimension must equal w_idx in_features={k}, got shape {tuple(x.shape)}"
        )
    return o, k


def check_int_operands(
    x_idx: torch.Tensor, w_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate integer activation/weight index operands; return them with ``(O, K)``."""
    x_idx = check_int_tensor(x_idx, "x_idx")
    w_idx = check_int_tensor(w_idx, "w_idx")
    return x_idx, w_idx, *check_linear_shapes(x_idx, w_idx, "x_idx")


def per_channel(t: torch.Tensor, dtype: torch.dtype, size: int, name: str) -> torch.Tensor:
    """``t`` as a ``(size,)`` tensor of ``dtype``: a scalar broadcasts, else one per channel."""
    flat = t.to(dtype).reshape(-1)
    if flat.numel() == 1:
        return flat.expand(size)
    if flat.numel() != size:
        raise ValueError(
            f"{name} must be a scalar or have {size} elements (one per output channel), "
            f"got shape {tuple(t.shape)}"
        )
    return flat


def scalar_float(value: Scalar, name: str) -> float:
    t = as_tensor(value, None)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return float(t)


def scalar_int(value: Scalar, name: str) -> int:
    t = as_tensor(value, None)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}")
    return int(int_param(t, 1, name, t.device)[0])


def pair(value: IntPair, name: str, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    mult: Scalar | None,
    add: Scalar | None,
    o: int,
) -> torch.Tensor:
    """``(y + bias) * mult + add`` with per-output-channel vectors broadcast over y's last dim."""
    if bias is not None:
        bias = check_float_tensor(bias, "bias")
        if bias.shape != (o,):
            raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
        y = y + bias.to(y.dtype)
    if mult is not None:
        y = y * float_param(mult, o, "mult", y.device, 1.0).to(y.dtype)
    if add is not None:
        y = y + float_param(add, o, "add", y.device, 0.0).to(y.dtype)
    return y
