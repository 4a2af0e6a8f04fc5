"""One evaluation row per model (perplexity, size, memory, time) and the demo table."""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.config import QuantConfig
from lowbit.eval.classification import Accuracy


@dataclass(frozen=True)
class EvalRow:
    """What one model costs and keeps; sizes in bytes, times in seconds.

    ``perplexity`` is WikiText-2 test (causal LMs); ``accuracy`` is SST-2 dev (``task`` names
    how: the encoder probe, or few-shot scoring of a causal LM).
    """

    label: str
    perplexity: float | None
    disk_bytes: int
    weight_bytes: int
    peak_bytes: int
    peak_kind: str
    eval_seconds: float
    quantize_seconds: float | None = None
    accuracy: Accuracy | None = None
    task: str | None = None
    auc: float | None = None  # few-shot only: ROC AUC of the label words' log-odds (classification.FewShot)


def evaluate_folder(
    name_or_path: str | Path,
    *,
    label: str,
    tokens: int,
    seqlen: int,
    device: str = "cpu",
    kernel: str = "auto",
    quantize_seconds: float | None = None,
    shots: int | None = None,
    examples: int | None = None,
    probe_base: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> EvalRow:
    """Load a plain or quantized model folder and measure it, its unquantized parts in ``dtype``
    (default fp32, as :func:`lowbit.from_pretrained`).

    A causal LM gets WikiText-2 test perplexity, and SST-2 ``shots``-shot accuracy on the first
    ``examples`` dev sentences when ``shots`` is given. An encoder gets SST-2 dev accuracy under
    the probe of the original encoder ``probe_base`` (default: the embedded all-MiniLM-L6-v2).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.api import from_pretrained
    from lowbit.checkpoint.loading import auto_class, load_tokenizer
    from lowbit.eval import classification as C
    from lowbit.eval.data import wikitext2
    from lowbit.eval.memory import PeakMemory, folder_bytes, model_weight_bytes
    from lowbit.eval.perplexity import text_perplexity
    from lowbit.models import default_encoder_path, resolve_model

    folder = resolve_model(str(name_or_path))
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer; evaluation needs one")
    causal = auto_class(AutoConfig.from_pretrained(folder, local_files_only=True)) is AutoModelForCausalLM
    if not causal and shots is not None:
        raise ValueError(f"{folder} is an encoder: few-shot scoring (--shots) needs a causal LM")
    probe = None if causal else C.reference_probe(resolve_model(str(probe_base)) if probe_base else default_encoder_path())
    gc.collect()
    ppl = acc = task = auc = None
    with PeakMemory(torch.device(device)) as peak:
        model = from_pretrained(folder, device=device, kernel=kernel, dtype=dtype)
        start = time.perf_counter()
        if causal:
            ppl = text_perplexity(model, tokenizer, wikitext2("test"), seqlen=seqlen, max_tokens=tokens, progress=True)
            if shots is not None:
                scores = C.fewshot_sst2_scores(model, tokenizer, shots, examples, progress=True)
                acc, auc, task = scores.accuracy, scores.auc, f"SST-2 {shots}-shot"
        else:
            acc, task = C.sst2_probe_accuracy(model, tokenizer, probe), "SST-2 probe"
        seconds = time.perf_counter() - start
    row = EvalRow(label, ppl, folder_bytes(folder), model_weight_bytes(model), peak.peak_bytes,
                  "peak RSS" if peak.device == "cpu" else "peak CUDA", seconds, quantize_seconds, acc, task, auc)
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
    has_ppl = any(r.perplexity is not None for r in rows)
    tasks = sorted({r.task for r in rows if r.task})
    has_auc = any(r.auc is not None for r in rows)
    head = ["model", *(["perplexity", "ppl ratio"] if has_ppl else []), *[f"{t} accuracy [95% CI]" for t in tasks],
            *(["few-shot AUC"] if has_auc else []), "size on disk", "weights in memory", "peak memory", "eval time",
            "quantize time"]
    body = []
    for r in rows:
        cells = [r.label]
        if has_ppl:
            cells += ["-", "-"] if r.perplexity is None else [
                f"{r.perplexity:.3f}",
                "-" if base.perplexity is None else f"{r.perplexity / base.perplexity:.3f}"]
        cells += [str(r.accuracy) if r.task == t else "-" for t in tasks]
        cells += ([] if not has_auc else ["-" if r.auc is None else f"{r.auc:.3f}"])
        cells += [
            f"{_mb(r.disk_bytes)} ({r.disk_bytes / base.disk_bytes:.2f}x)",
            f"{_mb(r.weight_bytes)} ({r.weight_bytes / base.weight_bytes:.2f}x)",
            f"{_mb(r.peak_bytes)} {r.peak_kind}",
            f"{r.eval_seconds:.1f} s",
            "-" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f} s",
        ]
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
