"""Pruning baselines: magnitude, Wanda and SparseGPT, unstructured or N:M (e.g. 2:4).

They answer the question quantization is compared against: at the same calibration data, what
does zeroing half the weights cost? Each sets weights of the model's linears to zero in place
(the output embedding and ``modules_to_not_convert`` excepted) and keeps them dense: a 50 %
sparse fp32 matrix stored as CSR would take more bytes than dense (a 4-byte index per kept
value), and 2:4 pays off only in kernels that read it, so pruned models are saved as plain
dense checkpoints with zeros.

* **magnitude**: drop the smallest ``|W|`` of each layer (unstructured) or of each group of M
  inputs in a row (N:M).
* **Wanda** (Sun et al., 2023): score ``|W_ij| * ||x_j||_2`` over the calibration tokens, drop the
  lowest per output row (or per N:M group); no weight update.
* **SparseGPT** (Frantar & Alistarh, 2023): the OBS-style solve GPTQ uses, with pruning in place
  of rounding: block by block, choose the mask by ``w^2 / [H^-1]_jj^2`` and spread each pruned
  weight's error over the not-yet-visited columns. Shares the Hessian and its inverse factor
  with :mod:`lowbit.methods.gptq`.

Wanda and SparseGPT run block by block on calibration text like GPTQ (each block sees the
already-pruned earlier blocks' outputs).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.methods.base import Quantizer
from lowbit.methods.gptq import HessianStats, inverse_hessian_factor
from lowbit.methods.walk import linear_weight

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What to prune and how.

    ``pattern``: ``"unstructured"`` (``sparsity`` of each layer, or of each row for Wanda) or
    ``"N:M"`` (N of every M consecutive inputs of a row are zeroed; ``sparsity`` must be N/M).
    ``sparsity=None`` means 0.5, or N/M for an N:M pattern.
    """

    method: str
    sparsity: float | None = None
    pattern: str = "unstructured"
    nsamples: int = 128
    model_seqlen: int | None = None
    damp_percent: float = 0.01
    block_size: int = 128
    modules_to_not_convert: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.sparsity is None:
            nm = self.n_m
            object.__setattr__(self, "sparsity", 0.5 if nm is None else nm[0] / nm[1])
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} must be between 0 and 1 (exclusive)")
        nm = self.n_m
        if nm is not None and abs(nm[0] / nm[1] - self.sparsity) > 1e-9:
            raise ValueError(f"pattern {self.pattern} zeroes {nm[0]}/{nm[1]} of the weights, but sparsity={self.sparsity}")
        if self.nsamples < 1:
            raise ValueError(f"nsamples={self.nsamples} must be >= 1")

    @property
    def quant_method(self) -> str:
        """The method's name where shared code names the config's method (e.g. calibration errors)."""
        return self.method

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, None for unstructured."""
        if self.pattern == "unstructured":
            return None
        try:
            n, m = (int(v) for v in self.pattern.split(":"))
        except ValueError:
            raise ValueError(f"pattern={self.pattern!r}: use 'unstructured' or 'N:M' such as '2:4'") from None
        if not 0 < n < m:
            raise ValueError(f"pattern={self.pattern!r}: need 0 < N < M")
        return n, m

    def label(self) -> str:
        return f"{self.method} {self.pattern if self.n_m else f'{self.sparsity:.0%}'}"


# --- masks -------------------------------------------------------------------------------

def lowest_mask(score: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Boolean ``[N, K]`` mask of the entries to zero: the lowest ``score``s.

    N:M: in every group of M consecutive columns of a row, the N lowest (K must divide by M).
    Unstructured: ``round(sparsity * count)`` lowest of each row (``per_row``) or of the matrix.
    Ties break by position (``argsort`` is stable), so the count is exact.
    """
    rows, k = score.shape
    if n_m is not None:
        n, m = n_m
        if k % m:
            raise ValueError(f"{k} inputs do not split into groups of {m} for an {n}:{m} pattern")
        idx = torch.argsort(score.reshape(rows, k // m, m), dim=-1, stable=True)[..., :n]
        mask = torch.zeros(rows, k // m, m, dtype=torch.bool, device=score.device)
        return mask.scatter_(-1, idx, True).reshape(rows, k)
    flat = score if per_row else score.reshape(1, -1)
    drop = int(round(sparsity * flat.shape[1]))
    idx = torch.argsort(flat, dim=1, stable=True)[:, :drop]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return mask.reshape(rows, k)


def magnitude_mask(w: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the smallest ``|W|``: per layer (unstructured) or per N:M group."""
    return lowest_mask(w.abs().float(), sparsity, n_m, per_row=False)


def wanda_mask(w: torch.Tensor, input_norm: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero the lowest ``|W_ij| * ||x_j||`` per output row (or per N:M group).

    Args:
        w: ``[N, K]``; input_norm: fp32 ``[K]``, the L2 norm of each input feature over the tokens.
    """
    return lowest_mask(w.abs().float() * input_norm.float()[None, :], sparsity, n_m, per_row=True)


class InputNormStats:
    """Running sum of squares of each input feature over all calibration tokens (Wanda)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sumsq = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.sumsq.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("calibration activations contain NaN or Inf")
        self.sumsq += (x * x).sum(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None, *,
                    block_size: int = 128, damp_percent: float = 0.01) -> torch.Tensor:
    """SparseGPT on one layer: the pruned, error-compensated weight (fp32 ``[N, K]``).

    Args:
        W: ``[N, K]`` (not modified); H: fp32 ``[K, K]`` from :class:`HessianStats`.
        block_size: columns per block; the unstructured mask is chosen per block (``sparsity``
            of the block's entries by ``w^2 / U_jj^2``), an N:M mask per group of M columns.
    """
    n, k = W.shape
    if n_m is not None and block_size % n_m[1]:
        raise ValueError(f"block_size={block_size} must be a multiple of M={n_m[1]}")
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, _ = inverse_hessian_factor(H, damp_percent)
    del H
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)  # [B]
        if n_m is None:
            mask1 = lowest_mask(W1 ** 2 / d[None, :] ** 2, sparsity, None, per_row=False)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:  # N:M: choose this group's mask now, from updated weights
                m = n_m[1]
                mask1[:, i : i + m] = lowest_mask(W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2, 0.0, n_m,
                                                  per_row=True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


# --- the block runner's side -------------------------------------------------------------

class Pruner(Quantizer[PruneConfig]):
    """Prunes each linear in place (the module stays an ``nn.Linear``/``Conv1D``)."""

    true_sequential = True

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        return self.config.method != "magnitude"

    def check_layer(self, name: str, linear: nn.Module) -> None:
        nm = self.config.n_m
        k = linear_weight(linear).shape[1]
        if nm is not None and k % nm[1]:
            raise ValueError(f"{name}: {k} inputs do not split into groups of {nm[1]} for the {self.config.pattern} pattern")

    def collect(self, name: str, linear: nn.Module):
        k = linear_weight(linear).shape[1]
        dev = linear_weight(linear).device
        if self.config.method == "wanda":
            return InputNormStats(k, dev)
        if self.config.method == "sparsegpt":
            return HessianStats(k, dev)
        return None

    def quantize_layer(self, name: str, linear: nn.Module, stats) -> nn.Module:
        cfg = self.config
        w = linear_weight(linear)  # [N, K] view of the module's weight
        if cfg.method == "magnitude":
            w.masked_fill_(magnitude_mask(w, cfg.sparsity, cfg.n_m), 0)
        elif cfg.method == "wanda":
            w.masked_fill_(wanda_mask(w, stats.norm, cfg.sparsity, cfg.n_m), 0)
        else:
            w.copy_(sparsegpt_prune(w, stats.H, cfg.sparsity, cfg.n_m, block_size=cfg.block_size,
                                    damp_percent=cfg.damp_percent))
        return linear

    def empty_module(self, name, linear, dtype):
        raise NotImplementedError("pruned models are saved and loaded as plain models")


def prune(model: nn.Module, config: PruneConfig, calib=None, *, tokenizer=None, device=None,
          progress: bool = True) -> nn.Module:
    """Prune ``model``'s linears in place (see the module docstring); calibration as :func:`lowbit.quantize`."""
    from lowbit.api import _calibration_ids, _quantize_weights_only, resolve_device
    from lowbit.methods.calibration import quantize_blockwise

    pruner = Pruner(config)
    pruner.check_model(model)
    if not pruner.requires_calibration:
        _quantize_weights_only(model, pruner, progress)
        return model
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    ids = _calibration_ids(calib, tokenizer, config)
    quantize_blockwise(model, pruner, ids, device, progress=progress)
    return model


def sparsity_of(model: nn.Module, skip: tuple[str, ...] = ()) -> float:
    """Fraction of zero weights over the model's linears (the output embedding excluded)."""
    from lowbit.methods.walk import default_skips, find_linears

    zeros = total = 0
    for lin in find_linears(model, set(skip) | default_skips(model)).values():
        w = linear_weight(lin)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def save_pruned(model: nn.Module, path, config: PruneConfig, tokenizer=None):
    """Save a pruned model as a plain dense checkpoint (atomically), noting the pruning in
    ``config.json`` under ``lowbit_pruning``."""
    import dataclasses

    from lowbit.checkpoint.loading import save_plain

    model.config.lowbit_pruning = {**dataclasses.asdict(config), "measured_sparsity": sparsity_of(model)}
    return save_plain(model, path, tokenizer)
