"""End-to-end speed of a quantized causal LM against its original, in one run.

Each model is measured in turn on the same device with the same random prompts: prefill
tokens/s (one forward over the prompt at batch 1), decode tokens/s per batch size (greedy
``generate`` through the KV cache; see :mod:`lowbit.eval.speed`), bytes of weights, and peak
memory while it ran (CUDA peak allocation on a GPU, the process's resident-set high-water mark
on the CPU; see :mod:`lowbit.eval.memory`). :func:`run_isolated` loads and measures each model
in a fresh process, so that its peak is its own and not what an earlier model (or the
quantization of this one) left behind.
Optionally the quantized model runs again with fused projections (:mod:`lowbit.fusion`) and under
``torch.compile``. ``lowbit bench e2e`` prints
the table; ``bench/e2e.py`` times a Llama-7B-shaped model with CUDA-graph decode on a GPU.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.eval.memory import PeakMemory, model_weight_bytes, release_freed_memory
from lowbit.eval.speed import SpeedReport, measure_speed


@dataclass(frozen=True)
class E2ERow:
    """One model's end-to-end numbers."""

    label: str
    weight_bytes: int
    peak_bytes: int
    peak_method: str
    speed: SpeedReport

    def prefill_tokens_per_s(self) -> float:
        return self.speed.prompt_len / self.speed.prefill.median

    def as_dict(self) -> dict:
        return {"label": self.label, "weight_bytes": self.weight_bytes, "peak_bytes": self.peak_bytes,
                "peak_method": self.peak_method, "prefill_tokens_per_s": self.prefill_tokens_per_s(),
                **self.speed.as_dict()}


def bench_model(label: str, model: nn.Module, *, prompt_len: int = 128, new_tokens: int = 32,
                batch_sizes: Sequence[int] = (1,), repeats: int = 3, compile: bool = False) -> E2ERow:
    """Measure ``model`` (a transformers causal LM, on its device).

    ``compile`` wraps the model's forward in ``torch.compile(dynamic=True)`` first; its warm-up
    (one short generate per batch size) includes the compilation, which is not timed.
    """
    if compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    device = next(model.parameters()).device
    release_freed_memory()
    with PeakMemory(device) as peak:
        speed = measure_speed(model, prompt_len=prompt_len, new_tokens=new_tokens, batch_sizes=batch_sizes,
                              repeats=repeats, warmup=1)
    return E2ERow(label, model_weight_bytes(model), peak.peak_bytes, peak.method, speed)


@dataclass(frozen=True)
class E2ESpec:
    """What one row measures: ``model`` (a plain or quantized folder, or ``"default"``), loaded
    with the unquantized parts in ``dtype`` on ``device``."""

    label: str
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False
    fuse: bool = False
    prompt_len: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = field(default=(1,))
    repeats: int = 3


def run_spec(spec: E2ESpec) -> E2ERow:
    """Load ``spec.model`` here and measure it."""
    from lowbit.api import from_pretrained

    model = from_pretrained(spec.model, dtype=getattr(torch, spec.dtype), device=spec.device, progress=False,
                            fuse=spec.fuse)
    return bench_model(spec.label, model, prompt_len=spec.prompt_len, new_tokens=spec.new_tokens,
                       batch_sizes=spec.batch_sizes, repeats=spec.repeats, compile=spec.compile)


def run_isolated(spec: E2ESpec) -> E2ERow:
    """:func:`run_spec` in a fresh (spawned) process: the peak memory is this model's alone.
    An error there is raised here."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(run_spec, (spec,))
    finally:
        pool.close()  # a clean exit (terminate would leak the pool's semaphores)
        pool.join()


def format_e2e(rows: Sequence[E2ERow]) -> str:
    """A markdown table; ratios are against the first row."""
    batches = sorted(rows[0].speed.decode)
    head = ["model", "weights MiB", "peak MiB", "prefill tok/s", *(f"decode tok/s (batch {b})" for b in batches),
            "prefill vs first", *(f"decode vs first (batch {b})" for b in batches)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        cells = [r.label, f"{r.weight_bytes / 2**20:.1f}", f"{r.peak_bytes / 2**20:.0f}",
                 f"{r.prefill_tokens_per_s():.0f}",
                 *(f"{r.speed.decode_tokens_per_s(b):.1f}" for b in batches),
                 f"{r.prefill_tokens_per_s() / base.prefill_tokens_per_s():.2f}x",
                 *(f"{r.speed.decode_tokens_per_s(b) / base.speed.decode_tokens_per_s(b):.2f}x" for b in batches)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
