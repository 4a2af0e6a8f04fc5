"""Perplexity windows and values, embedded corpora, calibration batches, sizes and peak memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.data import calibration_batch, calibration_texts, sst2, wikitext2
from lowbit.eval.memory import folder_bytes, model_weight_bytes
from lowbit.eval.perplexity import text_perplexity, token_perplexity, windows

from conftest import byte_tokenizer, tiny_llama_model


# --- windows --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,seqlen,stride", [(10, 4, 4), (11, 4, 2), (2, 8, 8), (100, 16, 5), (17, 16, 16),
                                             (33, 16, 1)])
def test_windows_score_each_target_at_most_once_and_within_context(n, seqlen, stride):
    spans = windows(n, seqlen, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert len(scored) == len(set(scored))
    # each window fits seqlen, and every target has context inside its window:
    assert all(end - begin <= seqlen and begin < first < end for begin, end, first in spans)
    if stride < seqlen:  # overlapping windows score every token but the first
        assert sorted(scored) == list(range(1, n))


def test_disjoint_windows_skip_each_window_start():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


@pytest.mark.parametrize("seqlen,stride,msg", [(1, 1, "seqlen=1"), (8, 0, "stride=0"), (8, 9, "stride=9")])
def test_bad_windows_raise(seqlen, stride, msg):
    with pytest.raises(ValueError, match=msg):
        windows(100, seqlen, stride)


# --- perplexity -----------------------------------------------------------------------------

def _manual_ppl(model, ids, spans):
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in spans:
            logp = F.log_softmax(model(ids[begin:end][None]).logits[0].double(), dim=-1)
            for t in range(first, end):
                nll -= logp[t - begin - 1, ids[t]].item()
                count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("seqlen,stride", [(16, 16), (16, 8), (7, 3)])
def test_perplexity_matches_token_by_token_sum(seqlen, stride):
    model = tiny_llama_model()
    ids = torch.randint(0, 256, (61,), generator=torch.Generator().manual_seed(3))
    got = token_perplexity(model, ids, seqlen=seqlen, stride=stride)
    assert got == pytest.approx(_manual_ppl(model, ids, windows(61, seqlen, stride)), rel=1e-5)


def test_perplexity_is_deterministic_and_near_vocab_for_random_model():
    model = tiny_llama_model()
    text = wikitext2("test")[:4000]
    a = text_perplexity(model, byte_tokenizer(), text, seqlen=64, max_tokens=500)
    b = text_perplexity(model, byte_tokenizer(), text, seqlen=64, max_tokens=500)
    assert a == b
    assert 100 < a < 600  # an untrained 256-symbol model is close to uniform


def test_perplexity_of_too_short_input_raises():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_perplexity(tiny_llama_model(), torch.tensor([5]), seqlen=8)
    with pytest.raises(ValueError, match="max_tokens=1"):
        text_perplexity(tiny_llama_model(), byte_tokenizer(), "hello", seqlen=8, max_tokens=1)


# --- embedded corpora and calibration -------------------------------------------------------

def test_embedded_corpora():
    assert wikitext2("test").lstrip().startswith("= Robert <unk> =")
    assert len(wikitext2("valid")) > 1_000_000
    dev = sst2("dev")
    assert len(dev) == 872 and sum(label for _, label in dev) == 444
    assert len(sst2("train")) == 8000
    assert dev[0] == ("it 's a charming and often affecting journey .", 1)


@pytest.mark.parametrize("fn,split", [(wikitext2, "train"), (sst2, "test")])
def test_unknown_split_raises(fn, split):
    with pytest.raises(ValueError, match=f"no split '{split}'"):
        fn(split)


def test_calibration_batch_is_deterministic_windows_of_the_text():
    tok = byte_tokenizer()
    texts = calibration_texts(["first text " * 20, "second text " * 20])
    a = calibration_batch(tok, texts, nsamples=5, seqlen=32)
    b = calibration_batch(tok, texts, nsamples=5, seqlen=32)
    assert a.dtype == torch.int64 and a.shape == (5, 32) and torch.equal(a, b)
    full = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    for row in a.tolist():
        assert any(full[s : s + 32] == row for s in range(len(full) - 31))
    assert not torch.equal(a, calibration_batch(tok, texts, nsamples=5, seqlen=32, seed=1))


def test_calibration_from_file_and_default(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("some calibration text\n", encoding="utf-8")
    assert calibration_texts(path) == ["some calibration text\n"]
    assert calibration_texts(str(path)) == ["some calibration text\n"]
    assert calibration_texts(None) == [wikitext2("valid")]


@pytest.mark.parametrize("calib,exc,msg", [
    ([""], ValueError, "calibration text is empty"),
    (["  \n"], ValueError, "calibration text is empty"),
    ("no/such/file.txt", ValueError, "does not exist"),
    ([1, 2], TypeError, "file path or a list of str"),
], ids=["empty", "blank", "missing-file", "not-text"])
def test_bad_calibration_texts(calib, exc, msg):
    with pytest.raises(exc, match=msg):
        calibration_texts(calib)


def test_calibration_file_not_utf8(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        calibration_texts(tmp_path / "bin.txt")


@pytest.mark.parametrize("texts,nsamples,seqlen,msg", [
    (["a"], 4, 16, "too little calibration data: 1 tokens"),
    (["abc"], 4, 16, "too little calibration data: 3 tokens"),
    (["abc" * 50], 0, 16, "nsamples >= 1"),
    (["abc" * 50], 4, 1, "seqlen >= 2"),
], ids=["one-token", "short", "no-samples", "seqlen-1"])
def test_too_little_calibration_data(texts, nsamples, seqlen, msg):
    with pytest.raises(ValueError, match=msg):
        calibration_batch(byte_tokenizer(), texts, nsamples=nsamples, seqlen=seqlen)


# --- sizes and memory -----------------------------------------------------------------------

def test_model_weight_bytes_counts_tied_weights_once():
    model = tiny_llama_model()
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups ties
    assert model_weight_bytes(model) == params  # the tiny Llama has no persistent buffers
    assert model_weight_bytes(model.half()) == params // 2


def test_folder_bytes_counts_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    assert folder_bytes(tmp_path) == 1000


_PEAK_SCRIPT = """
import torch
from lowbit.eval.memory import PeakMemory
with PeakMemory("cpu") as base:
    pass
with PeakMemory("cpu") as peak:
    buf = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    del buf
print(peak.method, peak.peak_bytes - base.peak_bytes)
"""


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process: in the test process, memory freed by earlier tests stays resident and
    an allocation may reuse it without raising the peak."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, check=True).stdout
    method, grown = out.rsplit(" ", 1)
    assert method.strip()
    assert int(grown) > 48 * 2**20
