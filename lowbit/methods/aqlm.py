"""AQLM (Egiazarian et al., 2024): additive quantization of a layer's weight with multiple codebooks.

Each group of ``og`` output rows x ``ig`` input columns of ``W [N, K]`` becomes
``s[o] * sum_c codebooks[c, code[o, i, c]]``. The codes, codebooks and scales are chosen to
minimise the layer's output error on calibration data, ``||(W - What) X||^2 = tr(E H E^T)`` with
``E = W - What`` and the input Hessian ``H = 2/n X X^T`` that GPTQ collects
(:class:`lowbit.methods.gptq.HessianStats`):

1. scales start as each output group's RMS; codebooks and codes start by residual k-means on
   the scaled groups, each coordinate weighted by its column's ``diag(H)``;
2. then, until the error stops improving (``relative_tolerance``) or ``max_iterations``:
   (a) the codebooks by preconditioned conjugate gradient on the quadratic ``tr(E H E^T)``
   (exact line search, Jacobi preconditioner), and the scales in closed form;
   (b) the codes by beam search, one input-group position at a time for all output groups at
   once, with the full Hessian coupling to the other groups (``E H`` is kept up to date;
   :func:`lowbit.methods.aqlm_search.update_codes`).

The solver is pure tensor math on one layer (:func:`aqlm_quantize`); :class:`AqlmQuantizer`
wraps it for the block-by-block runner and emits :class:`~lowbit.formats.codebook.AqlmLinear`.
Work is chunked (:func:`lowbit.methods.kmeans.chunk_rows`) so that score matrices stay
cache-sized: a 1x16 codebook has 65 536 entries per group.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.config import AqlmConfig
from lowbit.formats.codebook import AqlmLinear, check_geometry
from lowbit.methods.base import QUANTIZERS, Quantizer
from lowbit.methods.aqlm_search import update_codes
from lowbit.methods.gptq import HessianStats
from lowbit.methods.kmeans import weighted_kmeans
from lowbit.methods.walk import find_linears, linear_shape

log = logging.getLogger(__name__)

_PROXIMAL = 1e-3  # codebook step's proximal weight, relative to the mean curvature (see _update_codebooks)


@dataclass(frozen=True)
class AqlmResult:
    """Output of :func:`aqlm_quantize`.

    ``codes`` int64 ``[N/og, K/ig, C]`` in ``[0, 2**nbits)``; ``codebooks`` fp32
    ``[C, 2**nbits, og, ig]``; ``scales`` fp32 ``[N/og]``; ``relative_error`` the final
    ``tr(E H E^T) / tr(W H W^T)``; ``iterations`` the alternations run.
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    relative_error: float
    iterations: int


