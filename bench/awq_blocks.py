"""AWQ block by block: lowbit's and AutoAWQ's 4-bit AWQ on the first blocks of the embedded SmolLM2.

A shorter check than ``bench/quality.py --table awq-peer`` (which quantizes all 30 blocks, about 50
minutes for AutoAWQ on 2 CPU cores): the model is cut to its first ``--blocks`` blocks, every
method quantizes that cut with the same calibration windows, and the table gives, for each
block, the relative error ``||h - h_fp|| / ||h_fp||`` of its output hidden states against the
full-precision cut on held-out WikiText-2 windows (the last block's output is after the final
norm, as transformers returns it). Run it where AutoAWQ is installed (``docs/usage.md``) to get
its rows; ``--unpatched`` adds AutoAWQ as released, whose scale search corrupts its weights on a
CPU (``bench/quality.py``'s ``fix_autoawq_scale_search_on_cpu``).

    python bench/awq_blocks.py --blocks 4 [--unpatched]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.eval.data import calibration_batch, calibration_texts, wikitext2
from lowbit.models import default_causal_lm_path

import quality  # bench/quality.py, next to this file


def cut_model(folder: Path, blocks: int, out: Path) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    model.save_pretrained(out)
    load_tokenizer(folder).save_pretrained(out)
    return out


def hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--unpatched", action="store_true", help="also AutoAWQ as released")
    args = p.parse_args()

    torch.manual_seed(0)
    folder = default_causal_lm_path()
    tok = load_tokenizer(folder)
    calib = calibration_batch(tok, calibration_texts(None), args.nsamples, args.seqlen)
    test_ids = tok(wikitext2("test"), return_tensors="pt").input_ids[:, :4 * 128].reshape(4, 128)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small = cut_model(folder, args.blocks, tmp / "cut")
        want = hidden_states(lowbit.from_pretrained(small), test_ids)
        rows = []

        def add(label, model, seconds):
            errs = [((h - w).norm() / w.norm()).item() for h, w in zip(hidden_states(model, test_ids), want)]
            rows.append((label, errs, seconds))
            print(f"{label}: {' '.join(f'{e:.4f}' for e in errs)} ({seconds:.1f} s)", flush=True)

        for label, cfg in (("RTN 4-bit g%d asym", lowbit.RtnConfig(bits=4, group_size=args.group_size, sym=False)),
                           ("lowbit AWQ 4-bit g%d zero-point",
                            lowbit.AwqConfig(bits=4, group_size=args.group_size, nsamples=args.nsamples))):
            model = lowbit.from_pretrained(small)
            start = time.perf_counter()
            lowbit.quantize(model, cfg, calib, progress=False)
            add(label % args.group_size, model, time.perf_counter() - start)
        if importlib.util.find_spec("awq") is None:
            print("(AutoAWQ is not installed here: no AutoAWQ rows)")
        else:
            spec = dict(w_bit=4, q_group_size=args.group_size, zero_point=True)
            for patched in ([True, False] if args.unpatched else [True]):
                out = tmp / ("autoawq-patched" if patched else "autoawq")
                seconds, model = quality.quantize_with_autoawq(small, spec, calib, out, patched=patched)
                label = f"AutoAWQ 4-bit g{args.group_size} zero-point" + ("" if patched else ", unpatched")
                add(label, model, seconds)

    print(f"\nSmolLM2 cut to its first {args.blocks} blocks; calibration {args.nsamples} x {args.seqlen} tokens of "
          f"WikiText-2 valid; relative error of each block's output on 4 x 128 WikiText-2 test tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | " + " | ".join(f"block {i}" for i in range(args.blocks)) + " | quantize time |")
    print("|---|" + "---|" * args.blocks + "---|")
    for label, errs, seconds in rows:
        print(f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
