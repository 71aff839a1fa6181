"""ONNX export of a DDQ model in standard operators, checked in ONNX Runtime.

Per quantizer mode (opset 20 by default, 18..23; nothing outside the default ONNX domain):

* **uniform** weights: an int8 (signed) or uint8 initializer holding the ``b``-bit codes,
  then ``DequantizeLinear``: per tensor, or per channel (``axis=0``, a ``(C,)`` scale
  vector and a ``(C,)`` zero point, all equal) for per-channel weights. When a BatchNorm
  follows the conv, its per-channel scale is folded into the (then per-channel,
  ``axis=0``) dequantization scale and its bias into the conv bias: the integer weights
  stay exactly the ``b``-bit grid.
* **uniform** activations: ``QuantizeLinear`` to uint8 (zero point ``2**(b-1)`` for a
  signed grid), a ``Clip`` on the integer codes to the ``b``-bit range (for ``b < 8``),
  ``DequantizeLinear``. ONNX Runtime fuses
  ``DequantizeLinear -> Conv -> QuantizeLinear`` into its integer ``QLinearConv`` kernel.
  A float ``Relu``/``Clip`` (ReLU6) feeding a ``QuantizeLinear`` is moved after it, onto
  the integer codes (exact: quantization is monotone, so it commutes with clamping), which
  lets the fusion happen for ReLU6 networks too.
* **adaptive** weights: a uint8 initializer of level indices, ``Cast`` to int64,
  ``Gather`` on the ``2**b`` table; per-channel weights then ``Mul`` by their channel
  scales, shaped ``(C, 1, ...)`` to broadcast over axis 0 (the same float32 multiply as
  in training, so the weights are exact).
* **adaptive** activations: a binary search over the ``2**b - 1`` thresholds in ``b``
  steps of ``Gather``/``Greater``/``Where`` (O(N b) work, never N x 2**b), then
  ``Gather`` on the table.
* BatchNorm not folded: per-channel ``Mul`` and ``Add``.
* output quantizers (``DDQConfig(integer_graph=True)``): a ``QuantizeLinear``/
  ``DequantizeLinear`` pair on the module's output, like an input quantizer; where it is
  also a reader's input quantizer, the reader's second pair is dropped (same grid, exact),
  so ONNX Runtime fuses every conv, matmul and residual add into integer kernels.

The graph is captured with ``torch.onnx.export(..., dynamo=True)``; the deploy modules are
swapped for thin modules that call custom ops (``ddq_onnx::*``) with their own ONNX
translations, so the emitted pattern is exactly the one described, not whatever a
decomposition would produce.

Files, one concern each: :mod:`.ops` (the custom ops and their ONNX translations),
:mod:`.layers` (per-layer handlers: each deploy module in its exportable form),
:mod:`.passes` (graph passes: BatchNorm folding, clamps onto integer codes, dropping a
requantization to the same grid),
:mod:`.export` (the entry point, :func:`export_onnx`).
"""

from .export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "export_onnx"]
