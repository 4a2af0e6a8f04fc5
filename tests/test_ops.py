"""The ``torch.ops.lowbit`` custom ops: schema and fake implementations (``opcheck``), forward and
backward against the reference, and a whole model traced by ``torch.compile(fullgraph=True)``
through the Triton path (the interpreter on CPU, fp32 activations; compiled on a GPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lowbit
import lowbit.kernels as K
from conftest import MATMUL_REL, calib_ids, rel_err, tiny_llama_model
from lowbit.formats.base import QuantLinear
from lowbit.formats.group_order import GroupOrdered
from lowbit.formats.int8_outlier import Int8Linear
from lowbit.formats.int8_outlier import _reference_forward as int8_reference_forward
from lowbit.kernels import reference
from test_group_order import random_module as random_int_grouped
from test_triton_blockwise4 import random_module as random_nf4
from test_triton_codebook import random_module as random_aqlm
from test_triton_int8 import random_case as random_int8

pytest.importorskip("triton")
ops = pytest.importorskip("lowbit.kernels.ops")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32  # fp32 keeps the interpreter's products exact


def int_grouped_case(m_rows, act_order):
    mod = random_int_grouped(40, 96, 4, 32, act_order, seed=m_rows).to(DEVICE)
    mod.bias = torch.randn(40).to(DEVICE, torch.float16)
    w = mod.group_ordered()
    args = (w.qweight, w.scales, w.qzeros, w.perm, mod.bias, w.bits, w.group_size)

    def want(x):
        return reference.matmul_int_grouped(x, mod.qweight, mod.scales, mod.qzeros, mod.g_idx, 4, mod.bias)

    return ops.int_grouped_matmul, args, want, 96


def nf4_case(m_rows, double_quant):
    mod = random_nf4(24, 128, 64, "nf4", double_quant, seed=m_rows)
    args = (mod.weight, mod.absmax, mod.quant_map, mod.nested_absmax, mod.nested_quant_map, mod.nested_offset,
            mod.bias, 64, 24, 128, None)

    def want(x):
        return reference.matmul_blockwise4(x, mod.weight, mod.absmax, mod.quant_map, 64, (24, 128),
                                           mod.nested_absmax, mod.nested_quant_map, mod.nested_offset, mod.bias)

    return ops.blockwise4_matmul, args, want, 128


def aqlm_case(m_rows, n_codebooks):
    mod = random_aqlm(24, 64, 8, n_codebooks, 16 // (2 * n_codebooks), seed=m_rows, dtype=DTYPE)
    args = (mod.codes, mod.codebooks, mod.scales, mod.bias)

    def want(x):
        return reference.matmul_codebook(x, mod.codes, mod.codebooks, mod.scales, mod.bias)

    return ops.codebook_matmul, args, want, 64


def int8_case(m_rows, threshold):
    _x, cb, scb, b = random_int8(m_rows, 24, 80, seed=m_rows, threshold=threshold)
    args = (cb, scb, b, threshold)
    mod = Int8Linear(80, 24, threshold=threshold, bias=True, device=DEVICE)
    mod.weight, mod.SCB, mod.bias = cb, scb, b

    def want(x):  # the reference forward, with its gradient through the dequantized weight
        return int8_reference_forward(x, mod)

    return ops.int8_outlier_matmul, args, want, 80


CASES = {
    "int4-g32": (int_grouped_case, False), "int4-g32-act-order": (int_grouped_case, True),
    "nf4": (nf4_case, False), "nf4-double-quant": (nf4_case, True),
    "aqlm-1x8": (aqlm_case, 1), "aqlm-2x4": (aqlm_case, 2),
    "int8": (int8_case, 0.0), "int8-outliers": (int8_case, 1.5),
}


@pytest.mark.parametrize("m_rows", [1, 5], ids=["M1", "M5"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matmul_op_forward_backward_and_opcheck(case, m_rows):
    make, variant = CASES[case]
    op, args, want, k = make(m_rows, variant)
    x = torch.randn(m_rows, k, generator=torch.Generator().manual_seed(7)).to(DEVICE, DTYPE)
    x.requires_grad_(True)
    got = op(x, *args)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(8)).to(DEVICE, DTYPE)
    (got * grad).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ref = want(x_ref)
    (ref * grad).sum().backward()
    assert got.shape == ref.shape and got.dtype == x.dtype
    tol = MATMUL_REL[DTYPE] if DTYPE != torch.float32 else 1e-5
    assert rel_err(got.detach(), ref.detach()) <= tol
    assert rel_err(x.grad, x_ref.grad) <= tol  # the gradient flows through the frozen quantized layer
    torch.library.opcheck(op, (x.detach(), *args))


ENTRY_POINTS = {"int_grouped_matmul": "int_grouped_linear", "blockwise4_matmul": "blockwise4_linear",
                "codebook_matmul": "codebook_linear", "int8_outlier_matmul": "int8_outlier_linear"}


def _entry_args(name: str, args: tuple) -> tuple:
    """The entry point's arguments for the op's ``args`` (the grouped-int one takes the layout whole)."""
    if name != "int_grouped_matmul":
        return args
    qweight, scales, qzeros, perm, bias, bits, group_size = args
    return GroupOrdered(qweight, scales, qzeros, perm, bits, group_size), bias


@pytest.mark.parametrize("case", ["int4-g32-act-order", "nf4-double-quant", "aqlm-2x4", "int8-outliers"])
def test_entry_points_take_the_op_only_when_traced_or_differentiated(case, monkeypatch):
    """The modules' entry points launch the wrapper directly in plain eager without a gradient to
    record (the same result), and go through the custom op when ``x`` needs a gradient and under
    ``torch.compile``, where the graph holds the op."""
    make, variant = CASES[case]
    op, args, want, k = make(3, variant)
    name = op._name  # the op's name in the lowbit namespace, and its attribute in ops
    entry = getattr(ops, ENTRY_POINTS[name])
    entry_args = _entry_args(name, args)
    calls = []

    def counted(*a):
        calls.append(1)
        return op(*a)

    monkeypatch.setattr(ops, name, counted)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(7)).to(DEVICE, DTYPE)
    with torch.no_grad():
        direct = entry(x, *entry_args)
    assert calls == [] and torch.equal(direct, op(x, *args))
    xg = x.clone().requires_grad_(True)
    entry(xg, *entry_args).sum().backward()
    assert calls == [1] and xg.grad is not None and torch.isfinite(xg.grad).all()
    monkeypatch.undo()  # dynamo must see the real op, not the counting wrapper

    graphs = []

    def capture(gm, _inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        traced = torch.compile(lambda t: entry(t, *entry_args), fullgraph=True, backend=capture)(x)
    assert torch.equal(traced, direct)
    assert any(f"lowbit.{name}" in target for target in graphs[0]), graphs


@pytest.mark.parametrize("case", ["int4-g32-act-order", "nf4-double-quant", "aqlm-2x4"])
def test_dequantize_ops_opcheck(case):
    make, variant = CASES[case]
    op, args, _want, _k = make(3, variant)
    if op is ops.int_grouped_matmul:
        qweight, scales, qzeros, perm, _bias, bits, group_size = args
        dq, dq_args = ops.int_grouped_dequantize, (qweight, scales, qzeros, perm, bits, group_size, 96, DTYPE)
    elif op is ops.blockwise4_matmul:
        dq, dq_args = ops.blockwise4_dequantize, args[:6] + (64, 24, 128, DTYPE)
    else:
        dq, dq_args = ops.codebook_dequantize, args[:3] + (DTYPE,)
    assert dq(*dq_args).dtype == DTYPE
    torch.library.opcheck(dq, dq_args)


# what each format's Triton path needs, less the GPU and the half-precision input
KERNEL_NEEDS = {
    "int_grouped": lambda m: m.group_ordered() is not None,
    "blockwise4": lambda m: True,
    "codebook": lambda m: m.codebooks.shape[2] == 1,
    "int8_outlier": lambda m: True,
}


def _triton_everywhere(monkeypatch):
    """Route every Triton-capable format through its Triton kernel on this device and dtype (the
    interpreter on CPU), recording which formats took it."""
    calls = []
    monkeypatch.setattr(K, "_AVAILABLE", {})  # availability is cached by kernel name
    for fmt, impls in K._KERNELS.items():
        patched = []
        for impl in impls:
            if impl.name == "triton":
                def fn(x, m, inner=impl.fn, fmt=fmt):
                    calls.append(fmt)
                    return inner(x, m)

                needs = KERNEL_NEEDS[fmt]
                impl = dataclasses.replace(impl, available=K.always, supports=lambda m, x, needs=needs: needs(m), fn=fn)
            patched.append(impl)
        monkeypatch.setitem(K._KERNELS, fmt, patched)
    return calls


def test_fullgraph_compile_through_the_triton_ops(monkeypatch):
    """A GPTQ act-order model (the cached group-ordered layout) traced through the Triton ops (the
    other ops' tracing is opcheck's aot-dispatch test above). A buffer replaced after the last eager
    call sends its layer to the reference path in the graph (which cannot rebuild the layout), and
    the logits stay right."""
    config = lowbit.GPTQConfig(bits=4, group_size=32, desc_act=True)
    model = lowbit.quantize(tiny_llama_model(), config, calib_ids(4, 32), progress=False).to(DEVICE, DTYPE)
    ids = calib_ids(1, 8, seed=5).to(DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("LOWBIT_KERNEL", "reference")
        want = model(ids).logits
        monkeypatch.delenv("LOWBIT_KERNEL")
        calls = _triton_everywhere(monkeypatch)
        eager = model(ids).logits  # builds every layout
        linears = len(calls)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
        traced = len(calls) - linears
        layer = model.model.layers[0].mlp.down_proj
        layer.qweight = layer.qweight.clone()
        torch._dynamo.reset()
        stale = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert linears == sum(isinstance(m, QuantLinear) for m in model.modules())  # all took the Triton path
    assert traced == linears  # and do so in the compiled graph
    assert len(calls) - linears - traced == linears - 1  # but not the layer whose buffer was replaced
    assert torch.equal(got, eager)
    # the Triton kernels and the stale layer's reference path round differently from the reference,
    # fp16 on a GPU, and each product's difference (MATMUL_REL) compounds through the model's layers
    tol = 3 * MATMUL_REL[DTYPE] if DTYPE != torch.float32 else 1e-5
    assert rel_err(eager, want) <= tol and rel_err(stale, eager) <= tol

def test_backward_with_buffers_made_under_inference_mode():
    """A model quantized under torch.inference_mode holds inference tensors; the ops' backward
    (and LLM.int8's) still pass the gradient to the input."""
    from lowbit.formats.int8_outlier import Int8Linear

    with torch.inference_mode():
        mod = random_int_grouped(40, 96, 4, 32, True, seed=2).to(DEVICE)
        int8 = Int8Linear.from_linear(torch.randn(24, 96), None, threshold=2.0)
    assert mod.qweight.is_inference() and int8.weight.is_inference()
    w = mod.group_ordered()
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE).requires_grad_(True)
    ops.int_grouped_matmul(x, w.qweight, w.scales, w.qzeros, w.perm, None, 4, 32).sum().backward()
    want = mod.dequantize().to(DEVICE).sum(0)  # d(sum y)/dx = column sums of W
    assert rel_err(x.grad[0], want) <= (MATMUL_REL[DTYPE] if DTYPE != torch.float32 else 1e-5)
    x8 = torch.randn(3, 96).requires_grad_(True)
    int8(x8).sum().backward()
    torch.testing.assert_close(x8.grad[0], int8.dequantize().sum(0))
