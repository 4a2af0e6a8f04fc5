"""``lowbit`` command line: quantize, eval, demo.

The CLI owns the console: results go to stdout, progress bars to stderr, and a user error
is one line on stderr with exit status 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="rtn", help="quantization method (default: rtn)")
    p.add_argument("--bits", type=int, default=None, help="bits per weight (default: the method's, 4 for rtn)")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per group, -1 for one per row (default: the method's, 128 for rtn)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric range")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric range (zero points)")
    p.add_argument("--desc-act", action="store_true", default=None, help="gptq: act-order (columns by decreasing Hessian diagonal)")
    p.add_argument("--static-groups", action="store_true", default=None, help="gptq: group parameters fixed before the solve")
    p.add_argument("--damp-percent", type=float, default=None, help="gptq: Hessian dampening, fraction of its mean diagonal")
    p.add_argument("--format", default=None, help="gptq: checkpoint format, gptq (v1, default) or gptq_v2")
    p.add_argument("--calib", default=None, help="calibration text file (default: embedded WikiText-2 valid)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length in tokens (default: 512)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens scored (default: 16384)")
    p.add_argument("--ppl-seqlen", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--kernel", default="auto", help="kernel for quantized layers (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model folder and save it")
    q.add_argument("model", help="local model folder, or 'default' for the embedded SmolLM2-135M")
    q.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    _add_quant_args(q)

    e = sub.add_parser("eval", help="perplexity, size, peak memory of a model folder")
    e.add_argument("model", help="local (plain or quantized) model folder, or 'default'")
    _add_eval_args(e)

    d = sub.add_parser("demo", help="quantize the embedded model and compare it with the original")
    d.add_argument("--out", type=Path, default=None, help="where to keep the quantized model (default: a temp folder)")
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
             "nsamples": args.nsamples, "model_seqlen": args.seqlen}
    if given["bits"] is None and any(f.name == "bits" and f.default is MISSING for f in fields(cls)):
        given["bits"] = 4  # GPTQConfig requires bits; the CLI's default is 4
    kw = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to method {args.method!r}")
        kw[key] = value
    return cls(**kw)


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.api import from_pretrained, save_quantized

    config = config_from_args(args)
    model = from_pretrained(args.model, quantization_config=config, calib=args.calib, device=args.device)
    out = save_quantized(model, args.out)
    print(f"saved {config.quant_method} {getattr(config, 'bits', '')}-bit model to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.summary import evaluate_folder, format_table

    row = evaluate_folder(args.model, label=str(args.model), tokens=args.tokens, seqlen=args.ppl_seqlen,
                          device=args.device, kernel=args.kernel)
    print(format_table([row]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.eval.summary import run_demo

    config = config_from_args(args)
    print(run_demo(config, out=args.out, tokens=args.tokens, seqlen=args.ppl_seqlen, device=args.device,
                   kernel=args.kernel, calib=args.calib))
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo}


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
