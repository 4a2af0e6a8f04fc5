"""The ``lowbit`` command line's arguments: the parser of every subcommand, and the method's
config built from the quantization flags (:func:`config_from_args`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "lowbit command line: quantize, prune, distill, eval, convert, compare, bench, demo."

QUANT_FLAGS = ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "format", "quant_type",
               "double_quant", "threshold", "calib", "nsamples", "seqlen", "scheme", "in_group_size", "beam_size",
               "max_iterations", "finetune_steps", "rounding")
"""The quantization flags' names in the parsed arguments (``lowbit convert`` takes them only with
``--requantize``)."""


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rtn", help="quantization method: rtn, gptq, awq, bitsandbytes, aqlm (default: rtn)")
    p.add_argument("--bits", type=int, default=None,
                   help="bits per weight (default: 4); bitsandbytes: 8 = LLM.int8, 4 = NF4/FP4")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per group, -1 for one per row (default: the method's, 128 for rtn)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric range")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric range (zero points)")
    p.add_argument("--desc-act", action="store_true", default=None,
                   help="gptq: act-order (columns by decreasing Hessian diagonal; bitsandbytes --rounding gptq "
                        "uses it by default)")
    p.add_argument("--static-groups", action="store_true", default=None, help="gptq: group parameters fixed before the solve")
    p.add_argument("--damp-percent", type=float, default=None,
                   help="gptq, aqlm, bitsandbytes --rounding gptq: Hessian dampening, fraction of its mean diagonal")
    p.add_argument("--format", default=None, help="gptq: checkpoint format, gptq (v1, default) or gptq_v2")
    p.add_argument("--quant-type", default=None, help="bitsandbytes 4-bit: nf4 or fp4 (default: fp4, as transformers)")
    p.add_argument("--double-quant", action="store_true", default=None, help="bitsandbytes 4-bit: quantize the absmax too")
    p.add_argument("--threshold", type=float, default=None, help="bitsandbytes 8-bit: outlier threshold (default: 6.0)")
    p.add_argument("--rounding", default=None,
                   help="bitsandbytes: nearest (default, no data) or gptq (codes by GPTQ's error feedback on "
                        "calibration text; the same format)")
    p.add_argument("--scheme", default=None,
                   help="aqlm: codebooks x bits per codebook, e.g. 2x8 or 1x16 (default: 1x16, as transformers)")
    p.add_argument("--in-group-size", type=int, default=None, help="aqlm: input columns per codeword (default: 8)")
    p.add_argument("--beam-size", type=int, default=None, help="aqlm: code tuples kept in the beam search (default: 4)")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="aqlm: most alternations of codebook and code updates (default: 8)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="aqlm: Adam steps tuning each block's codebooks and scales to the original block (default: 0)")
    p.add_argument("--calib", default=None, help="gptq/awq/aqlm, bitsandbytes --rounding gptq: calibration text file "
                        "(default: embedded WikiText-2 valid)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length in tokens (default: 512)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens scored (default: 16384)")
    p.add_argument("--ppl-seqlen", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--kernel", default="auto", help="kernel for quantized layers (default: auto)")
    p.add_argument("--shots", type=int, default=None,
                   help="causal LM: also score SST-2 dev few-shot with this many examples in the prompt")
    p.add_argument("--examples", type=int, default=None, help="SST-2 dev sentences scored few-shot (default: all 872)")
    p.add_argument("--probe-base", default=None,
                   help="encoder: the original encoder whose SST-2 probe is applied (default: the embedded all-MiniLM-L6-v2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model folder and save it")
    q.add_argument("model", help="local model folder, or 'default' for the embedded SmolLM2-135M")
    q.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    _add_quant_args(q)

    e = sub.add_parser("eval", help="perplexity or SST-2 accuracy, size, peak memory of a model folder")
    e.add_argument("model", help="local (plain or quantized) model folder, 'default' (causal LM) or 'encoder'")
    _add_eval_args(e)
    e.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the unquantized parts and the activations (default: float16 on a GPU, where "
                        "the quantized layers' kernels take fp16/bf16, float32 on the CPU)")

    pr = sub.add_parser("prune", help="prune a model folder (magnitude, Wanda, SparseGPT) and save it dense")
    pr.add_argument("model", help="local model folder, 'default' or 'encoder'")
    pr.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    pr.add_argument("--method", required=True, help="magnitude, wanda or sparsegpt")
    pr.add_argument("--sparsity", type=float, default=None,
                    help="fraction of weights zeroed (default: 0.5, or N/M for an N:M pattern)")
    pr.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4")
    pr.add_argument("--calib", default=None, help="wanda/sparsegpt: calibration text file (default: embedded WikiText-2 valid)")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default: 128)")
    pr.add_argument("--seqlen", type=int, default=None, help="calibration window length in tokens (default: 512)")

    ds = sub.add_parser("distill", help="cut a shallower student from a model and train it to match the model")
    ds.add_argument("model", help="local model folder, 'default' or 'encoder'")
    ds.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    ds.add_argument("--layers", type=int, default=None, help="student blocks (default: half the teacher's)")
    ds.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    ds.add_argument("--batch-size", type=int, default=4, help="windows per step (default: 4)")
    ds.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default: 5e-4)")
    ds.add_argument("--calib", default=None, help="training text file (default: embedded WikiText-2 valid)")
    ds.add_argument("--nsamples", type=int, default=256, help="windows drawn from the text (default: 256)")
    ds.add_argument("--seqlen", type=int, default=128, help="window length in tokens (default: 128)")

    c = sub.add_parser("convert", help="rewrite a quantized checkpoint in another layout (exact where possible)")
    c.add_argument("src", type=Path, help="quantized model folder")
    c.add_argument("dst", type=Path, help="output folder (written atomically)")
    c.add_argument("--to", required=True, help="rtn, gptq, gptq-v2, awq or bnb")
    c.add_argument("--requantize", action="store_true",
                   help="allow conversions that change the weights: dequantize, then quantize with the flags below")
    _add_quant_args(c)

    cm = sub.add_parser("compare", help="quantization against pruning on the same models and data, with a report")
    cm.add_argument("model", nargs="?", default="default", help="causal LM folder or 'default' (the encoder is the embedded one)")
    cm.add_argument("--out", type=Path, default=Path("lowbit-compare"), help="report folder; finished rows are reused")
    cm.add_argument("--methods", default=None, help="comma-separated methods (default: all but those --list marks 'only when named')")
    cm.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens scored (default: 4096)")
    cm.add_argument("--nsamples", type=int, default=16, help="calibration windows (default: 16)")
    cm.add_argument("--seqlen", type=int, default=256, help="calibration window length (default: 256)")
    cm.add_argument("--no-encoder", action="store_true", help="skip the encoder's SST-2 rows")
    cm.add_argument("--shots", type=int, default=None,
                    help="also score the causal LM on SST-2 with this many shots (about 2 minutes a method on 2 cores)")
    cm.add_argument("--examples", type=int, default=None, help="with --shots: SST-2 dev sentences scored (default: all 872)")
    cm.add_argument("--list", action="store_true", help="list the methods and exit")

    b = sub.add_parser("bench", help="speed of a quantized model against its original (e2e: prefill, decode, memory)")
    b.add_argument("what", choices=["e2e"], help="e2e: prefill and decode tokens/s and peak memory, end to end")
    b.add_argument("model", nargs="?", default="default",
                   help="a plain model folder (quantized here with --method ...) or a quantized one; "
                        "'default': the embedded SmolLM2-135M")
    b.add_argument("--base", default=None,
                   help="the original of a quantized MODEL, measured first (a plain MODEL is its own original)")
    b.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of the unquantized parts (default: float16 on a GPU, float32 on the CPU)")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    b.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence (default: 32)")
    b.add_argument("--batch-sizes", default="1", help="comma-separated decode batch sizes (default: 1)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per number, median reported (default: 3)")
    b.add_argument("--compile", action="store_true", help="also time the quantized model under torch.compile")
    b.add_argument("--fuse", action="store_true",
                   help="also time the quantized model with q/k/v and gate/up fused (with --compile: both ways)")
    b.add_argument("--json", type=Path, default=None, help="also write the rows here")
    _add_quant_args(b)

    d = sub.add_parser("demo", help="quantize the embedded model and compare it with the original")
    d.add_argument("--out", type=Path, default=None,
                   help="where to keep the quantized model, or with --compare the report (default: a temp folder)")
    d.add_argument("--compare", action="store_true",
                   help="instead: a short lowbit compare (fp32, RTN, LLM.int8, NF4, GPTQ, Wanda) on both embedded models")
    _add_quant_args(d)
    _add_eval_args(d)
    return parser


def config_from_args(args: argparse.Namespace):
    """The method's config from CLI flags; flags the method has no field for are errors."""
    from dataclasses import MISSING, fields

    from lowbit.config import CONFIGS

    cls = CONFIGS.get(args.method)
    names = {f.name for f in fields(cls)}
    given = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "desc_act": args.desc_act,
             "static_groups": args.static_groups, "damp_percent": args.damp_percent, "format": args.format,
             "nsamples": args.nsamples, "model_seqlen": args.seqlen, "quant_type": args.quant_type,
             "double_quant": args.double_quant, "threshold": args.threshold, "scheme": args.scheme,
             "in_group_size": args.in_group_size, "beam_size": args.beam_size, "max_iterations": args.max_iterations,
             "finetune_steps": args.finetune_steps, "rounding": args.rounding}
    given = FLAG_FIELDS.get(args.method, _same_names)(given)
    if given.get("bits", 0) is None and any(f.name == "bits" and f.default is MISSING for f in fields(cls)):
        given["bits"] = 4  # GPTQConfig requires bits; the CLI's default is 4
    kw = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to method {args.method!r}")
        kw[key] = value
    return cls(**kw)


