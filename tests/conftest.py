"""Shared test settings: the tolerance table, GPU marks and tiny-model fixtures."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # no GPU: Triton kernels run under the interpreter (set before any kernel module is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --- tolerance table (STYLE.md) ----------------------------------------------------------
# integer codes, pack/unpack, save/load: exact (torch.equal)
DEQUANT_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}  # kernel vs reference
MATMUL_REL = {torch.float16: 1e-3, torch.bfloat16: 5e-3, torch.float32: 1e-6}  # fused matmul vs reference
# PyTorch's CPU int4 kernel vs reference (fp32 or bf16 inputs): x, the scales, the zero offsets and the
# output are rounded to bf16, and an offset's rounding is shared by its whole group (worst of 480
# random cases: 4.4e-3 from fp32 inputs, 5.8e-3 from bf16)
CPU_INT4_REL = 1e-2
# PyTorch's CPU int8-weight kernel vs reference (LLM.int8): each integer sum comes back rounded to bf16
# (at most 2**-8 of it); weight-only also rounds x to bf16 (norm-relative error measured 1.3e-3 to
# 2.4e-3 on random layers)
CPU_INT8_REL = 5e-3
RTN4_G128_MAX_PPL_RATIO = 1.5  # real model: 4-bit RTN g128 perplexity / fp32 perplexity


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in fp32: what ``MATMUL_REL`` and the tests' other relative bounds limit."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def input_grad(mod: torch.nn.Module, x: torch.Tensor, kernel: str) -> torch.Tensor:
    """The gradient of ``mod(x).sum()`` with respect to ``x``, through ``kernel`` (sets ``mod.kernel``)."""
    x = x.detach().requires_grad_(True)
    mod.kernel = kernel
    mod(x).sum().backward()
    return x.grad


def correlated_layer(n: int, k: int, rows: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[n, k]`` and ``rows`` correlated inputs ``[rows, k]`` with uneven channel scales,
    like a real layer's (the data the GPTQ-style solver tests hold their error bounds on)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = (torch.randn(rows, k, generator=g) @ mix) * torch.logspace(-1, 0.5, k)[torch.randperm(k, generator=g)]
    return w, x


def calib_ids(nsamples: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    """Random calibration tokens for the tiny byte-vocabulary models: int64 ``[nsamples, seqlen]``."""
    return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def folder_digest(folder) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` by relative path: equal digests, identical bytes."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- tiny random models ------------------------------------------------------------------

def byte_tokenizer():
    """A 256-symbol byte-level tokenizer (no merges), saved and reloaded like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tok.id_to_token(10))


def grouped_layer(n: int, k: int, group_size: int, act_order: bool, *, bias: bool = True, seed: int = 0,
                  unit: bool = False, bits: int = 4) -> torch.nn.Module:
    """An ``IntGroupedLinear`` with random codes, zeros and scales (``unit``: scales 1 and zeros 0,
    so the weight is its codes); ``act_order``: ``g_idx`` permuted."""
    from lowbit.formats.int_grouped import IntGroupedLinear

    g = torch.Generator().manual_seed(seed)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    if unit:
        scales, zeros = torch.ones(groups, n, dtype=torch.float16), torch.zeros(groups, n, dtype=torch.int64)
    else:
        scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
        zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    b = torch.randn(n, generator=g).half() if bias else None
    return IntGroupedLinear.from_quantized(q, scales, zeros, g_idx, bits=bits, group_size=group_size, bias=b)


# AQLM layers of the CPU kernels' tests: (C, nbits) 2x8 and 1x16 (int16 codes), 7-bit codes in int8
# (negative from 64), three small codebooks; (N, K, ig) groups of 8 (AQLM's) and of 4, K not a
# multiple of 8 groups
AQLM_SCHEMES = [(2, 8), (1, 16), (2, 7), (3, 4)]
AQLM_SHAPES = [(40, 96, 8), (17, 64, 8), (24, 60, 4)]


def aqlm_layer(n: int, k: int, ig: int, n_codebooks: int, nbits: int, *, bias: bool = True, seed: int = 0,
               og: int = 1, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """An ``AqlmLinear`` with random codes over the whole index range (so the signed storage holds
    negative values), codebooks, scales and bias."""
    from lowbit.formats.codebook import AqlmLinear

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2**nbits, (n // og, k // ig, n_codebooks), generator=g)
    books = torch.randn(n_codebooks, 2**nbits, og, ig, generator=g)
    scales = torch.rand(n // og, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    return AqlmLinear.from_quantized(idx, books, scales, b, dtype=dtype)


def launch_keyword(monkeypatch, module, name: str) -> list:
    """The value of keyword ``name`` at each later call of ``module.launch`` (a Triton wrapper
    module's launcher; the launches still run)."""
    values, launch = [], module.launch

    def recorded(kernel, grid, *args, **kwargs):
        values.append(kwargs[name])
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(module, "launch", recorded)
    return values


def check_layout_rebuilt(mod: torch.nn.Module, held, buffer: str) -> None:
    """The layout ``held()`` returns (a ``QuantLinear.held_layout``) is built anew after the module's
    ``buffer`` is replaced, after a move (here a no-op one) and after a state-dict load."""
    before = held()
    setattr(mod, buffer, getattr(mod, buffer).clone())  # replaced
    assert held() is not before
    before = held()
    mod.to(torch.device("cpu"))  # a move drops the held layouts
    assert held() is not before
    before = held()
    mod.load_state_dict(mod.state_dict())  # a load drops them too
    assert held() is not before


def tiny_llama_model(seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    """A random LlamaForCausalLM: vocab 256, hidden 64, MLP 128 (by default), 4 heads (2 KV), tied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=10, pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model.eval()


def _save_tiny(folder):
    tiny_llama_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def reference_kernels(monkeypatch):
    """lowbit's side of a test against a peer runs through the reference, in fp32: such tests compare
    checkpoints, and the CPU kernels' bf16 products alone put lowbit's logits about 5e-3 from an
    fp16 peer's (measured against GPTQModel)."""
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")


@pytest.fixture()
def tiny_model_dir(tmp_path):
    """A folder with a tiny random Llama and its byte tokenizer (fresh per test)."""
    return _save_tiny(tmp_path / "tiny")


@pytest.fixture(scope="module")
def tiny_model_dir_module(tmp_path_factory):
    """Same as ``tiny_model_dir``, shared by a module's tests (do not modify it)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> dict:
    """``src``: a tiny plain model folder; ``good``: a valid RTN 4-bit g32 checkpoint of it made by
    ``lowbit quantize``. Shared by a module's tests (copy them before changing anything)."""
    from lowbit.cli import main

    root = tmp_path_factory.mktemp("checkpoint")
    src = _save_tiny(root / "src")
    good = root / "good"
    assert main(["quantize", str(src), "--out", str(good), "--bits", "4", "--group-size", "32"]) == 0
    return {"src": src, "good": good}
