"""The embedded corpora (``lowbit/data/``) and calibration batches cut from text."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WIKITEXT2_SPLITS = {"test": "wikitext2-test.txt", "valid": "wikitext2-valid.txt"}
SST2_SPLITS = {"dev": "sst2-dev.tsv", "train": "sst2-train-8k.tsv"}
CALIBRATION_SEED = 0


def _read(name: str) -> str:
    return resources.files("lowbit.data").joinpath(name).read_text(encoding="utf-8")


def _split(splits: dict[str, str], split: str, what: str) -> str:
    if split not in splits:
        raise ValueError(f"{what} has no split {split!r}; use one of {', '.join(splits)}")
    return splits[split]


def wikitext2(split: str = "test") -> str:
    """The embedded WikiText-2 split (``"test"`` or ``"valid"``) as one string."""
    return _read(_split(WIKITEXT2_SPLITS, split, "WikiText-2"))


def sst2(split: str = "dev") -> list[tuple[str, int]]:
    """The embedded SST-2 split (``"dev"`` or ``"train"``) as ``(sentence, label)`` pairs, 1 = positive."""
    rows = _read(_split(SST2_SPLITS, split, "SST-2")).splitlines()[1:]  # skip the header
    out = []
    for row in rows:
        text, label = row.rsplit("\t", 1)
        out.append((text.strip(), int(label)))
    return out


def calibration_texts(calib: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """Calibration text: ``None`` -> embedded WikiText-2 valid; a path -> that UTF-8 file; a
    list of strings -> itself. Empty text is a ``ValueError``."""
    if calib is None:
        texts = [wikitext2("valid")]
    elif isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file():
            raise ValueError(f"calibration file {path} does not exist (give a UTF-8 text file)")
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"calibration file {path} is not UTF-8 text: {e}") from None
    elif isinstance(calib, Sequence) and all(isinstance(t, str) for t in calib):
        texts = list(calib)
    else:
        raise TypeError(f"calibration data must be a file path or a list of str, not {type(calib).__name__}")
    if not any(t.strip() for t in texts):
        raise ValueError("calibration text is empty")
    return texts


def calibration_batch(tokenizer, texts: Sequence[str], nsamples: int, seqlen: int,
                      seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens from ``texts`` joined by blank lines.

    Window starts are drawn uniformly with a seeded generator (the GPTQ reference's recipe),
    so the batch is deterministic. Fewer than ``seqlen`` tokens is a ``ValueError``; fewer than
    ``nsamples * seqlen`` only logs that windows overlap.

    Returns:
        int64 ``[nsamples, seqlen]``.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    ids = torch.tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() < seqlen:
        raise ValueError(
            f"too little calibration data: {ids.numel()} tokens, need at least seqlen={seqlen} "
            "(give more text or a smaller seqlen)"
        )
    if ids.numel() < nsamples * seqlen:
        log.warning("calibration text has %d tokens < nsamples*seqlen = %d: windows overlap",
                    ids.numel(), nsamples * seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])  # [nsamples, seqlen]
