"""Quantization (and pruning) methods side by side on the embedded SmolLM2-135M and WikiText-2.

Every row uses the same model, the same calibration windows (cut from WikiText-2 valid with a
fixed seed) and the same evaluation tokens (WikiText-2 test). Prints a markdown table:
perplexity, its ratio to the fp32 original, and quantization wall time.

    python bench/quality.py --table gptq --nsamples 32 --seqlen 512 --tokens 16384
    python bench/quality.py --table awq --nsamples 32 --seqlen 512 --tokens 16384
    python bench/quality.py --table pruning --nsamples 32 --seqlen 512 --tokens 16384
    python bench/quality.py --table aqlm --nsamples 32 --seqlen 512 --tokens 16384
    python bench/quality.py --table gptq-peer --nsamples 32 --seqlen 512 --tokens 16384   # GPTQModel installed
    python bench/quality.py --table awq-peer --nsamples 32 --seqlen 512 --tokens 16384    # AutoAWQ installed

``--seed N`` draws other calibration windows (the default is the library's ``CALIBRATION_SEED``).
``--shots 4`` adds a column of SST-2 4-shot accuracy on the dev set (``--examples`` caps it),
scored as ``lowbit eval --shots`` scores it, then its accuracy on the negative and on the
positive sentences (a model drifting towards one answer shows there), the accuracy after
contextual calibration and the ROC AUC of the label words' log-odds
(``lowbit.eval.classification.FewShot``).

The AWQ table uses group size 64: SmolLM2's hidden size, 576, is not a multiple of 128, and the
AWQ GEMM layout needs whole groups. ``gptq-peer`` quantizes with GPTQModel (same calibration
windows) and scores its checkpoint with lowbit's evaluator (lowbit reads it with GPTQModel's
weights, ``tests/test_gptqmodel_interop.py``). ``awq-peer`` does the same with AutoAWQ: its 4-bit
GEMM checkpoint is loaded by lowbit (``tests/test_autoawq_interop.py``); AutoAWQ cannot pack 3
bits, so its 3-bit row is AutoAWQ's scaled and clipped model rounded by AutoAWQ's own
``pseudo_quantize_tensor``, scored as it stands.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Iterator

import torch

import lowbit
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.compress import PruneConfig, compress
from lowbit.eval.classification import fewshot_sst2_scores
from lowbit.eval.data import CALIBRATION_SEED, calibration_batch, calibration_texts, wikitext2
from lowbit.eval.perplexity import text_perplexity
from lowbit.kernels import ENV_VAR
from lowbit.models import default_causal_lm_path

GPTQ_ROWS = [  # label, config
    ("RTN 4-bit g128 sym", lowbit.RtnConfig(bits=4, group_size=128, sym=True)),
    ("GPTQ 4-bit g128 sym", lowbit.GPTQConfig(bits=4, group_size=128, sym=True)),
    ("RTN 4-bit g128 asym", lowbit.RtnConfig(bits=4, group_size=128, sym=False)),
    ("GPTQ 4-bit g128 asym", lowbit.GPTQConfig(bits=4, group_size=128, sym=False)),
    ("GPTQ 4-bit g128 sym act-order", lowbit.GPTQConfig(bits=4, group_size=128, sym=True, desc_act=True)),
    ("RTN 3-bit g128 asym", lowbit.RtnConfig(bits=3, group_size=128, sym=False)),
    ("GPTQ 3-bit g128 asym", lowbit.GPTQConfig(bits=3, group_size=128, sym=False)),
    ("GPTQ 4-bit g128 sym damp 0.01", lowbit.GPTQConfig(bits=4, group_size=128, sym=True, damp_percent=0.01)),
    ("GPTQ 4-bit g128 asym act-order damp 0.01",
     lowbit.GPTQConfig(bits=4, group_size=128, sym=False, desc_act=True, damp_percent=0.01)),
]

AWQ_ROWS = [
    ("RTN 4-bit g64 asym", lowbit.RtnConfig(bits=4, group_size=64, sym=False)),
    ("GPTQ 4-bit g64 asym", lowbit.GPTQConfig(bits=4, group_size=64, sym=False)),
    ("AWQ 4-bit g64 zero-point", lowbit.AwqConfig(bits=4, group_size=64)),
    ("AWQ 4-bit g64 zero-point, x-only scale", lowbit.AwqConfig(bits=4, group_size=64, duo_scaling=False)),
    ("RTN 3-bit g64 asym", lowbit.RtnConfig(bits=3, group_size=64, sym=False)),
    ("GPTQ 3-bit g64 asym", lowbit.GPTQConfig(bits=3, group_size=64, sym=False)),
    ("AWQ 3-bit g64 zero-point", lowbit.AwqConfig(bits=3, group_size=64)),
]

PRUNING_ROWS = [  # pruning at 50 % against 4-bit quantization: what halving the linears' bits costs each way
    ("GPTQ 4-bit g128 asym", lowbit.GPTQConfig(bits=4, group_size=128, sym=False)),
    ("magnitude 50%", PruneConfig(method="magnitude")),
    ("Wanda 50%", PruneConfig(method="wanda")),
    ("SparseGPT 50%", PruneConfig(method="sparsegpt")),
    ("magnitude 2:4", PruneConfig(method="magnitude", pattern="2:4")),
    ("Wanda 2:4", PruneConfig(method="wanda", pattern="2:4")),
    ("SparseGPT 2:4", PruneConfig(method="sparsegpt", pattern="2:4")),
]

AQLM_ROWS = [  # about 2 bits per weight each way (the bits/weight column counts scales and codebooks)
    ("RTN 2-bit g64 asym", lowbit.RtnConfig(bits=2, group_size=64, sym=False)),
    ("GPTQ 2-bit g64 asym", lowbit.GPTQConfig(bits=2, group_size=64, sym=False)),
    ("AQLM 2x8 g8", lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=8)),
    ("AQLM 1x16 g8, 1 iteration, no Lloyd steps",
     lowbit.AqlmConfig(num_codebooks=1, nbits_per_codebook=16, max_iterations=1, kmeans_iterations=0)),
    ("AQLM 2x8 g8, block fine-tuning (20 Adam steps)",
     lowbit.AqlmConfig(num_codebooks=2, nbits_per_codebook=8, finetune_steps=20)),
]

GPTQ_PEER_ROWS = [  # GPTQModel's GPTQ with lowbit's settings (damp 0.1, no group-aware reordering)
    ("GPTQModel GPTQ 4-bit g128 sym", dict(bits=4, group_size=128, sym=True)),
    ("GPTQModel GPTQ 4-bit g128 asym", dict(bits=4, group_size=128, sym=False)),
    ("GPTQModel GPTQ 4-bit g128 sym act-order", dict(bits=4, group_size=128, sym=True, desc_act=True)),
    ("GPTQModel GPTQ 3-bit g128 asym", dict(bits=3, group_size=128, sym=False)),
]

AWQ_PEER_ROWS = [  # AutoAWQ's defaults (duo scaling, 20-point grid, clip search), the AWQ table's groups
    ("AutoAWQ 4-bit g64 zero-point", dict(w_bit=4, q_group_size=64, zero_point=True)),
    ("AutoAWQ 3-bit g64 zero-point", dict(w_bit=3, q_group_size=64, zero_point=True)),
]

TABLES = {"gptq": GPTQ_ROWS, "awq": AWQ_ROWS, "pruning": PRUNING_ROWS, "aqlm": AQLM_ROWS,
          "gptq-peer": GPTQ_PEER_ROWS, "awq-peer": AWQ_PEER_ROWS}


def quantize_with_gptqmodel(folder, spec: dict, calib: torch.Tensor, out) -> float:
    """Quantize ``folder`` with GPTQModel on the CPU and save it to ``out``; the seconds it took."""
    if importlib.util.find_spec("gptqmodel") is None:
        raise SystemExit("--table gptq-peer needs GPTQModel (a side environment: docs/usage.md)")
    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    if gptqmodel._DEVICE_THREAD_POOL is None and gptqmodel._default_cpu_workers() < 2:
        # GPTQModel 7.7 asks for two model-loader threads but grants a 2-core machine one CPU
        # worker, then refuses its own pool; give it the two it asks for
        gptqmodel._default_cpu_workers = lambda: 2
    cfg = QuantizeConfig(damp_percent=0.1, act_group_aware=False, **spec)
    model = GPTQModel.load(str(folder), cfg, device="cpu", dtype=torch.float32)
    start = time.perf_counter()
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib], batch_size=1)
    seconds = time.perf_counter() - start
    model.save(str(out))
    return seconds


@contextlib.contextmanager
def fix_autoawq_scale_search_on_cpu() -> Iterator[None]:
    """For the duration, make AutoAWQ 0.2.9's scale search keep a real copy of the weights it
    restores on a CPU.

    It saves the inspected module's weights as ``{k: v.cpu() ...}`` (a copy only when they live on
    a GPU: on a CPU ``.cpu()`` is the tensor itself), then scales the weights in place for the
    first candidate, so every later candidate and the final restore start from corrupted
    weights; unpatched, its SmolLM2 scores a perplexity of 301,636. The patch hands it copies, as
    it gets on a GPU, and changes nothing else."""
    from awq.quantize.quantizer import AwqQuantizer

    search = AwqQuantizer._compute_best_scale

    def fixed(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
        state_dict = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()}
        try:
            return search(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)
        finally:
            del module2inspect.state_dict

    AwqQuantizer._compute_best_scale = fixed
    try:
        yield
    finally:
        AwqQuantizer._compute_best_scale = search


def quantize_with_autoawq(folder, spec: dict, calib: torch.Tensor, out, *, patched: bool = True):
    """Quantize ``folder`` with AutoAWQ on the CPU: (seconds, model to score).

    4 bits: AutoAWQ's GEMM checkpoint, saved to ``out`` and loaded by lowbit. Other widths, which
    its GEMM module cannot pack: AutoAWQ's scaled and clipped fp32 model with every quantized
    linear rounded by AutoAWQ's own ``pseudo_quantize_tensor``. ``patched``: with
    :func:`fix_autoawq_scale_search_on_cpu` (False: AutoAWQ as released)."""
    if importlib.util.find_spec("awq") is None:
        raise SystemExit("--table awq-peer needs AutoAWQ (a side environment: docs/usage.md)")
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, device_map="cpu")
    packed = spec["w_bit"] == 4
    with fix_autoawq_scale_search_on_cpu() if patched else contextlib.nullcontext():
        start = time.perf_counter()
        model.quantize(None, quant_config={**spec, "version": "GEMM"}, calib_data=[row.tolist() for row in calib],
                       max_calib_samples=len(calib), max_calib_seq_len=calib.shape[1], export_compatible=not packed)
        seconds = time.perf_counter() - start
    if packed:
        model.save_quantized(str(out))
        return seconds, lowbit.from_pretrained(out)
    with torch.no_grad():
        for layer in model.model.model.layers:
            for linear in layer.modules():
                if isinstance(linear, torch.nn.Linear):
                    linear.weight.copy_(model.quantizer.pseudo_quantize_tensor(linear.weight)[0])
    return seconds, model.model.eval()


def bits_per_weight(model) -> float | None:
    """Stored bits per weight of the quantized linears (codes, scales, zeros, codebooks; no bias)."""
    from lowbit.formats.base import QuantLinear

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += sum(b.numel() * b.element_size() * 8 for n, b in m.named_buffers(recurse=False) if n != "bias")
            weights += m.in_features * m.out_features
    return bits / weights if weights else None


def main() -> None:
    # docs/quality.md's tables are scored through the reference kernels (the CPU kernels round to
    # bf16, and NF4's fits its code values); LOWBIT_KERNEL=auto scores through what auto picks
    os.environ.setdefault(ENV_VAR, "reference")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=sorted(TABLES), default="gptq")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384, help="WikiText-2 test tokens scored")
    p.add_argument("--ppl-seqlen", type=int, default=512)
    p.add_argument("--only", default=None, help="comma-separated row numbers to run (1-based)")
    p.add_argument("--shots", type=int, default=None, help="add SST-2 few-shot accuracy with this many shots")
    p.add_argument("--examples", type=int, default=None, help="SST-2 dev sentences scored (default: all 872)")
    p.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="seed that draws the calibration windows")
    args = p.parse_args()

    torch.manual_seed(0)
    folder = default_causal_lm_path()
    tok = load_tokenizer(folder)
    text = wikitext2("test")
    calib = calibration_batch(tok, calibration_texts(None), args.nsamples, args.seqlen, seed=args.seed)

    def ppl(model) -> float:
        return text_perplexity(model, tok, text, seqlen=args.ppl_seqlen, max_tokens=args.tokens)

    def accuracy(model) -> str:
        if args.shots is None:
            return ""
        r = fewshot_sst2_scores(model, tok, args.shots, args.examples)
        recalls = " / ".join(f"{x:.3f}" for x in r.accuracy.recalls)
        return f" {r.accuracy} | {recalls} | {r.calibrated.value:.3f} | {r.auc:.3f} |"

    original = lowbit.from_pretrained(folder)
    base = ppl(original)
    print(f"SmolLM2-135M-Instruct, WikiText-2 test first {args.tokens} tokens ({args.ppl_seqlen}-token windows); "
          f"calibration {args.nsamples} x {args.seqlen} tokens of WikiText-2 valid (seed {args.seed}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    bpw = args.table == "aqlm"
    acc_head = ("" if args.shots is None else
                f" SST-2 {args.shots}-shot [95% CI] | recall negative / positive | calibrated | AUC |")
    print("| model | perplexity | vs fp32 | quantize time |" + (" bits/weight |" if bpw else "") + acc_head)
    print("|---|---|---|---|" + ("---|" if bpw else "") + ("---|---|---|---|" if acc_head else ""))
    print(f"| fp32 original | {base:.3f} | 1.000 | - |" + (" 32 |" if bpw else "") + accuracy(original), flush=True)
    del original
    rows = TABLES[args.table]
    chosen = {int(i) for i in args.only.split(",")} if args.only else set(range(1, len(rows) + 1))
    for i, (label, cfg) in enumerate(rows, 1):
        if i not in chosen:
            continue
        if args.table == "gptq-peer":  # the peer's checkpoint, loaded and scored by lowbit
            with tempfile.TemporaryDirectory() as tmp:
                seconds = quantize_with_gptqmodel(folder, cfg, calib, tmp)
                model = lowbit.from_pretrained(tmp)
        elif args.table == "awq-peer":
            with tempfile.TemporaryDirectory() as tmp:
                seconds, model = quantize_with_autoawq(folder, cfg, calib, tmp)
        else:
            model = lowbit.from_pretrained(folder)
            start = time.perf_counter()
            compress(model, cfg, calib, progress=False)
            seconds = time.perf_counter() - start
        value = ppl(model)
        extra = (f" {bits_per_weight(model):.2f} |" if bpw else "") + accuracy(model)
        print(f"| {label} | {value:.3f} | {value / base:.3f} | {seconds:.1f} s |{extra}", flush=True)
    for peer in ("gptqmodel", "awq"):
        if importlib.util.find_spec(peer) is None:
            print(f"\n({peer} is not installed here: no peer column)")


if __name__ == "__main__":
    main()
