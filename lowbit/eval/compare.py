"""``lowbit compare``: quantization against pruning and distillation on the same models, data and budget.

Each method in :data:`METHODS` compresses the causal LM (perplexity on WikiText-2 test, weights
in memory, peak memory, prefill and decode speed, and with ``shots`` set its few-shot SST-2
accuracy) and, where it applies, the encoder (SST-2 accuracy through the fixed probe). Every row uses the same calibration windows and evaluation
tokens; distillation trains on its own budget of windows from the same text (its config says how
many). A finished row is cached as JSON in ``out/rows/``, so an interrupted run resumes where
it stopped; a method that raises is recorded as failed and the run goes on. The run writes
``results.json``, ``report.md`` and PNG plots (matplotlib, the ``eval`` extra).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint.safetensors_io import atomic_write
from lowbit.compress import DistillConfig, PruneConfig, compress, sparsity_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One row: the config applied to both models (None: leave them as they are).

    ``on_encoder=False`` where the method does not apply to the BERT encoder (AWQ has no block
    table for it). ``in_default=False``: run only when named (methods that take much longer).
    ``own_data=True``: the method draws its own windows from the calibration text (its config's
    ``nsamples`` and ``model_seqlen``) instead of the shared calibration batch (distillation
    trains on more text than quantizers calibrate on).
    """

    name: str
    label: str
    kind: str  # "baseline", "quantization", "pruning" or "distillation"
    config: object | None
    on_encoder: bool = True
    in_default: bool = True
    own_data: bool = False


GPTQ4 = lowbit.GPTQConfig(bits=4, group_size=128, sym=False, desc_act=True, damp_percent=0.01)
DISTILL = DistillConfig(steps=32, batch_size=4, nsamples=160, model_seqlen=128, learning_rate=5e-4)
NF4_DQ = lowbit.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("fp32", "fp32 original", "baseline", None),
    Method("rtn8", "RTN 8-bit g128", "quantization", lowbit.RtnConfig(bits=8, group_size=128)),
    Method("rtn4", "RTN 4-bit g128 asym", "quantization", lowbit.RtnConfig(bits=4, group_size=128, sym=False)),
    Method("gptq4", "GPTQ 4-bit g128 asym act-order", "quantization", GPTQ4),
    Method("awq4", "AWQ 4-bit g64", "quantization", lowbit.AwqConfig(bits=4, group_size=64), on_encoder=False),
    Method("gptq3", "GPTQ 3-bit g128 asym", "quantization", lowbit.GPTQConfig(bits=3, group_size=128, sym=False)),
    Method("int8", "LLM.int8", "quantization", lowbit.BitsAndBytesConfig(load_in_8bit=True)),
    Method("nf4", "NF4 double quant", "quantization", NF4_DQ),
    Method("int8wo", "LLM.int8 weights, fp activations", "quantization",
           lowbit.BitsAndBytesConfig(load_in_8bit=True, int8_activations=False), in_default=False),
    Method("nf4gptq", "NF4 double quant, GPTQ rounding", "quantization", NF4_DQ.replace(rounding="gptq"),
           in_default=False),
    Method("aqlm2x8", "AQLM 2x8 g8", "quantization", lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=8),
           in_default=False),
    Method("magnitude", "magnitude 50%", "pruning", PruneConfig(method="magnitude")),
    Method("wanda", "Wanda 50%", "pruning", PruneConfig(method="wanda")),
    Method("sparsegpt", "SparseGPT 50%", "pruning", PruneConfig(method="sparsegpt")),
    Method("sparsegpt24", "SparseGPT 2:4", "pruning", PruneConfig(method="sparsegpt", pattern="2:4")),
    Method("distill", "distilled, half the layers", "distillation", DISTILL, own_data=True),
]}
"""Every method ``compare`` knows, by name."""


@dataclass(frozen=True)
class CompareSettings:
    tokens: int = 4096  # WikiText-2 test tokens scored
    seqlen: int = 512  # perplexity window
    nsamples: int = 16  # calibration windows ...
    calib_seqlen: int = 256  # ... of this many tokens
    prompt_len: int = 64  # speed: prompt
    new_tokens: int = 8  # speed: generated tokens per sequence
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 1  # timed runs after a warm-up (a short generate) per batch size
    encoder: bool = True
    seed: int = 0
    shots: int | None = None  # SST-2 few-shot accuracy of the causal LM with this many shots (None: not scored)
    shot_examples: int | None = None  # ... on the first this many dev sentences (None: all 872)

    def key(self) -> dict:
        """The settings a cached row must match (the few-shot ones only when set, so rows cached
        before they existed still match a run without them)."""
        key = dict(self.__dict__, batch_sizes=list(self.batch_sizes))
        for name in ("shots", "shot_examples"):
            if key[name] is None:
                del key[name]
        return key


DEMO_METHODS = ("rtn4", "int8", "nf4", "gptq4", "wanda")
"""``lowbit demo --compare``: a few fast methods of each kind."""
DEMO_SETTINGS = CompareSettings(tokens=2048, nsamples=8, batch_sizes=(1,), repeats=1)


def _config_dict(config) -> dict | None:
    """The method's config as JSON data (part of a cached row's key: a changed config reruns it)."""
    return None if config is None else json.loads(json.dumps(dataclasses.asdict(config)))


