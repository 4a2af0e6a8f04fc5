"""SST-2 accuracy: Wilson intervals, the fixed encoder probe, few-shot LM scoring."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import byte_tokenizer, tiny_llama_model
from lowbit.eval import classification as C


@pytest.mark.parametrize("correct,total,want", [(8, 10, (0.490, 0.943)), (0, 10, (0.0, 0.278)),
                                                (10, 10, (0.722, 1.0)), (436, 872, (0.467, 0.533))])
def test_wilson_interval(correct, total, want):
    lo, hi = C.wilson_interval(correct, total)
    assert (round(lo, 3), round(hi, 3)) == want


def test_accuracy_text_and_errors():
    assert str(C.Accuracy(8, 10)) == "0.800 [0.490, 0.943] (n=10)"
    with pytest.raises(ValueError, match="at least one example"):
        C.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="one class only"):
        C.check_labels([1, 1, 1], "evaluation set")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        C.check_labels([0, 1, 2], "evaluation set")


def test_accuracy_counts_each_label():
    acc = C.Accuracy.of([1, 1, 1, 0, 1], [0, 1, 1, 0, 0])
    assert (acc.correct, acc.total, acc.class_correct, acc.class_total) == (3, 5, (1, 2), (3, 2))
    assert acc.recalls == pytest.approx((1 / 3, 1.0))
    assert str(acc) == str(C.Accuracy(3, 5))
    assert C.Accuracy(3, 5).recalls == ()
    with pytest.raises(ValueError, match="4 predictions for 5 labels"):
        C.Accuracy.of([1, 1, 1, 0], [0, 1, 1, 0, 0])


def test_roc_auc_against_counting_pairs():
    assert C.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    gen = torch.Generator().manual_seed(3)
    margins = torch.randint(-6, 6, (60,), generator=gen).float().div(2).tolist()  # many ties
    labels = [int(m + r > 0) for m, r in zip(margins, torch.randn(60, generator=gen).tolist())]
    pairs = [(a, b) for a, ya in zip(margins, labels) if ya == 1 for b, yb in zip(margins, labels) if yb == 0]
    want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert C.roc_auc(margins, labels) == pytest.approx(want, abs=1e-12)
    assert C.roc_auc([m + 3.0 for m in margins], labels) == pytest.approx(want, abs=1e-12)  # no lean changes it
    with pytest.raises(ValueError, match="one class only"):
        C.roc_auc([0.1, 0.2], [1, 1])


def test_probe_learns_a_separable_problem_deterministically():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=gen)
    y = (x[:, 3] - 0.5 * x[:, 7] > 0).long().tolist()
    a, b = C.train_probe(x, y), C.train_probe(x, y)
    assert torch.equal(a.weight, b.weight)
    assert a.accuracy(x, y).value >= 0.97
    x_test = torch.randn(100, 16, generator=gen)
    y_test = (x_test[:, 3] - 0.5 * x_test[:, 7] > 0).long().tolist()
    assert a.accuracy(x_test, y_test).value >= 0.9


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_mean_pooling_ignores_padding_and_normalises():
    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token
    enc = tiny_bert()
    short = "a fine film"
    alone = C.mean_pooled(enc, tok, [short])
    batched = C.mean_pooled(enc, tok, [short, "a much longer sentence that forces padding of the first"], batch_size=2)
    assert alone.shape == (1, 32)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(2))


def test_pick_demos_balanced_seeded_and_checked():
    pool = [(f"p{i}", 1) for i in range(5)] + [(f"n{i}", 0) for i in range(5)]
    demos = C.pick_demos(pool, 4, seed=1)
    assert sorted(y for _, y in demos) == [0, 0, 1, 1]
    assert demos == C.pick_demos(pool, 4, seed=1) != C.pick_demos(pool, 4, seed=2)
    with pytest.raises(ValueError, match="need 6 examples of label 1; the pool has 5"):
        C.pick_demos(pool, 11)


def test_fewshot_prompt_format():
    prompt = C.fewshot_prompt([("great", 1), ("dull", 0)], "fine")
    assert prompt == "Review: great\nSentiment: positive\n\nReview: dull\nSentiment: negative\n\nReview: fine\nSentiment:"


def test_verbalizer_logprobs_are_the_summed_token_logprobs():
    lm, tok = tiny_llama_model(), byte_tokenizer()
    prompt = "Review: ok\nSentiment:"
    scores = C.verbalizer_logprobs(lm, tok, prompt)
    ids = tok(prompt + " positive", add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = sum(float(logp[i - 1, ids[i]]) for i in range(n, len(ids)))
    assert scores[1] == pytest.approx(want, abs=1e-4)
    acc = C.fewshot_sst2(lm, tok, shots=2, limit=12)
    assert acc.total == 12 and 0 <= acc.correct <= 12
    assert sum(acc.class_total) == 12 and sum(acc.class_correct) == acc.correct
    r = C.fewshot_sst2_scores(lm, tok, shots=2, limit=12)
    assert r.accuracy == acc and r.calibrated.total == 12 and 0 <= r.auc <= 1 and math.isfinite(r.bias)


def test_contextual_calibration_removes_a_constant_lean(monkeypatch):
    """Scores that separate the labels but all lean to " positive": uncalibrated accuracy is
    the positive share, calibrated accuracy and the AUC are perfect."""
    from lowbit.eval.data import sst2

    rows = sst2("dev")[:40]
    lean = 5.0

    def fake_logprobs(lm, tokenizer, prefix, texts, batch_size=16, progress=False):
        assert texts[len(rows):] == [C.fewshot_prompt([], t) for t in C.CONTENT_FREE]
        out = [[-1.0, -1.0 + lean + (1.0 if y else -1.0)] for _, y in rows]
        return out + [[-2.0, -2.0 + lean]] * len(C.CONTENT_FREE)

    monkeypatch.setattr(C, "fewshot_logprobs", fake_logprobs)
    r = C.fewshot_sst2_scores(None, None, shots=2, limit=40)
    positives = sum(y for _, y in rows)
    assert r.accuracy.correct == positives and r.accuracy.recalls == (0.0, 1.0)
    assert r.bias == pytest.approx(lean)
    assert r.calibrated.value == 1.0 and r.auc == 1.0


@pytest.mark.parametrize("verbalizers", [C.VERBALIZERS, ("a", "b")], ids=["multi-token", "one-token"])
def test_fewshot_logprobs_match_whole_prompts(monkeypatch, verbalizers):
    """The cached-prefix batches score what each whole prompt scores on its own: 7 sentences of
    different lengths, batches of 3 (the last one partial), words of several tokens or of one."""
    monkeypatch.setattr(C, "VERBALIZERS", verbalizers)
    lm, tok = tiny_llama_model(), byte_tokenizer()
    prefix = C.fewshot_prompt([("great fun", 1), ("a bore", 0)], "")[: -len(C.fewshot_prompt([], ""))]
    texts = [C.fewshot_prompt([], t) for t in ["ok", "not good at all", "x", "fine film", "meh", "long " * 9, "z!"]]
    fast = C.fewshot_logprobs(lm, tok, prefix, texts, batch_size=3)
    for text, got in zip(texts, fast):
        want = C.verbalizer_logprobs(lm, tok, prefix + text)
        assert got == pytest.approx(want, abs=1e-4)
        assert got[0] != got[1]
    assert C.fewshot_logprobs(lm, tok, "", texts[:2]) == [C.verbalizer_logprobs(lm, tok, t) for t in texts[:2]]


def test_fewshot_prefix_whose_last_tokens_merge_with_the_text():
    """A prefix ending in tokens that merge differently once text follows is cut back to the tokens
    the prompts share (SmolLM2's tokenizer reads a final "\n\n" as one token, "\n\nReview" as
    "\n", "\n", "Review")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(chars[:255])}  # byte 255's id goes to the merged "\n\n"
    nl = bytes_to_unicode()[ord("\n")]
    vocab[nl + nl] = 255
    base = Tokenizer(models.BPE(vocab=vocab, merges=[(nl, nl)]))
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=base)
    assert len(tok("a\n\n", add_special_tokens=False)["input_ids"]) == 2
    lm = tiny_llama_model()
    prefix = "Review: fun\nSentiment: positive\n\n"
    texts = ["Review: ok\nSentiment:", "Review: bad\nSentiment:"]
    calls = []
    hook = lm.register_forward_hook(lambda *_: calls.append(1))
    fast = C.fewshot_logprobs(lm, tok, prefix, texts)
    hook.remove()
    assert len(calls) == 2  # the shared prefix once, then one batch: no prompt fell back to a whole run
    for text, got in zip(texts, fast):
        assert got == pytest.approx(C.verbalizer_logprobs(lm, tok, prefix + text), abs=1e-4)