def _same_names(given: dict) -> dict:
    return given


def _bnb_fields(given: dict) -> dict:
    """bitsandbytes flags -> BitsAndBytesConfig fields: ``--bits 8`` is LLM.int8, ``--bits 4`` NF4/FP4."""
    bits = given.pop("bits", None) or 4
    if bits not in (4, 8):
        raise ValueError(f"--bits {bits}: bitsandbytes quantizes to 8 (LLM.int8) or 4 (NF4/FP4) bits")
    renames = {"quant_type": "bnb_4bit_quant_type", "double_quant": "bnb_4bit_use_double_quant",
               "threshold": "llm_int8_threshold"}
    out = {renames.get(k, k): v for k, v in given.items()}
    out["load_in_8bit" if bits == 8 else "load_in_4bit"] = True
    return out


def _awq_fields(given: dict) -> dict:
    """AWQ names its asymmetric range ``zero_point``: ``--sym`` is ``zero_point=False``."""
    sym = given.pop("sym", None)
    return given if sym is None else {**given, "zero_point": not sym}


def _aqlm_fields(given: dict) -> dict:
    """``--scheme CxB`` is ``num_codebooks=C, nbits_per_codebook=B``."""
    scheme = given.pop("scheme", None)
    if scheme is None:
        return given
    c, sep, b = scheme.lower().partition("x")
    if not (sep and c.isdigit() and b.isdigit()):
        raise ValueError(f"--scheme {scheme!r}: write codebooks x bits, e.g. 2x8 or 1x16")
    return {**given, "num_codebooks": int(c), "nbits_per_codebook": int(b)}


FLAG_FIELDS = {"bitsandbytes": _bnb_fields, "awq": _awq_fields, "aqlm": _aqlm_fields}
"""Methods whose config fields are not named like the CLI flags: flags -> fields."""
