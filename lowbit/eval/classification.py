"""Downstream accuracy on SST-2 sentiment: a fixed probe on an encoder, few-shot scoring of an LM.

**Encoder probe.** A logistic-regression probe is trained once on the mean-pooled embeddings of
the original (fp32) encoder over the embedded SST-2 training phrases, then held fixed. Evaluating
a quantized, pruned or distilled encoder with the same probe on the dev set shows what the
compression cost the encoder's features, and nothing else.

**Few-shot LM scoring.** For a causal LM, each dev sentence follows ``shots`` labelled examples
(drawn once, seeded, balanced) and the label whose verbalizer (``" positive"`` / ``" negative"``)
has the higher log-likelihood wins, as lm-evaluation-harness scores multiple choice. The
demonstrations are the same for every sentence, so their keys and values are computed once and
the sentences run after them in batches (the embedded SmolLM2-135M scores 0.86 4-shot on the first
200 dev sentences).

Uncalibrated few-shot accuracy also moves with the prompt's lean towards one label word, which
compression can shift while the model still ranks the sentences as well: a 3-bit model can say
" positive" to nearly every sentence. So the few-shot scores also give the accuracy after
contextual calibration and the ROC AUC of the label words' log-odds, which no constant lean
changes (:class:`FewShot`).

Accuracies carry a Wilson 95 % interval, so a difference inside it reads as noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.models import cache_keyword

VERBALIZERS = (" negative", " positive")  # label 0, label 1


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``total`` with a Wilson score interval, and the same count per true label
    (``class_correct[c]`` of ``class_total[c]``) where known: a compressed model that drifts
    towards one answer loses recall on the other label, which the overall figure hides."""

    correct: int
    total: int
    class_correct: tuple[int, ...] = ()
    class_total: tuple[int, ...] = ()

    @classmethod
    def of(cls, predictions: Sequence[int], labels: Sequence[int], classes: int = 2) -> Accuracy:
        """Score ``predictions`` against ``labels`` (both ints in ``range(classes)``)."""
        if len(predictions) != len(labels):
            raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
        hits = [0] * classes
        counts = [0] * classes
        for p, y in zip(predictions, labels):
            counts[y] += 1
            hits[y] += int(p == y)
        return cls(sum(hits), len(labels), tuple(hits), tuple(counts))

    @property
    def value(self) -> float:
        return self.correct / self.total

    @property
    def recalls(self) -> tuple[float, ...]:
        """Accuracy on each true label's examples (empty where per-label counts are unknown)."""
        return tuple(c / t for c, t in zip(self.class_correct, self.class_total))

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total, z)

    def __str__(self) -> str:
        lo, hi = self.interval()
        return f"{self.value:.3f} [{lo:.3f}, {hi:.3f}] (n={self.total})"


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for ``z=1.96``).

    Example: 8 of 10 -> (0.490, 0.943).
    """
    if total <= 0:
        raise ValueError("an accuracy needs at least one example")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def check_labels(labels: Sequence[int], what: str) -> None:
    """``ValueError`` unless ``labels`` hold both classes (0 and 1) and nothing else."""
    kinds = set(labels)
    if not kinds <= {0, 1}:
        raise ValueError(f"{what}: labels must be 0 or 1, got {sorted(kinds)}")
    if len(kinds) < 2:
        raise ValueError(f"{what} has one class only ({sorted(kinds)}); accuracy on it says nothing")


# --- encoder probe -----------------------------------------------------------------------

@torch.no_grad()
def mean_pooled(encoder: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64,
                max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' recipe): fp32 ``[n, H]``."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state.float()  # [B, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out.append(nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Probe:
    """Logistic regression on features: ``p(positive) = sigmoid(features @ weight + bias)``."""

    weight: torch.Tensor  # fp32 [H]
    bias: torch.Tensor  # fp32 []

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() @ self.weight + self.bias > 0).long()

    def accuracy(self, features: torch.Tensor, labels: Sequence[int]) -> Accuracy:
        check_labels(labels, "evaluation set")
        return Accuracy.of(self.predict(features).tolist(), labels)


PROBE_L2 = 1e-4
"""The probe's L2 penalty: of 1e-3, 1e-4 and 1e-5, the best fp32 dev accuracy with 4,000 training
phrases (0.772, 0.788, 0.779). Chosen once on dev, then fixed for every comparison."""


def train_probe(features: torch.Tensor, labels: Sequence[int], l2: float = PROBE_L2, iters: int = 100) -> Probe:
    """Fit a logistic-regression probe (L-BFGS, full batch, L2 penalty ``l2``); deterministic."""
    check_labels(labels, "probe training set")
    x = features.float()
    y = torch.tensor(labels, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(w.detach(), b.detach())


def sst2_features(encoder: nn.Module, tokenizer, split: str, limit: int | None = None):
    """``(features [n, H], labels)`` of the embedded SST-2 ``split`` (first ``limit`` rows)."""
    from lowbit.eval.data import sst2

    rows = sst2(split)[:limit]
    return mean_pooled(encoder, tokenizer, [t for t, _ in rows]), [y for _, y in rows]


def encoder_probe(encoder: nn.Module, tokenizer, train_size: int = 4000) -> Probe:
    """The probe trained on ``encoder`` (meant to be the original) over SST-2 train phrases."""
    features, labels = sst2_features(encoder, tokenizer, "train", train_size)
    return train_probe(features, labels)


def reference_probe(base_folder, train_size: int = 4000) -> Probe:
    """The probe of the original encoder in ``base_folder``, trained once and cached on disk.

    The cache key is the folder's resolved path, its weights' sizes and times, and
    ``train_size``; the probe file is safetensors in ``$LOWBIT_CACHE/probes``.
    """
    import hashlib
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from lowbit.checkpoint.loading import load_plain
    from lowbit.models import cache_dir

    folder = Path(base_folder).resolve()
    stamp = [str(folder), str(train_size), str(PROBE_L2)]
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        stamp += [f.name, str(st.st_size), str(st.st_mtime_ns)]
    path = cache_dir() / "probes" / f"sst2-{hashlib.sha256('|'.join(stamp).encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        t = load_file(path)
        return Probe(t["weight"], t["bias"])
    encoder, tokenizer = load_plain(folder, torch.float32, "cpu")
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer; the probe needs one")
    probe = encoder_probe(encoder, tokenizer, train_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"weight": probe.weight.contiguous(), "bias": probe.bias.reshape(())}, str(tmp))
    tmp.replace(path)
    return probe


def sst2_probe_accuracy(encoder: nn.Module, tokenizer, probe: Probe) -> Accuracy:
    """Dev accuracy of ``encoder``'s features under a fixed ``probe``."""
    features, labels = sst2_features(encoder, tokenizer, "dev")
    return probe.accuracy(features, labels)


