"""bitsandbytes-style quantization (lowbit's) against transformers + bitsandbytes, side by side.

Quantizes the embedded SmolLM2-135M with LLM.int8, NF4 and FP4 (with and without double quant)
in lowbit, and, when ``bitsandbytes`` is importable, the same model with the same settings
through transformers + bitsandbytes; scores each on the same WikiText-2 test tokens. Prints a
markdown table: perplexity, ratio to the original, quantization time, and how many of the
quantized tensors are bit-identical between the two tools.

Rows with lowbit's own settings have no transformers twin: "GPTQ rounding" (``rounding="gptq"``,
calibrated on ``--nsamples`` windows of WikiText-2 valid) and "weight-only"
(``int8_activations=False``). Their transformers + bitsandbytes column is lowbit's saved
checkpoint loaded by transformers, and "identical" counts the tensors it loaded unchanged.

``--activation-thresholds 6,3`` adds rows that keep the fp32 weights and round only the
activations as LLM.int8 does at each threshold (what the activation rounding alone costs).

    python bench/bnb_quality.py --tokens 16384 --dtype float32
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.eval.data import calibration_batch, calibration_texts, wikitext2
from lowbit.eval.perplexity import text_perplexity
from lowbit.kernels import ENV_VAR
from lowbit.models import default_causal_lm_path

ROWS = [  # label, BitsAndBytesConfig kwargs (field names shared by lowbit and transformers)
    ("LLM.int8 (threshold 6)", dict(load_in_8bit=True)),
    ("NF4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    ("NF4 double quant", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    ("FP4", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    ("FP4 double quant", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)),
    ("LLM.int8, GPTQ rounding", dict(load_in_8bit=True, rounding="gptq")),
    ("NF4, GPTQ rounding", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", rounding="gptq")),
    ("NF4 double quant, GPTQ rounding", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, rounding="gptq")),
    ("LLM.int8 weight-only (activations in fp32)", dict(load_in_8bit=True, int8_activations=False)),
    ("FP4, GPTQ rounding", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", rounding="gptq")),
]
LOWBIT_ONLY = ("rounding", "int8_activations")  # fields transformers' BitsAndBytesConfig lacks


def _quantized_tensors(model) -> dict[str, torch.Tensor]:
    """The serialized packed weights (``*_proj.weight``, int8 or uint8) of every quantized linear,
    as raw bytes, from the model's state dict (what both tools save)."""
    return {k: t.reshape(-1).view(torch.uint8) for k, t in model.state_dict().items()
            if k.endswith("_proj.weight") and not t.is_floating_point()}


def round_activations_only(model, threshold: float) -> list[int]:
    """Make every linear of ``model``'s blocks multiply its own fp weight with the activations as
    LLM.int8 rounds them (outlier columns kept, the rest int8 per row; reference.int8_activation_codes).
    Returns a counter ``[outlier columns, columns]`` summed over the calls that follow."""
    import torch.nn.functional as F

    from lowbit.kernels.reference import int8_activation_codes
    from lowbit.methods.walk import default_skips, find_linears

    counts = [0, 0]

    def forward(self, x):
        xf = x.reshape(-1, x.shape[-1]).float()
        outliers, row, ca = int8_activation_codes(xf, threshold)
        counts[0] += int(outliers.sum())
        counts[1] += outliers.numel()
        xq = torch.where(outliers, xf, ca.float() * (row / 127.0).unsqueeze(1))
        return F.linear(xq.to(x.dtype), self.weight, self.bias).reshape(*x.shape[:-1], -1)

    for lin in find_linears(model, default_skips(model)).values():
        lin.forward = forward.__get__(lin)
    return counts


def main() -> None:
    # docs/quality.md's tables are scored through the reference kernels (the CPU kernels round to
    # bf16, and NF4's fits its code values); LOWBIT_KERNEL=auto scores through what auto picks
    os.environ.setdefault(ENV_VAR, "reference")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens scored")
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--dtype", default="float32", help="dtype the model is loaded and quantized in")
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (1-based)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of the GPTQ-rounded rows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length in tokens")
    p.add_argument("--activation-thresholds", default="", help="comma-separated thresholds: rows with fp32 "
                   "weights and only the activations rounded as LLM.int8 rounds them")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    peer = importlib.util.find_spec("bitsandbytes") is not None

    folder = default_causal_lm_path()
    tok = load_tokenizer(folder)
    text = wikitext2("test")

    def ppl(model) -> float:
        return text_perplexity(model, tok, text, seqlen=args.ppl_seqlen, max_tokens=args.tokens)

    base = ppl(lowbit.from_pretrained(folder, dtype=dtype))
    print(f"SmolLM2-135M-Instruct ({args.dtype}), WikiText-2 test first {args.tokens} tokens "
          f"({args.ppl_seqlen}-token windows); original perplexity {base:.3f}")
    print("\n| method | lowbit ppl | ratio | quantize s | transformers+bitsandbytes ppl | ratio | "
          "identical packed weights |")
    print("|---|---|---|---|---|---|---|")
    only = {int(i) for i in args.only.split(",")} if args.only else None
    for i, (label, kw) in enumerate(ROWS, 1):
        if only and i not in only:
            continue
        rounded = kw.get("rounding") == "gptq"
        calib = calibration_batch(tok, calibration_texts(None), args.nsamples, args.seqlen) if rounded else None
        t0 = time.perf_counter()
        ours = lowbit.from_pretrained(folder, dtype=dtype, quantization_config=lowbit.BitsAndBytesConfig(**kw),
                                      calib=calib, progress=False)
        qsec = time.perf_counter() - t0
        ours_ppl = ppl(ours)
        cells = ["bitsandbytes not installed", "-", "-"]
        if peer:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            with tempfile.TemporaryDirectory() as tmp:
                if any(f in kw for f in LOWBIT_ONLY):  # transformers + bitsandbytes load lowbit's checkpoint
                    lowbit.save_quantized(ours, Path(tmp) / "q")
                    theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "q", dtype=dtype).eval()
                else:
                    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                                  quantization_config=BitsAndBytesConfig(**kw)).eval()
                theirs_ppl = ppl(theirs)
            a, b = _quantized_tensors(ours), _quantized_tensors(theirs)
            same = sum(torch.equal(a[n], b[n]) for n in a if n in b)
            cells = [f"{theirs_ppl:.3f}", f"{theirs_ppl / base:.3f}", f"{same}/{len(a)}"]
            del theirs
        print(f"| {label} | {ours_ppl:.3f} | {ours_ppl / base:.3f} | {qsec:.1f} | " + " | ".join(cells) + " |",
              flush=True)
        del ours
    for threshold in (float(t) for t in args.activation_thresholds.split(",") if t):
        model = lowbit.from_pretrained(folder, dtype=dtype)
        counts = round_activations_only(model, threshold)
        p = ppl(model)
        print(f"| fp32 weights, LLM.int8 activations (threshold {threshold:g}; "
              f"{100 * counts[0] / counts[1]:.1f} % of input columns kept as outliers) | {p:.3f} | {p / base:.3f} | "
              "- | - | - | - |", flush=True)


if __name__ == "__main__":
    main()