def tiny_encoder_dir(tmp_path, monkeypatch) -> None:
    """A tiny BERT with the byte tokenizer in ``tmp_path/enc``; the probe cache under ``tmp_path``."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    tok = byte_tokenizer()
    tok.pad_token = tok.eos_token
    tiny_bert().save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")


def test_reference_probe_is_cached(tmp_path, monkeypatch):
    tiny_encoder_dir(tmp_path, monkeypatch)
    first = C.reference_probe(tmp_path / "enc", train_size=200)
    files = list((tmp_path / "cache" / "probes").glob("*.safetensors"))
    assert len(files) == 1
    again = C.reference_probe(tmp_path / "enc", train_size=200)
    assert torch.equal(first.weight, again.weight)
    assert C.reference_probe(tmp_path / "enc", train_size=100).weight.shape == first.weight.shape
    assert len(list((tmp_path / "cache" / "probes").glob("*.safetensors"))) == 2


def test_eval_of_an_encoder_reports_probe_accuracy(tmp_path, monkeypatch):
    from lowbit.eval.summary import evaluate_folder, format_table

    tiny_encoder_dir(tmp_path, monkeypatch)
    row = evaluate_folder(tmp_path / "enc", label="tiny", tokens=0, seqlen=0, probe_base=tmp_path / "enc")
    assert row.perplexity is None and row.task == "SST-2 probe" and row.accuracy.total == 872
    assert "SST-2 probe accuracy" in format_table([row]) and "perplexity" not in format_table([row])
    with pytest.raises(ValueError, match="encoder: few-shot scoring"):
        evaluate_folder(tmp_path / "enc", label="tiny", tokens=0, seqlen=0, shots=2)


@pytest.mark.real
def test_minilm_probe_accuracy_and_8bit_encoder():
    """The fixed probe on the real encoder reads SST-2 well above chance; 8-bit RTN keeps it."""
    import lowbit
    from lowbit.checkpoint.loading import load_tokenizer
    from lowbit.models import default_encoder_path

    folder = default_encoder_path()
    tok = load_tokenizer(folder)
    enc = lowbit.from_pretrained(folder)
    probe = C.reference_probe(folder)  # cached: the CLI test below reuses it
    base = C.sst2_probe_accuracy(enc, tok, probe)
    assert base.value >= 0.74, str(base)
    q8 = lowbit.from_pretrained(folder, quantization_config=lowbit.RtnConfig(bits=8, group_size=128), progress=False)
    acc = C.sst2_probe_accuracy(q8, tok, probe)
    assert abs(acc.value - base.value) <= 0.02, f"{acc} vs {base}"


@pytest.mark.real
def test_cli_eval_encoder_and_fewshot(capsys):
    from lowbit.cli import main

    assert main(["eval", "encoder"]) == 0
    assert "SST-2 probe accuracy" in capsys.readouterr().out
    assert main(["eval", "default", "--tokens", "512", "--shots", "2", "--examples", "8"]) == 0
    out = capsys.readouterr().out
    assert "SST-2 2-shot accuracy" in out and "(n=8)" in out and "perplexity" in out and "few-shot AUC" in out


def test_probe_folder_without_tokenizer_and_negative_shots(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    tiny_bert().save_pretrained(tmp_path / "enc")  # no tokenizer beside it
    with pytest.raises(ValueError, match="has no tokenizer; the probe needs one"):
        C.reference_probe(tmp_path / "enc", train_size=50)
    with pytest.raises(ValueError, match="shots=-1 must be >= 0"):
        C.pick_demos([("a", 0), ("b", 1)], -1)