class _Layer:
    """One layer's weight in AQLM's group view, the (damped) Hessian, and the current solution.

    Shapes: ``W`` ``[Go, og, K]``; ``codes`` ``[Go, Gi, C]``; ``codebooks`` ``[C, S, og, ig]``;
    ``scales`` ``[Go]``.
    """

    def __init__(self, W: torch.Tensor, H: torch.Tensor, og: int, ig: int) -> None:
        n, k = W.shape
        self.og, self.ig = og, ig
        self.go, self.gi = n // og, k // ig
        self.W = W.reshape(self.go, og, k)
        self.H = H
        self.WH = self.W @ H  # [Go, og, K]
        self.norm = float((self.WH * self.W).sum())
        self.codes: torch.Tensor
        self.codebooks: torch.Tensor
        self.scales: torch.Tensor

    def recon(self, codebooks: torch.Tensor | None = None) -> torch.Tensor:
        """The unscaled reconstruction ``[Go, og, K]`` (of ``codebooks``, default the current ones)."""
        cb = self.codebooks if codebooks is None else codebooks
        groups = cb[0][self.codes[..., 0]]  # [Go, Gi, og, ig]
        for c in range(1, cb.shape[0]):
            groups = groups + cb[c][self.codes[..., c]]
        return groups.permute(0, 2, 1, 3).reshape(self.go, self.og, self.gi * self.ig)

    def code_maps(self) -> list[torch.Tensor] | None:
        """Per codebook, the current codes as a sparse ``[S, Go*Gi]`` CSR indicator (which group
        uses which codeword), for :meth:`adjoint`; None off the CPU.

        On a CPU ``index_add_`` into a few hundred codewords runs serially, several times slower
        than this product; the maps are valid until the codes change."""
        if self.codes.device.type != "cpu":
            return None
        size = self.codebooks.shape[1]
        maps = []
        for c in range(self.codes.shape[-1]):
            idx = self.codes[..., c].reshape(-1)
            crow = torch.zeros(size + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(idx, minlength=size).cumsum(0)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                maps.append(torch.sparse_csr_tensor(crow, torch.argsort(idx, stable=True),
                                                    torch.ones(idx.numel(), dtype=self.codebooks.dtype),
                                                    size=(size, idx.numel())))
        return maps

    def adjoint(self, G: torch.Tensor, maps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Transpose of ``codebooks -> scales * recon(codebooks)``, applied to ``G [Go, og, K]``
        (``maps``: :meth:`code_maps` of the current codes, or None)."""
        g = (G * self.scales[:, None, None]).reshape(self.go, self.og, self.gi, self.ig).permute(0, 2, 1, 3)
        g = g.reshape(-1, self.og, self.ig)  # [Go*Gi, og, ig]
        out = torch.zeros_like(self.codebooks)
        for c in range(out.shape[0]):
            if maps is None:
                out[c].index_add_(0, self.codes[..., c].reshape(-1), g)
            else:
                out[c] = (maps[c] @ g.reshape(g.shape[0], -1)).reshape(out.shape[1:])
        return out

    def error(self) -> float:
        """``tr(E H E^T)`` of the current solution."""
        E = self.W - self.scales[:, None, None] * self.recon()
        return float(((E @ self.H) * E).sum())


def _point_weights(layer: _Layer) -> torch.Tensor:
    """Per-coordinate importance of each group vector: ``diag(H)`` of its columns ``[Gi, og*ig]``."""
    d = torch.diagonal(layer.H).reshape(layer.gi, 1, layer.ig).expand(layer.gi, layer.og, layer.ig)
    return d.reshape(layer.gi, -1)


def _initialize(layer: _Layer, num_codebooks: int, nbits: int, kmeans_iterations: int,
                generator: torch.Generator) -> None:
    """Scales = RMS of each output group; codes and codebooks by residual weighted k-means."""
    layer.scales = layer.W.pow(2).mean(dim=(1, 2)).sqrt().clamp(min=1e-8)  # [Go]
    v = layer.W / layer.scales[:, None, None]
    # group vectors position-major: [Gi, Go, og*ig]
    residual = v.reshape(layer.go, layer.og, layer.gi, layer.ig).permute(2, 0, 1, 3).reshape(layer.gi, layer.go, -1)
    weights = _point_weights(layer)
    books, codes = [], []
    for _ in range(num_codebooks):
        centroids, assign = weighted_kmeans(residual, weights, 1 << nbits, kmeans_iterations, generator)
        residual = residual - centroids[assign]
        books.append(centroids.reshape(-1, layer.og, layer.ig))
        codes.append(assign.t())  # [Go, Gi]
    layer.codebooks = torch.stack(books)
    layer.codes = torch.stack(codes, dim=-1)


def _update_codebooks(layer: _Layer, steps: int) -> None:
    """Minimise ``tr(E H E^T)`` over the codebooks (codes and scales fixed) by ``steps`` of
    Jacobi-preconditioned conjugate gradient; the objective is quadratic, so each step's line
    search is exact.

    The objective is flat along some directions (with two or more codebooks, adding a vector to
    every codeword of one codebook and subtracting it from another changes nothing), and the
    preconditioner would let the iterates drift along them until fp32 scores lose all precision.
    A proximal term ``PROXIMAL * mean curvature * ||theta - theta_0||^2`` pins those directions.
    """
    if steps <= 0:
        return
    s = layer.scales[:, None, None]
    diag_h = torch.diagonal(layer.H)  # [K]
    # diagonal of the quadratic's matrix: s^2 * diag(H) of the columns each codeword covers
    dh = (s * s * diag_h).expand(layer.go, layer.og, -1).contiguous()
    maps = layer.code_maps()  # the codes are fixed here
    precond = layer.adjoint(dh / s, maps)  # adjoint applies one more s
    used = precond > 0
    if not used.any():
        return
    prox = _PROXIMAL * float(precond[used].mean())
    inv = torch.where(used, 1.0 / (precond + prox), torch.zeros_like(precond))
    theta = layer.codebooks
    r = layer.adjoint((layer.W - s * layer.recon(theta)) @ layer.H, maps)  # minus half the gradient
    z = inv * r
    p = z
    rz = float((r * z).sum())
    for _ in range(steps):
        if rz <= 0:
            break
        Ap = layer.adjoint((s * layer.recon(p)) @ layer.H, maps) + prox * p
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rz / pAp
        theta = theta + alpha * p
        r = r - alpha * Ap
        z = inv * r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    layer.codebooks = theta


def _update_scales(layer: _Layer) -> None:
    """Each output group's scale in closed form: ``<W H, R> / <R H, R>`` for its reconstruction ``R``."""
    R = layer.recon()
    num = (layer.WH * R).sum(dim=(1, 2))
    den = ((R @ layer.H) * R).sum(dim=(1, 2))
    layer.scales = torch.where(den > 0, num / den.clamp(min=1e-30), layer.scales).clamp(min=1e-8)


def aqlm_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    num_codebooks: int,
    nbits: int,
    in_group_size: int,
    out_group_size: int = 1,
    beam_size: int = 4,
    max_iterations: int = 8,
    relative_tolerance: float = 0.02,
    kmeans_iterations: int = 5,
    codebook_steps: int = 10,
    damp_percent: float = 0.01,
    seed: int = 0,
) -> AqlmResult:
    """Quantize one layer's weight with additive codebooks.

    Args:
        W: fp ``[N, K]`` weight (not modified).
        H: fp32 ``[K, K]`` input Hessian from :class:`HessianStats` (not modified); damped by
            ``damp_percent * mean(diag H)`` on the diagonal, which keeps the codebook system
            well posed and gives inputs the calibration never excited a plain squared error.
        beam_size: code tuples kept per group during the search (1 = coordinate descent;
            ignored with one codebook, where the search is exact).
        max_iterations: alternations of codebook/scale updates and code search; stops earlier
            once an alternation improves the error by less than ``relative_tolerance`` of it.
        kmeans_iterations: Lloyd iterations of the initial residual k-means per codebook.
        codebook_steps: conjugate-gradient steps per codebook update.
        seed: the k-means initialisation's random draw (the result is deterministic given it).
    """
    n, k = W.shape
    check_geometry(k, n, in_group_size=in_group_size, out_group_size=out_group_size, num_codebooks=num_codebooks,
                   nbits_per_codebook=nbits)
    W = W.detach().to(torch.float32)
    if not torch.isfinite(W).all():
        raise ValueError("weights contain NaN or Inf")
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    if not torch.isfinite(H).all():
        raise ValueError("the input Hessian contains NaN or Inf")
    mean_diag = float(torch.diagonal(H).mean())
    H.diagonal().add_(damp_percent * mean_diag if mean_diag > 0 else 1.0)
    layer = _Layer(W, H, out_group_size, in_group_size)
    generator = torch.Generator(device=W.device).manual_seed(seed)
    _initialize(layer, num_codebooks, nbits, kmeans_iterations, generator)
    err = layer.error()
    log.debug("aqlm init: relative error %.4g", err / max(layer.norm, 1e-30))
    if err <= 1e-12 * layer.norm:  # more codewords than groups: the k-means start is exact
        return AqlmResult(layer.codes, layer.codebooks, layer.scales, err / max(layer.norm, 1e-30), 0)
    done = 0
    for done in range(1, max_iterations + 1):
        _update_codebooks(layer, codebook_steps)
        _update_scales(layer)
        update_codes(layer, beam_size)
        new = layer.error()
        log.debug("aqlm iteration %d: relative error %.4g", done, new / max(layer.norm, 1e-30))
        improved = err - new
        err = new
        if improved <= relative_tolerance * err:
            break
    _update_codebooks(layer, codebook_steps)
    _update_scales(layer)
    err = layer.error()
    return AqlmResult(layer.codes, layer.codebooks, layer.scales, err / max(layer.norm, 1e-30), done)


def skipped_weight_names(model: nn.Module) -> tuple[str, ...]:
    """The linears of ``model`` left in full precision, as AQLM's ``linear_weights_not_to_quantize``
    names them for both transformers readers: ``<module>.weight`` (4.x) and ``<module>`` (5.x
    matches module names)."""
    names = sorted(find_linears(model))
    return tuple(n for name in names for n in (f"{name}.weight", name))


@QUANTIZERS.register("aqlm")
class AqlmQuantizer(Quantizer[AqlmConfig]):
    """AQLM into :class:`AqlmLinear`; needs calibration data (Hessians of the inputs)."""

    requires_calibration = True

    @property
    def true_sequential(self) -> bool:
        return self.config.true_sequential

    def skip_modules(self, model: nn.Module) -> set[str]:
        """The base skips plus the modules of ``linear_weights_not_to_quantize`` (``.weight`` dropped)."""
        named = {w.removesuffix(".weight") for w in self.config.linear_weights_not_to_quantize or ()}
        return super().skip_modules(model) | named

    def check_layer(self, name: str, linear: nn.Module) -> None:
        k, n = linear_shape(linear)
        cfg = self.config
        try:
            check_geometry(k, n, in_group_size=cfg.in_group_size, out_group_size=cfg.out_group_size,
                           num_codebooks=cfg.num_codebooks, nbits_per_codebook=cfg.nbits_per_codebook)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None

    def collect(self, name: str, linear: nn.Module) -> HessianStats:
        return HessianStats.for_linear(linear)

    def tunes_blocks(self) -> bool:
        return self.config.finetune_steps > 0

    def finish_block(self, block: nn.Module, name: str, states: list[torch.Tensor], kwargs: dict,
                     targets: list[torch.Tensor]) -> None:
        from lowbit.methods.aqlm_tune import finetune_block

        cfg = self.config
        before, after = finetune_block(block, states, kwargs, targets, cfg.finetune_steps, cfg.finetune_lr,
                                       cfg.finetune_batch_size, cfg.seed)
        log.info("%s: block output error %.4g -> %.4g after %d fine-tuning steps", name, before, after,
                 cfg.finetune_steps)

    def quantize_layer(self, name: str, linear: nn.Module, stats: HessianStats | None) -> AqlmLinear:
        cfg = self.config
        w = self.checked_weight(name, linear)  # [N, K]
        if stats is None or stats.nsamples == 0:
            raise ValueError(f"{name}: AQLM got no calibration inputs for this layer")
        r = aqlm_quantize(w, stats.H, num_codebooks=cfg.num_codebooks, nbits=cfg.nbits_per_codebook,
                          in_group_size=cfg.in_group_size, out_group_size=cfg.out_group_size,
                          beam_size=cfg.beam_size, max_iterations=cfg.max_iterations,
                          relative_tolerance=cfg.relative_tolerance, kmeans_iterations=cfg.kmeans_iterations,
                          codebook_steps=cfg.codebook_steps, damp_percent=cfg.damp_percent, seed=cfg.seed)
        log.info("%s: relative output error %.4g after %d iterations", name, r.relative_error, r.iterations)
        bias = None if linear.bias is None else linear.bias.data
        return AqlmLinear.from_quantized(r.codes, r.codebooks, r.scales, bias, dtype=torch.float16)

    def empty_module(self, name: str, linear: nn.Module, dtype: torch.dtype) -> AqlmLinear:
        k, n = linear_shape(linear)
        cfg = self.config
        return AqlmLinear(k, n, in_group_size=cfg.in_group_size, out_group_size=cfg.out_group_size,
                          num_codebooks=cfg.num_codebooks, nbits_per_codebook=cfg.nbits_per_codebook,
                          bias=linear.bias is not None, dtype=torch.float16, device="meta")

    def finish_config(self, model: nn.Module, config: AqlmConfig) -> AqlmConfig:
        """Record every linear left in full precision in ``linear_weights_not_to_quantize``, the
        only skip list transformers' AQLM loader reads."""
        return config.replace(linear_weights_not_to_quantize=skipped_weight_names(model))