# --- few-shot LM scoring -----------------------------------------------------------------

def fewshot_prompt(demos: Sequence[tuple[str, int]], text: str) -> str:
    parts = [f"Review: {t}\nSentiment:{VERBALIZERS[y]}\n\n" for t, y in demos]
    return "".join(parts) + f"Review: {text}\nSentiment:"


def pick_demos(pool: Sequence[tuple[str, int]], shots: int, seed: int = 0) -> list[tuple[str, int]]:
    """``shots`` examples, half of each class (the extra one positive), in a seeded order."""
    if shots < 0:
        raise ValueError(f"shots={shots} must be >= 0")
    rng = random.Random(seed)
    by = {c: [r for r in pool if r[1] == c] for c in (0, 1)}
    want = {1: (shots + 1) // 2, 0: shots // 2}
    for c, n in want.items():
        if len(by[c]) < n:
            raise ValueError(f"{shots} shots need {n} examples of label {c}; the pool has {len(by[c])}")
    demos = rng.sample(by[1], want[1]) + rng.sample(by[0], want[0])
    rng.shuffle(demos)
    return demos


def _verbalizer_ids(tokenizer, prompt: str, prompt_ids: list[int]) -> list[list[int]]:
    """Each verbalizer's tokens as they follow ``prompt`` (tokenized as ``prompt_ids``)."""
    words = []
    for word in VERBALIZERS:
        word_ids = tokenizer(prompt + word, add_special_tokens=False)["input_ids"][len(prompt_ids):]
        if not word_ids:
            raise ValueError(f"verbalizer {word!r} tokenizes to nothing after the prompt")
        words.append(word_ids)
    return words


@torch.no_grad()
def verbalizer_logprobs(lm: nn.Module, tokenizer, prompt: str) -> list[float]:
    """Log-likelihood of each verbalizer's tokens after ``prompt`` (one forward per verbalizer)."""
    device = next(lm.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for word_ids in _verbalizer_ids(tokenizer, prompt, prompt_ids):
        ids = torch.tensor([prompt_ids + word_ids], device=device)
        logp = torch.log_softmax(lm(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)
        scores.append(float(logp.gather(1, torch.tensor(word_ids, device=device).unsqueeze(1)).sum()))
    return scores


def _returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def _verbalizer_rows(tokenizer, prompt: str, prompt_ids: list[int],
                     skip: int) -> list[tuple[list[int], list[tuple[int, int, list[int]]]]] | None:
    """The rows that score every verbalizer after ``prompt`` (tokenized as ``prompt_ids``), its
    first ``skip`` tokens left out.

    A row is ``(tokens, [(verbalizer, first position, word tokens), ...])``: the word's tokens are
    predicted from ``first position`` on. When every verbalizer is one token, one row (the prompt)
    scores them all. ``None`` when the prompt does not tokenize to more than ``skip`` tokens.
    """
    tail = prompt_ids[skip:]
    if not tail:
        return None
    words = _verbalizer_ids(tokenizer, prompt, prompt_ids)
    if all(len(w) == 1 for w in words):
        return [(tail, [(v, len(tail) - 1, w) for v, w in enumerate(words)])]
    return [(tail + w, [(v, len(tail) - 1, w)]) for v, w in enumerate(words)]


@torch.no_grad()
def fewshot_logprobs(lm: nn.Module, tokenizer, prefix: str, texts: Sequence[str], batch_size: int = 16,
                     progress: bool = False) -> list[list[float]]:
    """``verbalizer_logprobs(lm, tokenizer, prefix + text)`` for every text, computed fast.

    The prefix (the demonstrations) runs once; its keys and values are copied into each batch of
    sentences, which run right-padded after it (causal attention never looks at the padding to a
    token's right). A prompt whose tokens do not start with the prefix's is scored whole.
    """
    import copy

    device = next(lm.parameters()).device
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if texts:  # the prefix's last tokens may merge differently once text follows ("\n\n" + "Review")
        one = tokenizer(prefix + texts[0], add_special_tokens=False)["input_ids"]
        common = next((k for k, (a, b) in enumerate(zip(prefix_ids, one)) if a != b), min(len(prefix_ids), len(one)))
        prefix_ids = prefix_ids[:common]
    scores = [[0.0] * len(VERBALIZERS) for _ in texts]
    jobs = []  # (text index, tokens, [(verbalizer, first position, word tokens)])
    whole = []
    for i, text in enumerate(texts):
        prompt = prefix + text
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        starts = prefix_ids and prompt_ids[: len(prefix_ids)] == prefix_ids
        rows = _verbalizer_rows(tokenizer, prompt, prompt_ids, len(prefix_ids)) if starts else None
        if rows is None:
            whole.append(i)
        else:
            jobs += [(i, tokens, spans) for tokens, spans in rows]
    if jobs:
        cache_rows = min(batch_size, len(jobs))
        ids = torch.tensor([prefix_ids], device=device).expand(cache_rows, -1)
        cache = _returned_cache(lm(input_ids=ids, use_cache=True))
    todo = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="few-shot batches", unit="batch")
    for start in todo:
        batch = jobs[start : start + batch_size]
        width = max(len(t) for _, t, _ in batch)
        rows = [t + [t[-1]] * (width - len(t)) for _, t, _ in batch]
        rows += [rows[0]] * (cache_rows - len(rows))  # the prefix cache has a fixed batch size
        out = lm(input_ids=torch.tensor(rows, device=device), use_cache=True,
                 **{cache_keyword(lm): copy.deepcopy(cache)})
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        for r, (i, _, spans) in enumerate(batch):
            for v, first, word in spans:
                pos = torch.arange(first, first + len(word), device=device)
                scores[i][v] = float(logp[r, pos, torch.tensor(word, device=device)].sum())
    for i in whole:
        scores[i] = verbalizer_logprobs(lm, tokenizer, prefix + texts[i])
    return scores


CONTENT_FREE = ("N/A", "", "[MASK]")
"""Content-free review texts of contextual calibration (Zhao et al. 2021): the label words' odds
after them measure the prompt's own lean towards one label."""


def roc_auc(margins: Sequence[float], labels: Sequence[int]) -> float:
    """Chance that a random label-1 example has a larger margin than a random label-0 one, ties
    counting half (the Mann-Whitney U over ``n1 * n0``): how well the margins separate the
    labels, whatever the threshold.

    Example: margins (0.1, 0.4, 0.35, 0.8), labels (0, 0, 1, 1) -> 0.75.
    """
    check_labels(labels, "evaluation set")
    order = sorted(range(len(margins)), key=lambda i: margins[i])
    ranks = [0.0] * len(margins)
    i = 0
    while i < len(order):  # average 1-based ranks over ties
        j = i
        while j + 1 < len(order) and margins[order[j + 1]] == margins[order[i]]:
            j += 1
        for t in order[i : j + 1]:
            ranks[t] = (i + j) / 2 + 1
        i = j + 1
    n1 = sum(labels)
    n0 = len(labels) - n1
    return (sum(r for r, y in zip(ranks, labels) if y == 1) - n1 * (n1 + 1) / 2) / (n1 * n0)


@dataclass(frozen=True)
class FewShot:
    """Few-shot scores of one model.

    ``accuracy``: the likelier label word wins. ``calibrated``: the same after contextual
    calibration, the label words' log-odds after the content-free texts (``bias``, positive
    leaning to label 1) subtracted from every sentence's. ``auc``: :func:`roc_auc` of the
    sentences' log-odds, which no constant lean changes. A compressed model whose ``accuracy``
    falls while ``auc`` and ``calibrated`` hold has shifted its lean, not lost the task.
    """

    accuracy: Accuracy
    calibrated: Accuracy
    auc: float
    bias: float


def _log_odds(scores: Sequence[float]) -> float:
    """Label 1's log-likelihood minus label 0's."""
    return scores[1] - scores[0]


def fewshot_sst2_scores(lm: nn.Module, tokenizer, shots: int = 4, limit: int | None = None, seed: int = 0,
                        progress: bool = False, batch_size: int = 16) -> FewShot:
    """Few-shot SST-2 dev scores of a causal LM (demos from the train phrases)."""
    from lowbit.eval.data import sst2

    rows = sst2("dev")[:limit]
    labels = [y for _, y in rows]
    check_labels(labels, "evaluation set")
    demos = pick_demos(sst2("train"), shots, seed)
    prefix = fewshot_prompt(demos, "")[: -len(fewshot_prompt([], ""))]
    texts = [fewshot_prompt([], text) for text, _ in rows] + [fewshot_prompt([], t) for t in CONTENT_FREE]
    scores = fewshot_logprobs(lm, tokenizer, prefix, texts, batch_size, progress)
    odds = [_log_odds(s) for s in scores[: len(rows)]]
    # the content-free texts' label probabilities (normalised over the labels) are averaged, then
    # turned back into log-odds, as the calibration's authors average them
    p1 = sum(torch.sigmoid(torch.tensor(_log_odds(s), dtype=torch.float64)).item() for s in scores[len(rows):])
    p1 /= len(CONTENT_FREE)
    bias = math.log(p1) - math.log1p(-p1) if 0 < p1 < 1 else math.copysign(math.inf, p1 - 0.5)
    return FewShot(accuracy=Accuracy.of([int(o > 0) for o in odds], labels),
                   calibrated=Accuracy.of([int(o > bias) for o in odds], labels),
                   auc=roc_auc(odds, labels), bias=bias)


def fewshot_sst2(lm: nn.Module, tokenizer, shots: int = 4, limit: int | None = None, seed: int = 0,
                 progress: bool = False, batch_size: int = 16) -> Accuracy:
    """Few-shot SST-2 dev accuracy of a causal LM (:func:`fewshot_sst2_scores`' ``accuracy``)."""
    return fewshot_sst2_scores(lm, tokenizer, shots, limit, seed, progress, batch_size).accuracy
