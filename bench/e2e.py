"""End to end: batch-1 decode and prefill tokens/s of a 4-bit model against the same model in fp16.

The model is the embedded SmolLM2-135M, or (``--model llama7b``) a Llama with Llama-7B's layer
shapes and random weights (``--layers`` of them), which is what decode speed depends on. The
4-bit model is RTN w4 g128 (same kernels as GPTQ/AWQ checkpoints). Decode runs one token at a time
through a static KV cache; ``--graphs`` captures each decode step in a CUDA graph (as gpt-fast
does), so launch overhead does not hide the kernels.

    python bench/e2e.py --model llama7b --layers 8 --graphs --fuse

``--fuse`` adds a row with q/k/v and gate/up joined into one quantized matmul each (:mod:`lowbit.fusion`).
``--peer`` adds the issue's peer, measured the same way: the model in bf16 with every linear but the
head through PyTorch's int4 tinygemm (``aten._weight_int4pack_mm``, the kernel torchao's int4
weight-only config runs), groups of 128, asymmetric (:class:`Int4Tinygemm`).
``--compile`` traces every model's decode step with ``torch.compile`` (inductor, ``fullgraph``)
before the graph capture: the small ops between the matmuls (norms, rotary embedding, residual
adds), one kernel each otherwise, are fused.
``--switch MODULE.NAME=VALUE`` (repeatable) adds a row for the 4-bit model with those kernel
switches set together, e.g. the grouped-int tiles of y.T for prefill too:
``--switch triton_int_grouped.DOT_SWAP=True --switch triton_int_grouped.TILED_MAX_ROWS=512``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import statistics
import time

import torch

import lowbit
from lowbit.config import RtnConfig
from lowbit.models import cache_keyword, default_causal_lm_path

from timing import switched  # bench/timing.py


def build(model_name: str, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(default_causal_lm_path(), dtype=torch.float16)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes on the CPU
        model = LlamaForCausalLM(cfg).to(torch.float16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def tinygemm_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit codes of ``w [N, K]`` for tinygemm: int32 ``q [N, K]``, and
    fp32 ``scale`` and ``zero`` ``[N, K / group, 1]`` with ``W = (q - 8) * scale + zero``."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo + 8 * scale


class Int4Tinygemm(torch.nn.Module):
    """A linear layer through PyTorch's int4 tinygemm: ``W = (q - 8) * scale + zero`` per group of
    ``group`` inputs (round to nearest, asymmetric), bf16 activations; the CPU build of the kernel
    on CPU tensors (its own packing), for the tests."""

    def __init__(self, linear: torch.nn.Linear, group: int = 128) -> None:
        super().__init__()
        w = linear.weight.detach()
        n = w.shape[0]
        q, scale, zero = tinygemm_codes(w, group)
        self.register_buffer("scales_and_zeros", torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1)
                             .transpose(0, 1).contiguous().bfloat16())
        if w.is_cuda:
            self.mm = torch.ops.aten._weight_int4pack_mm
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        else:
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        self.register_buffer("packed", packed)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().bfloat16(), False)
        self.group, self.out_features = group, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mm(x.reshape(-1, x.shape[-1]), self.packed, self.group, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def tinygemm_model(model, group: int = 128):
    """``model`` in bf16 with every ``nn.Linear`` but the output head as :class:`Int4Tinygemm`."""
    model = model.to(torch.bfloat16)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.get_output_embeddings():
                setattr(parent, name, Int4Tinygemm(child, group))
    return model


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Decoder:
    """One-token decode steps over a static KV cache, optionally through ``torch.compile`` (the
    step traced whole, ``fullgraph=True``: inductor fuses the norms, rotary embedding and other
    small ops between the matmuls into few kernels, as gpt-fast does) and replayed from a CUDA
    graph. ``reset()`` empties the cache in place for another run over the same graph."""

    def __init__(self, model, max_len: int, graphs: bool, compile_backend: str | None = None,
                 device: str = "cuda") -> None:
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_keyword = cache_keyword(model)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.forward = self._forward
        if compile_backend:
            self.forward = torch.compile(self._forward, fullgraph=True, dynamic=False, backend=compile_backend)
        self.graph = None
        if graphs:
            self.logits = self._step()  # allocate the cache and compile kernels before capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, **{self.cache_keyword: self.cache}, cache_position=pos, use_cache=True).logits

    @torch.inference_mode()
    def _step(self) -> torch.Tensor:
        return self.forward(self.ids, self.pos)

    @torch.inference_mode()  # the cache's tensors are made in the first step, in inference mode
    def reset(self) -> None:
        self.cache.reset()

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.ids.copy_(token.view(1, 1))
        self.pos.fill_(position)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def decode_tokens_per_s(model, new_tokens: int, graphs: bool, trials: int = 3, compile_backend: str | None = None,
                        device: str = "cuda") -> float:
    """Median tokens/s of ``new_tokens`` greedy batch-1 decode steps after 4 warm-up steps, over
    ``trials`` runs of one decoder (one compilation, one graph)."""
    dec = Decoder(model, new_tokens + 8, graphs, compile_backend, device)
    rates = []
    for _ in range(trials):
        dec.reset()
        token = torch.ones(1, dtype=torch.long, device=device)
        for i in range(4):  # warm-up
            dec.step(token, i)
        synchronize(device)
        t = time.perf_counter()
        for i in range(4, 4 + new_tokens):
            token = dec.step(token, i)[0, -1].argmax().view(1)
        synchronize(device)
        rates.append(new_tokens / (time.perf_counter() - t))
    return statistics.median(rates)


@torch.inference_mode()
def prefill_tokens_per_s(model, prompt_len: int, trials: int = 5) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return prompt_len / statistics.median(times)


def time_model(label: str, args) -> tuple[float, float, bool]:
    """(decode tokens/s, prefill tokens/s, whether decode replayed CUDA graphs) of the row ``label``."""
    model = build(args.model, args.layers).cuda().eval()
    if label.startswith("tinygemm"):
        model = tinygemm_model(model)
    elif label != "fp16":
        lowbit.quantize(model, RtnConfig(bits=4, group_size=128), device="cuda", progress=False,
                        fuse=label.endswith("fused"))
    graphs = args.graphs
    backend = "inductor" if args.compile else None
    try:
        decode = decode_tokens_per_s(model, args.new_tokens, graphs, compile_backend=backend)
    except RuntimeError as e:  # a forward that cannot be captured still gets an eager number
        print(f"{label}: CUDA graph capture failed ({str(e).splitlines()[0][:200]}); timing eager decode")
        graphs = False
        decode = decode_tokens_per_s(model, args.new_tokens, graphs, compile_backend=backend)
    return decode, prefill_tokens_per_s(model, args.prompt_len), graphs


def parse_switches(specs: list[str]) -> list[tuple[object, str, object]]:
    """``MODULE.NAME=VALUE`` strings -> ``(lowbit.kernels.MODULE, NAME, value)``; VALUE is a Python
    literal. An unknown module or constant is an error (a switch that sets nothing would time the
    default twice)."""
    out = []
    for spec in specs:
        target, sep, text = spec.partition("=")
        module_name, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise SystemExit(f"--switch takes MODULE.NAME=VALUE, not {spec!r}")
        try:
            module = importlib.import_module(f"lowbit.kernels.{module_name}")
            value = ast.literal_eval(text)
        except (ImportError, ValueError, SyntaxError) as e:
            raise SystemExit(f"--switch {spec!r}: {e}") from None
        if not hasattr(module, name):
            raise SystemExit(f"--switch {spec!r}: lowbit.kernels.{module_name} has no {name}")
        out.append((module, name, value))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "llama7b"], default="smollm2")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the llama7b-shaped model")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--graphs", action="store_true", help="replay each decode step from a CUDA graph")
    p.add_argument("--fuse", action="store_true", help="also time the 4-bit model with fused q/k/v and gate/up")
    p.add_argument("--compile", action="store_true",
                   help="trace each decode step with torch.compile (inductor, fullgraph) for every model")
    p.add_argument("--peer", action="store_true",
                   help="also time the model through PyTorch's int4 tinygemm (torchao's kernel), bf16")
    p.add_argument("--switch", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="also time the 4-bit model with lowbit.kernels.MODULE's NAME set to VALUE (a Python "
                        "literal); repeatable, all set together")
    args = p.parse_args()
    switches = parse_switches(args.switch)
    if not torch.cuda.is_available():
        raise SystemExit("bench/e2e.py needs a CUDA or ROCm GPU")
    results = {}
    switched_label = f"lowbit w4g128, {', '.join(args.switch)}"
    labels = ("fp16", "lowbit w4g128", *(("lowbit w4g128 fused",) if args.fuse else ()),
              *((switched_label,) if switches else ()),
              *(("tinygemm int4 (torchao's kernel), bf16",) if args.peer else ()))
    for label in labels:
        with switched(switches if label == switched_label else []):
            results[label] = time_model(label, args)
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, model {args.model}"
          f"{f' ({args.layers} layers)' if args.model == 'llama7b' else ''}"
          f"{', decode steps compiled (inductor, fullgraph)' if args.compile else ''}")
    print("| model | decode tok/s (batch 1) | graphs | prefill tok/s | decode vs fp16 | prefill vs fp16 |")
    print("|---|---|---|---|---|---|")
    base_dec, base_pre, _ = results["fp16"]
    for label, (dec, pre, graphs) in results.items():
        print(f"| {label} | {dec:.1f} | {graphs} | {pre:.0f} | {dec / base_dec:.2f}x | {pre / base_pre:.2f}x |")


if __name__ == "__main__":
    main()
