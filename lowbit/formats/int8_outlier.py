"""``Int8Linear``: LLM.int8 -- row-wise absmax int8 weights with fp outlier columns at run time.

Buffers (bitsandbytes' ``Linear8bitLt`` state dict, which is also its checkpoint layout):

=============  =======  =========  ====================================================
name           dtype    shape      meaning
=============  =======  =========  ====================================================
weight         int8     ``[N, K]`` ``CB = round(127 * W / SCB)``, row-major
SCB            fp32     ``[N]``    absmax of each weight row
weight_format  uint8    ``[]``     0 ("row"), the only layout bitsandbytes loads
bias           model    ``[N]``    optional
=============  =======  =========  ====================================================

Forward (Dettmers et al. 2022): input columns holding any ``|x| >= threshold`` (bitsandbytes'
comparison) are multiplied in floating point with the dequantized weight columns; every other
column is quantized per row of ``x`` to int8 and multiplied in integers with int32 accumulation.
``threshold = 0`` turns the decomposition off. With ``int8_activations=False`` (lowbit's own
option, not in the checkpoint) the activations stay in floating point and multiply the dequantized
weight ``CB * SCB / 127``: int8 weights only.

Kernels: the reference everywhere; on a GPU, the Triton kernel (:mod:`lowbit.kernels.triton_int8`,
no host synchronization) up to :data:`TRITON_MAX_ROWS` rows and ``torch._int_mm`` above; on a CPU,
``cpu-int8`` (:mod:`lowbit.kernels.cpu_int8`: PyTorch's int8-weight matmul, each integer sum
rounded to bf16).
"""

from __future__ import annotations

import torch

