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
