"""The ``lowbit`` command line on tiny models: results, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_llama_model
from lowbit.cli import main


def test_quantize_then_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    assert "saved rtn 4-bit g32 sym model" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["eval", str(out), "--tokens", "600", "--ppl-seqlen", "128"]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and str(out) in table


def test_eval_in_another_dtype(tiny_model_dir, tmp_path, capsys):
    """``--dtype`` loads the unquantized parts (and so the activations) in that dtype: the bf16
    model holds fewer bytes and scores about the same perplexity; its row is labelled with it."""
    from lowbit.eval.summary import evaluate_folder

    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--tokens", "600", "--ppl-seqlen", "128", "--dtype", "bfloat16"]) == 0
    assert f"{out} (bfloat16)" in capsys.readouterr().out
    fp32, bf16 = (evaluate_folder(out, label="q4", tokens=600, seqlen=128, dtype=d)
                  for d in (None, torch.bfloat16))
    assert bf16.weight_bytes < fp32.weight_bytes
    assert abs(bf16.perplexity / fp32.perplexity - 1) < 0.02


def test_quantize_and_convert_build_no_kernel_layouts(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """They only save: the layouts the kernels hold to run a model (on a CPU, a copy of the codes)
    are not built."""
    import lowbit.api

    prepared = []
    monkeypatch.setattr(lowbit.api, "prepare_model", lambda model: prepared.append(model) or model)
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--out", str(out)]) == 0
    assert main(["convert", str(out), str(tmp_path / "gptq"), "--to", "gptq"]) == 0
    assert main(["convert", str(out), str(tmp_path / "nf4"), "--to", "bitsandbytes", "--requantize"]) == 0
    assert prepared == []
    lowbit.api.from_pretrained(out)  # where a model is loaded to run, they are
    assert len(prepared) == 1


def test_quantize_gptq_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["quantize", str(tiny_model_dir), "--method", "gptq", "--group-size", "32", "--desc-act",
            "--nsamples", "4", "--seqlen", "64", "--out", str(out)]
    assert main(argv) == 0
    assert "saved gptq 4-bit g32 sym model" in capsys.readouterr().out
    assert (out / "quantize_config.json").is_file()
    assert main(["eval", str(out), "--tokens", "300", "--ppl-seqlen", "64"]) == 0


@pytest.mark.parametrize("flags,label", [
    (["--bits", "4", "--quant-type", "nf4", "--double-quant"], "bnb nf4 double-quant"),
    (["--bits", "8", "--threshold", "4"], "bnb int8 t4"),
    (["--bits", "8", "--rounding", "gptq", "--nsamples", "4", "--seqlen", "64"], "bnb int8 t6 gptq-rounded"),
], ids=["nf4", "int8", "int8-gptq-rounded"])
def test_quantize_bitsandbytes_from_the_command_line(tiny_model_dir, tmp_path, capsys, flags, label):
    out = tmp_path / "b"
    assert main(["quantize", str(tiny_model_dir), "--method", "bitsandbytes", *flags, "--out", str(out)]) == 0
    assert f"saved {label} model" in capsys.readouterr().out
    assert main(["eval", str(out), "--tokens", "300", "--ppl-seqlen", "64"]) == 0


def test_quantize_aqlm_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "a"
    argv = ["quantize", str(tiny_model_dir), "--method", "aqlm", "--scheme", "2x6", "--in-group-size", "16",
            "--beam-size", "2", "--max-iterations", "2", "--nsamples", "4", "--seqlen", "64", "--finetune-steps", "2",
            "--out", str(out)]
    assert main(argv) == 0
    assert "saved aqlm 2x6 g16 model" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["finetune_steps"] == 2
    assert main(["eval", str(out), "--tokens", "300", "--ppl-seqlen", "64"]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "{model}", "--method", "nope", "--out", "{out}"], "unknown quant_method 'nope'"),
    (["quantize", "{model}", "--method", "aqlm", "--scheme", "2-8", "--out", "{out}"], "write codebooks x bits"),
    (["quantize", "{model}", "--method", "aqlm", "--scheme", "1x17", "--out", "{out}"], "nbits_per_codebook=17"),
    (["quantize", "{model}", "--method", "aqlm", "--in-group-size", "48", "--nsamples", "2", "--out", "{out}"],
     "in_group_size=48 does not divide in_features=64"),
    (["quantize", "{model}", "--scheme", "2x8", "--out", "{out}"], "--scheme does not apply to method 'rtn'"),
    (["quantize", "{model}", "--bits", "5", "--out", "{out}"], "bits=5"),
    (["quantize", "{model}", "--group-size", "-2", "--out", "{out}"], "group_size=-2"),
    (["quantize", "{model}", "--group-size", "0", "--out", "{out}"], "group_size=0"),
    (["quantize", "{missing}", "--out", "{out}"], "no config.json"),
    (["eval", "{missing}"], "no config.json"),
    (["quantize", "{model}", "--method", "aqlm", "--bits", "2", "--out", "{out}"], "--bits does not apply"),
    (["--device", "cuda:7", "quantize", "{model}", "--out", "{out}"], "device 'cuda:7' is not available"),
    (["--device", "gpu", "eval", "{model}"], "device 'gpu' is not a torch device"),
    (["quantize", "{model}", "--desc-act", "--out", "{out}"], "--desc-act does not apply to method 'rtn'"),
    (["quantize", "{model}", "--finetune-steps", "5", "--out", "{out}"], "--finetune-steps does not apply to method 'rtn'"),
    (["quantize", "{model}", "--method", "gptq", "--damp-percent", "1.5", "--out", "{out}"], "damp_percent=1.5"),
    (["quantize", "{model}", "--method", "gptq", "--format", "marlin", "--out", "{out}"], "format='marlin'"),
    (["quantize", "{model}", "--method", "gptq", "--calib", "{missing}/none.txt", "--out", "{out}"],
     "calibration file"),
    (["quantize", "{model}", "--method", "bitsandbytes", "--bits", "3", "--out", "{out}"], "8 (LLM.int8) or 4"),
    (["quantize", "{model}", "--method", "bitsandbytes", "--quant-type", "int4", "--out", "{out}"],
     "bnb_4bit_quant_type='int4'"),
    (["quantize", "{model}", "--method", "bitsandbytes", "--group-size", "64", "--out", "{out}"],
     "--group-size does not apply"),
    (["quantize", "{model}", "--quant-type", "nf4", "--out", "{out}"], "--quant-type does not apply to method 'rtn'"),
    (["quantize", "{model}", "--rounding", "gptq", "--out", "{out}"], "--rounding does not apply to method 'rtn'"),
    (["quantize", "{model}", "--method", "bitsandbytes", "--rounding", "stochastic", "--out", "{out}"],
     "rounding='stochastic'"),
], ids=["unknown-method", "aqlm-scheme", "aqlm-nbits", "aqlm-group", "scheme-rtn", "bits", "group-negative", "group-zero", "quantize-missing", "eval-missing",
        "flag-not-for-method", "device-absent", "device-unknown", "desc-act-rtn", "finetune-rtn", "damp", "gptq-format",
        "calib-missing", "bnb-bits", "bnb-quant-type", "bnb-group-size", "quant-type-rtn", "rounding-rtn",
        "bnb-rounding"])
def test_bad_input_one_line_error(tiny_model_dir, tmp_path, capsys, argv, msg):
    (tmp_path / "missing").mkdir()
    fill = {"model": str(tiny_model_dir), "out": str(tmp_path / "out"), "missing": str(tmp_path / "missing")}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error:") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_failed_quantize_leaves_existing_out_intact(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--group-size", "32", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tiny_llama_model()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad.save_pretrained(tmp_path / "nan")
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "nan"), "--group-size", "32", "--out", str(out)]) == 2
    assert "model.layers.1.mlp.down_proj: weight contains NaN" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan", "q", "tiny"]  # no temp folder left


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no config.json" in proc.stderr
