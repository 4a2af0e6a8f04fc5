"""quantize -> save_quantized -> from_pretrained on tiny random models."""

import json

import pytest
import torch

import lowbit
from lowbit import IntGroupedLinear, QuantLinear, RtnConfig
from lowbit.checkpoint.safetensors_io import SINGLE_FILE, load_state_dict


@pytest.fixture()
def quantized_dir(tiny_model_dir, tmp_path):
    model = lowbit.from_pretrained(tiny_model_dir, quantization_config=RtnConfig(bits=4, group_size=32), progress=False)
    out = tmp_path / "q"
    lowbit.save_quantized(model, out)
    return model, out


def test_linears_swapped_except_output_embedding(quantized_dir):
    model, _ = quantized_dir
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 2 * 7  # q k v o gate up down per block
    assert not isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie survives


def test_save_load_bit_identical_and_same_logits(quantized_dir):
    model, out = quantized_dir
    loaded = lowbit.from_pretrained(out)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        assert torch.equal(before[k], after[k]), k
    ids = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert lowbit.quantized_config(loaded) == RtnConfig(bits=4, group_size=32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_checkpoint_contents(quantized_dir):
    _, out = quantized_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rtn"
    assert cfg["quantization_config"]["bits"] == 4
    tensors = load_state_dict(out)
    assert "lm_head.weight" not in tensors  # tied: stored once
    q = tensors["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (64 * 4 // 32, 64)
    assert (out / "tokenizer.json").is_file()  # copied from the source folder
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".q.")]  # no temp leftovers


def test_quantized_model_still_predicts(tiny_model_dir):
    plain = lowbit.from_pretrained(tiny_model_dir)
    q = lowbit.from_pretrained(tiny_model_dir, quantization_config=RtnConfig(bits=8, group_size=-1), progress=False)
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = plain(ids).logits, q(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.02


def test_sharded_save_round_trip(tiny_model_dir, tmp_path):
    model = lowbit.from_pretrained(tiny_model_dir, quantization_config=RtnConfig(bits=4, group_size=32), progress=False)
    lowbit.save_quantized(model, tmp_path / "s", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert "model.safetensors.index.json" in files and SINGLE_FILE not in files
    loaded = lowbit.from_pretrained(tmp_path / "s")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_modules_to_not_convert(tiny_model_dir):
    cfg = RtnConfig(bits=4, group_size=32, modules_to_not_convert=("mlp", "layers.0.self_attn.q_proj"))
    model = lowbit.from_pretrained(tiny_model_dir, quantization_config=cfg, progress=False)
    quant = {n for n, m in model.named_modules() if isinstance(m, IntGroupedLinear)}
    assert quant == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"} - {
        "model.layers.0.self_attn.q_proj"}


def test_forced_kernel_recorded(quantized_dir):
    _, out = quantized_dir
    model = lowbit.from_pretrained(out, kernel="reference")
    assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"reference"}


def test_quantizing_twice_raises(quantized_dir):
    model, _ = quantized_dir
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.quantize(model, RtnConfig())


def test_quantized_folder_with_config_raises(quantized_dir):
    _, out = quantized_dir
    with pytest.raises(ValueError, match="already quantized"):
        lowbit.from_pretrained(out, quantization_config=RtnConfig())


def test_tokenizer_is_optional(tmp_path):
    from conftest import tiny_llama_model

    tiny_llama_model().save_pretrained(tmp_path / "plain")  # no tokenizer in the source folder
    model = lowbit.from_pretrained(tmp_path / "plain", quantization_config=RtnConfig(group_size=32), progress=False)
    lowbit.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q" / "tokenizer.json").exists()
    assert lowbit.from_pretrained(tmp_path / "q").model.layers[0].mlp.up_proj.bits == 4


def test_save_unquantized_model_raises(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        lowbit.save_quantized(lowbit.from_pretrained(tiny_model_dir), tmp_path / "x")


def test_gpt2_conv1d_model_round_trip(tmp_path):
    """GPT-2 keeps its linears as transposed Conv1D; the walker and loader handle them generically."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        tmp_path / "gpt2")
    model = lowbit.from_pretrained(tmp_path / "gpt2", quantization_config=RtnConfig(bits=4, group_size=32),
                                   progress=False)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert shapes["transformer.h.0.attn.c_attn"] == (64, 192) and shapes["transformer.h.1.mlp.c_proj"] == (256, 64)
    assert len(shapes) == 2 * 4
    lowbit.save_quantized(model, tmp_path / "q")
    loaded = lowbit.from_pretrained(tmp_path / "q")
    assert type(model).__name__ == type(loaded).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
