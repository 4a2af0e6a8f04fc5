"""One AWQ block, lowbit against AutoAWQ on the same inputs: scale ratios, clip choices, and what
rounding the scale to fp16 before choosing codes costs each clipped linear.

Runs AutoAWQ on the embedded SmolLM2 until its first block's clip search is done (AutoAWQ
installed: the side environment of docs/usage.md), takes that block's fp32 inputs and kwargs, and
runs lowbit's scale and clip search on a copy of the block. Prints, per scale group, lowbit's
ratio and the scale's distance to AutoAWQ's; per clipped linear, the output error (calibration
inputs, the linear alone) of a clip searched and rounded with the scale in fp16 against one
searched and rounded with the fp32 scale and stored in fp16 (what lowbit's AWQ does).

    python bench/awq_block.py --seed 1 --bits 3
"""

from __future__ import annotations

import argparse
import copy

import torch

import lowbit
import lowbit.methods.awq as awq
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.eval.data import calibration_batch, calibration_texts
from lowbit.methods.affine import choose_qparams, dequantize, quantize
from lowbit.methods.walk import find_linears
from lowbit.models import default_causal_lm_path

from quality import fix_autoawq_scale_search_on_cpu


class _Stop(Exception):
    pass


def autoawq_block0(folder, calib: torch.Tensor, bits: int, group_size: int) -> dict:
    """AutoAWQ's first block (a copy, before its scales), its inputs, kwargs and chosen scales."""
    from awq import AutoAWQForCausalLM
    from awq.quantize import quantizer as aq

    seen: dict = {"scales": []}
    get_feat, best_scale, apply_clip = (aq.AwqQuantizer._get_input_feat, aq.AwqQuantizer._compute_best_scale,
                                        aq.apply_clip)

    def record_inputs(self, layer, named):
        seen.update(inputs=self.inps.clone(), kwargs=dict(self.module_kwargs), block=copy.deepcopy(layer))
        return get_feat(self, layer, named)

    def record_scale(self, *args, **kwargs):
        seen["scales"].append(best_scale(self, *args, **kwargs).float())
        return seen["scales"][-1]

    def stop(_module, _clips):
        raise _Stop

    aq.AwqQuantizer._get_input_feat, aq.AwqQuantizer._compute_best_scale, aq.apply_clip = (
        record_inputs, record_scale, stop)
    try:
        model = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, device_map="cpu")
        with fix_autoawq_scale_search_on_cpu():
            model.quantize(None, quant_config=dict(w_bit=bits, q_group_size=group_size, zero_point=True,
                                                   version="GEMM"),
                           calib_data=[r.tolist() for r in calib], max_calib_samples=len(calib),
                           max_calib_seq_len=calib.shape[1], export_compatible=True)
    except _Stop:
        pass
    finally:
        aq.AwqQuantizer._get_input_feat, aq.AwqQuantizer._compute_best_scale, aq.apply_clip = (
            get_feat, best_scale, apply_clip)
    return seen


def rounded(w: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Asymmetric RTN per row with codes chosen with the scale in ``scale_dtype``, dequantized
    with the scale stored in fp16."""
    s, z = choose_qparams(w, bits, False, scale_dtype)
    return dequantize(quantize(w, s[:, None], z[:, None], bits), s.half().float()[:, None], z[:, None])


def clip_error(w: torch.Tensor, x: torch.Tensor, max_val: torch.Tensor, bits: int, g: int,
               scale_dtype: torch.dtype) -> float:
    """Summed mean squared error of each group's partial products after clipping and rounding."""
    err = 0.0
    for i, start in enumerate(range(0, w.shape[1], g)):
        wg, xg = w[:, start : start + g].float(), x[:, start : start + g].float()
        deq = rounded(torch.clamp(wg, -max_val[:, i : i + 1], max_val[:, i : i + 1]), bits, scale_dtype)
        err += (xg @ deq.t() - xg @ wg.t()).pow(2).mean().item()
    return err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1, help="calibration windows' seed")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()

    folder = default_causal_lm_path()
    calib = calibration_batch(load_tokenizer(folder), calibration_texts(None), args.nsamples, args.seqlen,
                              seed=args.seed)
    peer = autoawq_block0(folder, calib, args.bits, args.group_size)

    ours, clips = [], {}
    search_scale, search_clip = awq.search_scale, awq.search_clip

    def record_scale(*a, **k):
        ours.append(search_scale(*a, **k))
        return ours[-1]

    def record_clip(w, x, *a, **k):
        clips[len(clips)] = (w.clone(), x.clone())
        return search_clip(w, x, *a, **k)

    awq.search_scale, awq.search_clip = record_scale, record_clip
    try:
        block = peer["block"]
        linears = find_linears(block, (), prefix="model.layers.0")
        kwargs = {k: v for k, v in peer["kwargs"].items() if k != "use_cache"}
        with torch.no_grad():
            awq.AwqQuantizer(lowbit.AwqConfig(bits=args.bits, group_size=args.group_size)).prepare_block(
                block, "model.layers.0", linears, [peer["inputs"]], kwargs)
    finally:
        awq.search_scale, awq.search_clip = search_scale, search_clip

    print(f"SmolLM2 block 0, AWQ {args.bits}-bit g{args.group_size}, calibration {args.nsamples} x {args.seqlen} "
          f"(seed {args.seed})\n")
    for i, ((s, ratio, _), theirs) in enumerate(zip(ours, peer["scales"])):
        print(f"scale group {i}: lowbit ratio {ratio:.2f}, |s - s_AutoAWQ| / |s_AutoAWQ| = "
              f"{((s - theirs).norm() / theirs.norm()).item():.1e}")
    clipped = [n for n in linears if n not in awq.block_map(type(block).__name__).no_clip]
    print("\n| linear | symmetric groups | clip and codes with the fp16 scale | with the fp32 scale, stored fp16 |")
    print("|---|---|---|---|")
    for name, (w, x) in zip(clipped, clips.values()):
        errors = []
        for dtype in (torch.float16, torch.float32):  # the fp32 search last: its clip is lowbit's
            max_val = search_clip(w, x, args.bits, args.group_size, False, scale_dtype=dtype)
            errors.append(clip_error(w, x, max_val, args.bits, args.group_size, dtype))
        wc = awq.apply_clip(w, max_val, args.group_size).reshape(w.shape[0], -1, args.group_size)
        symmetric = (wc.amax(-1) == -wc.amin(-1)).float().mean().item()
        print(f"| {name} | {symmetric:.0%} | {errors[0]:.4e} | {errors[1]:.4e} |")


if __name__ == "__main__":
    main()