from lowbit.formats.base import QuantLinear
from lowbit.kernels import KernelImpl, always, register_kernel, triton_gpu_available
from lowbit.kernels import cpu_int8, ops, reference

ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector-wise absmax int8: ``w [N, K]`` (any float dtype) -> ``(CB int8 [N, K], SCB fp32 [N])``.

    ``CB = round(w * (127 / SCB))`` computed in fp32, as bitsandbytes' ``int8_vectorwise_quant``;
    an all-zero row has ``SCB = 0`` and codes 0.
    """
    scb = w.abs().amax(dim=1).float()  # [N]
    cb = torch.round(w.float() * (127.0 / scb).unsqueeze(1)).nan_to_num_(0.0)
    return cb.to(torch.int8), scb


class Int8Linear(QuantLinear):
    """LLM.int8 linear layer; see the module docstring for its buffers and forward."""

    format = "int8_outlier"

    def __init__(self, in_features: int, out_features: int, *, threshold: float = 6.0, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, int8_activations: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features)
        if threshold < 0:
            raise ValueError(f"llm_int8_threshold={threshold} must be >= 0 (0 turns outlier decomposition off)")
        self.threshold = float(threshold)
        self.int8_activations = bool(int8_activations)
        kw = {"device": device}
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, **kw))
        self.register_buffer("SCB", torch.zeros(out_features, dtype=torch.float32, **kw))
        self.register_buffer("weight_format", torch.tensor(ROW_FORMAT, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, **kw) if bias else None)

    @classmethod
    def from_linear(cls, w: torch.Tensor, bias: torch.Tensor | None, *, threshold: float = 6.0,
                    int8_activations: bool = True) -> "Int8Linear":
        """Quantize a weight ``w [N, K]`` (and keep ``bias [N]`` in its dtype).

        The weight is rounded to float16 first, as bitsandbytes does whatever the model's dtype,
        so the codes and ``SCB`` are bitsandbytes' bit for bit.
        """
        n, k = w.shape
        mod = cls(k, n, threshold=threshold, bias=bias is not None, int8_activations=int8_activations,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, device="meta")
        mod.weight, mod.SCB = quantize_rows(w.to(torch.float16))
        mod.weight_format = torch.tensor(ROW_FORMAT, dtype=torch.uint8, device=w.device)
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_int8_rows(self.weight, self.SCB)

    def prepare(self) -> None:
        """Give a CPU weight that PyTorch's int8-weight kernel cannot read in place only for its
        memory (rows off a 16-byte boundary, as a tensor loaded outside lowbit's loader may be,
        or a strided view) a contiguous copy of its own, so that ``cpu-int8`` takes it; called
        after a model load."""
        w = self.weight
        if (w.is_cpu and w.shape[1] % cpu_int8.K_MULTIPLE == 0 and cpu_int8.available()
                and not cpu_int8.weight_supported(w)):
            self.weight = w.clone(memory_format=torch.contiguous_format)  # PyTorch's CPU allocator: 64-byte aligned

    def extra_repr(self) -> str:
        if not self.int8_activations:
            return f"{super().extra_repr()}, weight-only"
        return f"{super().extra_repr()}, threshold={self.threshold}"


class _Int8Matmul(torch.autograd.Function):
    """The LLM.int8 product, differentiated as the product with the dequantized weight (as
    bitsandbytes' ``MatMul8bitLt`` is): rounding the activations to int8 has no useful gradient,
    and without this a frozen int8 layer would stop the gradient to every layer before it."""

    @staticmethod
    def forward(ctx, x, weight, scb, bias, threshold, int_matmul):
        ctx.weight = (weight, scb)  # frozen buffers, possibly inference tensors: not save_for_backward
        return reference.matmul_int8_outlier(x, weight, scb, threshold, bias, int_matmul=int_matmul)

    @staticmethod
    def backward(ctx, grad):
        return reference.int8_input_grad(grad, *ctx.weight), None, None, None, None, None


def _reference_forward(x: torch.Tensor, m: Int8Linear) -> torch.Tensor:
    if not m.int8_activations:
        return reference.matmul_int8_weight_only(x, m.weight, m.SCB, m.bias)
    return _Int8Matmul.apply(x, m.weight, m.SCB, m.bias, m.threshold, reference.int_matmul_exact)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b [N, K].T`` -> int32 ``[M, N]`` with ``torch._int_mm``."""
    return torch._int_mm(a, b.t())


def _int_mm_forward(x: torch.Tensor, m: Int8Linear) -> torch.Tensor:
    return _Int8Matmul.apply(x, m.weight, m.SCB, m.bias, m.threshold, int_mm)


TRITON_MAX_ROWS = 2048
"""The most rows the Triton path takes when ``torch._int_mm`` also applies: the most it was timed
at. On an H100 (``bench/kernels.py``, ``docs/performance.md``; 4096x4096, called eagerly) the
fused kernel took 173, 258 and 595 µs at 128, 512 and 2048 rows against 568, 827 and 817 µs for
the decomposition around ``torch._int_mm``, which also synchronizes with the host on the outlier
columns (so it cannot be captured in a CUDA graph). Above 128 fp16 rows the Triton path now
dequantizes the weight and runs one ``F.linear`` instead (``triton_int8.batch_path_for``), which
is not timed yet; nor is ``torch._int_mm`` above 2,048 rows."""


def _cpu_int8_supports(m: Int8Linear, x: torch.Tensor) -> bool:
    """A CPU input, eager (the weight's address is checked at every call, and a traced graph could
    meet another buffer), and a weight the kernel reads in place; weight-only has no backward here,
    so a gradient to record goes through the reference."""
    return (x.is_cpu and x.is_floating_point() and not torch.compiler.is_compiling()
            and cpu_int8.weight_supported(m.weight)
            and (m.int8_activations or not (x.requires_grad and torch.is_grad_enabled())))


def _cpu_int8_forward(x: torch.Tensor, m: Int8Linear) -> torch.Tensor:
    if not m.int8_activations:
        return cpu_int8.matmul_weight_only(x, m.weight, m.SCB, m.bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _Int8Matmul.apply(x, m.weight, m.SCB, m.bias, m.threshold, cpu_int8.int8_product)
    return cpu_int8.matmul_int8_outlier(x, m.weight, m.SCB, m.threshold, m.bias)


def _int_mm_supported(m: Int8Linear, x: torch.Tensor) -> bool:
    """CUDA only (on CPU ``torch._int_mm`` is slower than the reference's exact fp32 chunks); it
    needs M > 16 and K, N multiples of 8."""
    rows = x.numel() // x.shape[-1]
    return (m.int8_activations and x.is_floating_point() and x.device.type == "cuda" and rows > 16
            and m.in_features % 8 == 0 and m.out_features % 8 == 0)


def _triton_supports(m: Int8Linear, x: torch.Tensor) -> bool:
    """fp16/bf16 on a GPU, up to :data:`TRITON_MAX_ROWS` rows or where ``torch._int_mm`` does not
    apply (odd K or N, or weight-only)."""
    rows = x.numel() // x.shape[-1]
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and (rows <= TRITON_MAX_ROWS or not _int_mm_supported(m, x)))


def _triton_forward(x: torch.Tensor, m: Int8Linear) -> torch.Tensor:
    return ops.int8_outlier_linear(x, m.weight, m.SCB, m.bias, m.threshold, not m.int8_activations, m.held_calls)


register_kernel(
    Int8Linear.format,
    KernelImpl("reference", 0, available=always, supports=lambda m, x: x.is_floating_point(), fn=_reference_forward),
)
register_kernel(
    Int8Linear.format,
    KernelImpl("triton", 10, available=triton_gpu_available, supports=_triton_supports, fn=_triton_forward),
)
register_kernel(
    Int8Linear.format,
    KernelImpl("int_mm", 1, available=lambda: hasattr(torch, "_int_mm"), supports=_int_mm_supported,
               fn=_int_mm_forward),
)
register_kernel(
    Int8Linear.format,
    KernelImpl("cpu-int8", 5, available=cpu_int8.available, supports=_cpu_int8_supports, fn=_cpu_int8_forward,
               narrows=frozenset({torch.float32, torch.float16})),
)
