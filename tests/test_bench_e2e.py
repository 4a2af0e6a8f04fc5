"""``lowbit bench e2e``: the quantized model against its original, end to end, on tiny models."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_llama_model
from lowbit.cli import main
from lowbit.eval.e2e import bench_model, format_e2e

FAST = ["--prompt-len", "8", "--new-tokens", "3", "--repeats", "1"]


def test_plain_model_is_quantized_and_compared_with_itself(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert main(["bench", "e2e", str(tiny_model_dir), "--group-size", "32", *FAST, "--batch-sizes", "1,2",
                 "--fuse", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| original (float32) |" in table and "| rtn 4-bit g32 sym |" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == ["original (float32)", "rtn 4-bit g32 sym", "rtn 4-bit g32 sym + fused"]
    original, quantized, fused = rows
    assert quantized["weight_bytes"] < original["weight_bytes"]  # 4-bit linears, the rest unchanged
    assert fused["weight_bytes"] <= quantized["weight_bytes"]  # the same numbers joined (one g_idx per group)
    for r in rows:
        assert r["prefill_tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert set(r["decode_tokens_per_s"]) == {"1", "2"} and min(r["decode_tokens_per_s"].values()) > 0


def test_quantized_folder_with_and_without_its_base(tiny_model_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--group-size", "32", "--out", str(q)]) == 0
    capsys.readouterr()
    assert main(["bench", "e2e", str(q), *FAST]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 and lines[1].startswith("| quantized |")  # header and the one row
    assert main(["bench", "e2e", str(q), "--base", str(tiny_model_dir), *FAST]) == 0
    table = capsys.readouterr().out
    assert "| original (float32) |" in table and "| quantized |" in table


def test_bad_batch_sizes_are_one_line_errors(tiny_model_dir, capsys):
    assert main(["bench", "e2e", str(tiny_model_dir), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes must be comma-separated integers" in capsys.readouterr().err


def test_compiled_model_is_measured_and_tabled():
    model = tiny_llama_model()
    plain = bench_model("eager", model, prompt_len=8, new_tokens=2, repeats=1)
    compiled = bench_model("compiled", tiny_llama_model(), prompt_len=8, new_tokens=2, repeats=1, compile=True)
    assert compiled.speed.decode_tokens_per_s(1) > 0
    table = format_e2e([plain, compiled])
    assert table.splitlines()[2].endswith("| 1.00x | 1.00x |")  # the first row is the reference
    assert "| compiled |" in table


@pytest.mark.parametrize("argv", [["bench"], ["bench", "kernels"]])
def test_unknown_bench_is_a_usage_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def _bench_e2e():
    """``bench/e2e.py`` (a script, not a package module; it imports ``bench/timing.py`` as a
    script does, from its own folder)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = str(Path(__file__).parents[1] / "bench")
    spec = importlib.util.spec_from_file_location("bench_e2e", Path(bench) / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, bench)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(bench)
    return module


def test_bench_decoder_traced_whole_matches_eager():
    """``bench/e2e.py --compile``'s decode step, traced whole (``fullgraph``; the aot_eager backend
    here, no C++ compiler), over a static cache: a fused 4-bit model's logits at every step equal
    the eager decoder's, the graphs of the first run serve every later position and run, and a
    reset starts a run over."""
    import torch

    import lowbit

    bench = _bench_e2e()
    model = lowbit.quantize(tiny_llama_model(), lowbit.RtnConfig(bits=4, group_size=32), progress=False, fuse=True)

    def run(dec, steps=6):
        dec.reset()
        token, logits = torch.tensor([3]), []
        for i in range(steps):
            out = dec.step(token, i)[0, -1]
            logits.append(out.clone())
            token = (out.argmax() + i).remainder(256).view(1)  # vary the input: the model repeats itself
        return torch.stack(logits)

    want = run(bench.Decoder(model, 16, False, None, "cpu"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dec = bench.Decoder(model, 16, False, "aot_eager", "cpu")
    got = run(dec)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    again = run(dec)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got)
    # the first step, which makes the cache's tensors, and every later one: two graphs, none after
    assert graphs <= 2 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert want.std(0).max() > 0  # the steps differ: positions and tokens reach the logits


def test_bench_peer_model_decodes_as_its_dequantized_weights():
    """``bench/e2e.py --peer``: every linear but the head through int4 tinygemm (the CPU build of
    the kernel here), whose product equals x times its dequantized weight, and the model's decoder
    traced whole as for lowbit's models."""
    import torch

    bench = _bench_e2e()
    lin = torch.nn.Linear(64, 48, bias=True)
    peer = bench.Int4Tinygemm(lin, group=32)
    x = torch.randn(3, 64).bfloat16()
    w = lin.weight.detach().float().reshape(48, 2, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    deq = (((w - lo) / scale).round().clamp(0, 15) * scale + lo).reshape(48, 64)
    want = x.float() @ deq.t() + lin.bias.detach().bfloat16().float()
    got = peer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 48)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2  # bf16 weights and output
    model = bench.tinygemm_model(tiny_llama_model(), group=32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [model.get_output_embeddings()]  # the head stays as it is
    dec = bench.Decoder(model, 8, False, "aot_eager", "cpu")
    logits = torch.stack([dec.step(torch.tensor([i + 3]), i)[0, -1].float() for i in range(3)])
    assert torch.isfinite(logits).all() and logits.std(0).max() > 0


def test_bench_switches_set_kernel_constants_and_put_them_back():
    """``bench/e2e.py --switch MODULE.NAME=VALUE``: the constants set together for the row, then put
    back; a malformed, unknown or non-literal switch stops the bench before any model is built."""
    e2e = _bench_e2e()
    from lowbit.kernels import triton_int_grouped as T

    before = (T.DOT_SWAP, T.TILED_MAX_ROWS)
    switches = e2e.parse_switches(["triton_int_grouped.DOT_SWAP=True", "triton_int_grouped.TILED_MAX_ROWS=512"])
    with e2e.switched(switches):
        assert (T.DOT_SWAP, T.TILED_MAX_ROWS) == (True, 512)
    assert (T.DOT_SWAP, T.TILED_MAX_ROWS) == before
    for spec, msg in (("DOT_SWAP", "MODULE.NAME=VALUE"), ("triton_int_grouped.NO_SUCH=1", "has no NO_SUCH"),
                      ("no_such_module.X=1", "no_such_module"), ("triton_int_grouped.DOT_SWAP=yes", "DOT_SWAP=yes")):
        with pytest.raises(SystemExit, match=msg):
            e2e.parse_switches([spec])
