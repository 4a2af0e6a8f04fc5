"""One evaluation row per model (perplexity, size, memory, time) and the demo table."""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.config import QuantConfig


@dataclass(frozen=True)
class EvalRow:
    """What one model costs and keeps; sizes in bytes, times in seconds."""

    label: str
    perplexity: float
    disk_bytes: int
    weight_bytes: int
    peak_bytes: int
    peak_kind: str
    eval_seconds: float
    quantize_seconds: float | None = None


def evaluate_folder(
    name_or_path: str | Path,
    *,
    label: str,
    tokens: int,
    seqlen: int,
    device: str = "cpu",
    kernel: str = "auto",
    quantize_seconds: float | None = None,
) -> EvalRow:
    """Load a plain or quantized model folder and measure it on WikiText-2 test."""
    from lowbit.api import from_pretrained
    from lowbit.checkpoint.loading import load_tokenizer
    from lowbit.eval.data import wikitext2
    from lowbit.eval.memory import PeakMemory, folder_bytes, model_weight_bytes
    from lowbit.eval.perplexity import text_perplexity
    from lowbit.models import resolve_model

    folder = resolve_model(str(name_or_path))
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer; perplexity needs one")
    gc.collect()
    with PeakMemory(torch.device(device)) as peak:
        model = from_pretrained(folder, device=device, kernel=kernel)
        start = time.perf_counter()
        ppl = text_perplexity(model, tokenizer, wikitext2("test"), seqlen=seqlen, max_tokens=tokens, progress=True)
        seconds = time.perf_counter() - start
    row = EvalRow(label, ppl, folder_bytes(folder), model_weight_bytes(model), peak.peak_bytes,
                  "peak RSS" if peak.device == "cpu" else "peak CUDA", seconds, quantize_seconds)
    del model
    gc.collect()
    return row


def quantize_folder(
    name_or_path: str | Path, config: QuantConfig, out: Path, *, device: str = "cpu", calib=None
) -> float:
    """Quantize a plain model folder into ``out``; returns the quantization time in seconds."""
    from lowbit.api import from_pretrained, save_quantized

    start = time.perf_counter()
    model = from_pretrained(name_or_path, quantization_config=config, calib=calib, device=device)
    seconds = time.perf_counter() - start
    save_quantized(model, out)
    del model
    gc.collect()
    return seconds


def run_demo(
    config: QuantConfig,
    *,
    out: Path | None,
    tokens: int,
    seqlen: int,
    device: str = "cpu",
    kernel: str = "auto",
    calib=None,
) -> str:
    """Quantize the embedded model with ``config``, evaluate it and the original, return the table."""
    from lowbit.models import default_causal_lm_path

    base = default_causal_lm_path()
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        dest = out or Path(tmp) / "quantized"
        qsec = quantize_folder(base, config, dest, device=device, calib=calib)
        rows = [
            evaluate_folder(base, label="fp32 (original)", tokens=tokens, seqlen=seqlen, device=device),
            evaluate_folder(dest, label=describe(config), tokens=tokens, seqlen=seqlen, device=device,
                            kernel=kernel, quantize_seconds=qsec),
        ]
    header = (f"SmolLM2-135M-Instruct, WikiText-2 test, first {tokens} tokens, {seqlen}-token windows, "
              f"device {device}")
    return f"{header}\n{format_table(rows)}"


def describe(config: QuantConfig) -> str:
    """Short label, e.g. ``rtn 4-bit g128 sym``, or the config's own ``label()``."""
    if hasattr(config, "label"):
        return config.label()
    parts = [config.quant_method]
    if hasattr(config, "bits"):
        parts.append(f"{config.bits}-bit")
    if hasattr(config, "group_size"):
        parts.append("per-channel" if config.group_size == -1 else f"g{config.group_size}")
    if hasattr(config, "sym"):
        parts.append("sym" if config.sym else "asym")
    return " ".join(parts)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_table(rows: list[EvalRow]) -> str:
    """A plain-text table; the first row is the reference for the ratio columns."""
    base = rows[0]
    head = ["model", "perplexity", "ppl ratio", "size on disk", "weights in memory", "peak memory",
            "eval time", "quantize time"]
    body = [
        [
            r.label,
            f"{r.perplexity:.3f}",
            f"{r.perplexity / base.perplexity:.3f}",
            f"{_mb(r.disk_bytes)} ({r.disk_bytes / base.disk_bytes:.2f}x)",
            f"{_mb(r.weight_bytes)} ({r.weight_bytes / base.weight_bytes:.2f}x)",
            f"{_mb(r.peak_bytes)} {r.peak_kind}",
            f"{r.eval_seconds:.1f} s",
            "-" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f} s",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