def resolve_methods(names: Sequence[str] | None) -> list[Method]:
    """Methods by name (the default set when None); ``fp32`` always first. Unknown names: ``ValueError``."""
    if not names:
        return [m for m in METHODS.values() if m.in_default]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return [METHODS["fp32"], *[METHODS[n] for n in names if n != "fp32"]]


def _compress(method: Method, model, tokenizer, calib: torch.Tensor) -> dict:
    """Apply the method; returns the time it took and, for distillation, the loss curve."""
    losses: list[float] = []
    start = time.perf_counter()
    if method.config is not None:
        compress(model, method.config, None if method.own_data else calib, tokenizer=tokenizer, progress=False,
                 losses=losses)
    out = {"compress_seconds": time.perf_counter() - start}
    if losses:
        out["loss_curve"] = losses
    return out


def _lm_row(method: Method, folder: Path, tokenizer, calib: torch.Tensor, s: CompareSettings) -> dict:
    from lowbit.eval.classification import fewshot_sst2_scores
    from lowbit.eval.data import wikitext2
    from lowbit.eval.memory import PeakMemory, model_weight_bytes
    from lowbit.eval.perplexity import text_perplexity
    from lowbit.eval.speed import measure_speed

    gc.collect()
    start = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as peak:
        model = lowbit.from_pretrained(folder)
        done = _compress(method, model, tokenizer, calib)
        ppl = text_perplexity(model, tokenizer, wikitext2("test"), seqlen=s.seqlen, max_tokens=s.tokens)
        speed = measure_speed(model, prompt_len=s.prompt_len, new_tokens=s.new_tokens, batch_sizes=s.batch_sizes,
                              repeats=s.repeats, seed=s.seed)
        fewshot = {}
        if s.shots is not None:
            r = fewshot_sst2_scores(model, tokenizer, s.shots, s.shot_examples)
            acc = r.accuracy
            fewshot = {"fewshot_accuracy": acc.value, "fewshot_correct": acc.correct, "fewshot_total": acc.total,
                       "fewshot_ci95": list(acc.interval()), "fewshot_recalls": list(acc.recalls),
                       "fewshot_calibrated_accuracy": r.calibrated.value, "fewshot_auc": r.auc,
                       "fewshot_bias": r.bias}
    return {"perplexity": ppl, "weight_bytes": model_weight_bytes(model), "peak_bytes": peak.peak_bytes,
            "sparsity": sparsity_of(model), "speed": speed.as_dict(), **fewshot, **done,
            "seconds": time.perf_counter() - start}


def _encoder_row(method: Method, folder: Path, tokenizer, calib: torch.Tensor, probe) -> dict:
    from lowbit.eval.classification import sst2_probe_accuracy
    from lowbit.eval.memory import model_weight_bytes

    start = time.perf_counter()
    model = lowbit.from_pretrained(folder)
    done = _compress(method, model, tokenizer, calib)
    acc = sst2_probe_accuracy(model, tokenizer, probe)
    lo, hi = acc.interval()
    return {"accuracy": acc.value, "correct": acc.correct, "total": acc.total, "ci95": [lo, hi],
            "weight_bytes": model_weight_bytes(model), **done, "seconds": time.perf_counter() - start}


def run_compare(out: str | Path, methods: Sequence[str] | None = None, settings: CompareSettings = CompareSettings(),
                model: str | Path = "default", progress: bool = True) -> dict:
    """Run the comparison into ``out`` (resuming from its cached rows); returns the results.

    ``model`` is the causal LM (a local folder, or ``"default"``); the encoder is the embedded one.
    """
    from tqdm.auto import tqdm

    from lowbit.checkpoint.loading import load_tokenizer
    from lowbit.eval.classification import reference_probe
    from lowbit.eval.data import calibration_batch, calibration_texts
    from lowbit.models import default_encoder_path, resolve_model

    chosen = resolve_methods(methods)
    out = Path(out)
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    lm_folder, enc_folder = resolve_model(str(model)), default_encoder_path()
    lm_tok, enc_tok = load_tokenizer(lm_folder), load_tokenizer(enc_folder)
    lm_calib = calibration_batch(lm_tok, calibration_texts(None), settings.nsamples, settings.calib_seqlen)
    enc_calib = calibration_batch(enc_tok, calibration_texts(None), settings.nsamples, settings.calib_seqlen)
    probe = reference_probe(enc_folder) if settings.encoder else None
    results = []
    for method in tqdm(chosen, desc="compare", unit="method", disable=not progress):
        cache = rows_dir / f"{method.name}.json"
        key = {"settings": settings.key(), "model": str(lm_folder), "config": _config_dict(method.config)}
        if cache.is_file():
            row = json.loads(cache.read_text())
            if all(row.get(k) == v for k, v in key.items()):
                results.append(row)
                continue
        row = {"name": method.name, "label": method.label, "kind": method.kind, **key}
        for part, fn in (("lm", lambda: _lm_row(method, lm_folder, lm_tok, lm_calib, settings)),
                         ("encoder", lambda: _encoder_row(method, enc_folder, enc_tok, enc_calib, probe))):
            if part == "encoder" and not (settings.encoder and method.on_encoder):
                row[part] = None
                continue
            try:
                row[part] = fn()
            except Exception as e:  # a crashed method is a failed row; the run goes on
                log.warning("%s (%s) failed: %s", method.label, part, e)
                row[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3)}
        atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(row, indent=1)))
        results.append(row)
    report = {"settings": settings.key(), "model": str(lm_folder), "torch": torch.__version__, "rows": results}
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    from lowbit.eval.report import write_report

    write_report(report, out)
    return report
