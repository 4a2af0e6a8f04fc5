"""``lowbit`` command line: quantize, prune, distill, eval, convert, compare, bench, demo.

The CLI owns the console: results go to stdout, progress bars to stderr, and a user error
is one line on stderr with exit status 2 (``--debug`` shows the traceback instead). The
arguments are defined in :mod:`lowbit.cli_args`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lowbit.cli_args import QUANT_FLAGS, build_parser, config_from_args

EXIT_USAGE = 2


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.api import from_pretrained, save_quantized

    config = config_from_args(args)
    model = from_pretrained(args.model, quantization_config=config, calib=args.calib, device=args.device,
                            prepare=False)  # only saved
    out = save_quantized(model, args.out)
    from lowbit.eval.summary import describe

    print(f"saved {describe(config)} model to {out}")
    return 0


def _dtype_name(args: argparse.Namespace) -> str:
    """``--dtype``, or its default: float16 on a GPU (the quantized kernels take fp16/bf16), float32
    on the CPU."""
    return args.dtype or ("float16" if args.device.startswith("cuda") else "float32")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from lowbit.eval.summary import evaluate_folder, format_table

    dtype = _dtype_name(args)
    label = str(args.model) if args.dtype is None else f"{args.model} ({dtype})"
    row = evaluate_folder(args.model, label=label, tokens=args.tokens, seqlen=args.ppl_seqlen,
                          device=args.device, kernel=args.kernel, shots=args.shots, examples=args.examples,
                          probe_base=args.probe_base, dtype=getattr(torch, dtype))
    print(format_table([row]))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from lowbit.checkpoint.loading import load_plain
    from lowbit.compress import PruneConfig, prune, save_pruned, sparsity_of
    from lowbit.models import resolve_model

    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples,
                         model_seqlen=args.seqlen)
    model, tokenizer = load_plain(resolve_model(args.model), torch.float32, args.device)
    prune(model, config, args.calib, tokenizer=tokenizer, device=args.device)
    out = save_pruned(model, args.out, config, tokenizer)
    print(f"saved {config.label()} model ({sparsity_of(model):.1%} of the linear weights zero) to {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import torch

    from lowbit.checkpoint.loading import load_plain
    from lowbit.compress import DistillConfig, distill, save_distilled
    from lowbit.models import resolve_model

    config = DistillConfig(student_layers=args.layers, steps=args.steps, batch_size=args.batch_size,
                           learning_rate=args.lr, nsamples=args.nsamples, model_seqlen=args.seqlen,
                           warmup_steps=min(10, args.steps - 1))
    model, tokenizer = load_plain(resolve_model(args.model), torch.float32, args.device)
    losses: list[float] = []
    distill(model, config, args.calib, tokenizer=tokenizer, device=args.device, losses=losses)
    out = save_distilled(model, args.out, config, tokenizer, losses)
    print(f"saved a {model.config.num_hidden_layers}-layer student to {out} "
          f"(loss {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from lowbit.convert import convert, normalize_target
    from lowbit.eval.summary import describe

    target = normalize_target(args.to)
    given = [f for f in QUANT_FLAGS if getattr(args, f) is not None]
    if args.method != "rtn" or (given and not args.requantize):
        raise ValueError("convert takes the method from --to; quantization flags apply only with --requantize")
    requantize_config = None
    if args.requantize:
        args.method = target.removesuffix("_v2")
        if target == "gptq_v2":
            args.format = "gptq_v2"
        if args.method == "bitsandbytes" and args.quant_type is None and args.bits != 8:
            args.quant_type = "nf4"
        requantize_config = config_from_args(args)
    cfg = convert(args.src, args.dst, target, requantize=args.requantize, requantize_config=requantize_config,
                  calib=args.calib)
    how = "requantized" if args.requantize else "converted exactly"
    print(f"{how}: {args.src} -> {args.dst} ({describe(cfg)}, layout {target})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lowbit.eval.compare import METHODS, CompareSettings, run_compare
    from lowbit.eval.report import failed_labels

    if args.list:
        for m in METHODS.values():
            print(f"{m.name:12s} {m.kind:13s} {m.label}" + ("" if m.in_default else "  (only when named)"))
        return 0
    if args.device != "cpu":
        raise ValueError("compare runs on cpu for now")
    settings = CompareSettings(tokens=args.tokens, nsamples=args.nsamples, calib_seqlen=args.seqlen,
                               encoder=not args.no_encoder, shots=args.shots, shot_examples=args.examples)
    methods = args.methods.split(",") if args.methods else None
    report = run_compare(args.out, methods, settings, model=args.model)
    failed = failed_labels(report["rows"])
    print(f"wrote {args.out / 'report.md'} ({len(report['rows'])} methods"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.eval.summary import run_demo

    if args.compare:
        return _demo_compare(args)
    config = config_from_args(args)
    print(run_demo(config, out=args.out, tokens=args.tokens, seqlen=args.ppl_seqlen, device=args.device,
                   kernel=args.kernel, calib=args.calib))
    return 0


def _demo_compare(args: argparse.Namespace) -> int:
    import tempfile

    from lowbit.eval.compare import DEMO_METHODS, DEMO_SETTINGS, run_compare
    from lowbit.eval.report import encoder_table, lm_table

    if args.device != "cpu":
        raise ValueError("compare runs on cpu for now")
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        out = args.out or Path(tmp)
        report = run_compare(out, DEMO_METHODS, DEMO_SETTINGS)
        s = DEMO_SETTINGS
        print(f"SmolLM2-135M, WikiText-2 test perplexity over {s.tokens} tokens; calibration {s.nsamples} x "
              f"{s.calib_seqlen} tokens; decode speed at batch 1 ({s.new_tokens} tokens, 1 run)")
        print(lm_table(report["rows"]))
        print("\nall-MiniLM-L6-v2, SST-2 dev accuracy through the fixed fp32 probe")
        print(encoder_table(report["rows"]))
        if args.out:
            print(f"\nreport with plots: {args.out / 'report.md'} (lowbit compare runs every method)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import tempfile

    import torch

    from lowbit.api import from_pretrained, save_quantized
    from lowbit.checkpoint.loading import read_config_json
    from lowbit.checkpoint.safetensors_io import atomic_write
    from lowbit.eval.e2e import E2ESpec, format_e2e, run_isolated
    from lowbit.eval.summary import describe
    from lowbit.models import resolve_model

    try:
        batch_sizes = tuple(int(v) for v in args.batch_sizes.split(","))
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, not {args.batch_sizes!r}") from None
    dtype = _dtype_name(args)
    quantized = read_config_json(resolve_model(args.model)).get("quantization_config") is not None
    common = dict(dtype=dtype, device=args.device, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  batch_sizes=batch_sizes, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        specs = []
        base = args.base if quantized else args.model
        if base is not None:
            specs.append(E2ESpec(f"original ({dtype})", str(base), **common))
        target, label = str(args.model), "quantized"
        if not quantized:  # quantize once and save, so that each measuring process loads the checkpoint
            config = config_from_args(args)
            model = from_pretrained(args.model, quantization_config=config, calib=args.calib,
                                    dtype=getattr(torch, dtype), device=args.device)
            target, label = str(save_quantized(model, Path(tmp) / "quantized")), describe(config)
            del model
        for fused in (False, True) if args.fuse else (False,):
            for compiled in (False, True) if args.compile else (False,):
                suffix = (" + fused" if fused else "") + (" + torch.compile" if compiled else "")
                specs.append(E2ESpec(label + suffix, target, compile=compiled, fuse=fused, **common))
        rows = [run_isolated(spec) for spec in specs]  # each in a fresh process: its own peak memory
    print(f"{args.model} on {args.device}: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; each model loaded and measured in its own process")
    print(format_e2e(rows))
    if args.json is not None:
        text = json.dumps({"device": args.device, "rows": [r.as_dict() for r in rows]}, indent=1)
        atomic_write(args.json, lambda tmp_file: tmp_file.write_text(text))
    return 0


COMMANDS = {"bench": cmd_bench, "quantize": cmd_quantize, "prune": cmd_prune, "distill": cmd_distill, "eval": cmd_eval, "convert": cmd_convert,
            "compare": cmd_compare, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # lowbit's own bars show the long work
    try:
        from lowbit.api import resolve_device

        args.device = str(resolve_device(args.device))
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        print(f"lowbit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
