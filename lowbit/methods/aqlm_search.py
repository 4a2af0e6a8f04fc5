"""AQLM's code step: the codes of every output group chosen by beam search, one input-group
position at a time, against the layer's full Hessian (:func:`update_codes`).

With the codebooks and scales fixed, the change of ``tr(E H E^T)`` from giving one group a new code
tuple is a quadratic in its vector ``u`` (the sum of its codewords): ``s^2 (<u Hii, u> - 2 <u, t>)``
with ``t`` the group's slice of ``E H / s`` plus ``u_current Hii`` (:func:`_cost`). Scores of every
replacement of one codebook's code are one matrix product against that codebook (:func:`_beam_search`).
Used by :mod:`lowbit.methods.aqlm`'s alternation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lowbit.methods.kmeans import chunk_rows, min_last

if TYPE_CHECKING:
    from lowbit.methods.aqlm import _Layer


def update_codes(layer: _Layer, beam_size: int, block: int = 16) -> None:
    """One sweep of beam search over the input-group positions, all output groups at once.

    At position ``i`` the search minimises, over the group's code tuple, the exact change of
    ``tr(E H E^T)`` with every other group fixed; the current codes are kept when no candidate
    beats them.

    ``E H`` is kept up to date lazily, as GPTQ updates its error: within a block of ``block``
    positions every change updates the block's columns at once, and the block's changes reach
    the columns after it in one product when it ends (columns before it are not read again in
    this sweep). Each position sees the ``E H`` an eager update gives (up to rounding).
    """
    ig, og = layer.ig, layer.og
    n_codebooks, size = layer.codebooks.shape[:2]
    beam = 1 if n_codebooks == 1 else beam_size
    s = layer.scales  # [Go]
    flat_books = layer.codebooks.reshape(n_codebooks, size, og * ig)
    EH = (layer.W - s[:, None, None] * layer.recon()) @ layer.H  # [Go, og, K]
    for b0 in range(0, layer.gi, block):
        b1 = min(b0 + block, layer.gi)
        bcols = slice(b0 * ig, b1 * ig)
        EHb = EH[:, :, bcols]  # a view: updated in place
        delta_block = torch.zeros_like(EHb)  # the block's scaled changes of W-hat
        changed_block = False
        for i in range(b0, b1):
            local = slice((i - b0) * ig, (i - b0 + 1) * ig)
            cols = slice(i * ig, (i + 1) * ig)
            Hii = layer.H[cols, cols]  # [ig, ig]
            codes = layer.codes[:, i]  # [Go, C]
            current = _group_vectors(flat_books, codes)  # [Go, og*ig], unscaled
            # T' = (E + s u) H restricted to the group, over s: the target the group's vector aims at
            target = (EHb[:, :, local] / s[:, None, None]).reshape(layer.go, -1) + _times_h(current, Hii, og, ig)
            best_codes, best_cost = _beam_search(flat_books, Hii, target, codes, beam, og, ig)
            cur_cost = _cost(current, Hii, target, og, ig)
            keep = cur_cost <= best_cost
            if keep.all():
                continue
            best_codes = torch.where(keep[:, None], codes, best_codes)
            delta = (_group_vectors(flat_books, best_codes) - current) * s[:, None]  # [Go, og*ig], 0 where kept
            delta = delta.reshape(layer.go, og, ig)
            EHb -= delta @ layer.H[cols, bcols]
            delta_block[:, :, local] = delta
            changed_block = True
            layer.codes[:, i] = best_codes
        if changed_block and b1 < layer.gi:
            rest = slice(b1 * ig, None)
            EH[:, :, rest] -= (delta_block.reshape(-1, (b1 - b0) * ig) @ layer.H[bcols, rest]).reshape(
                layer.go, og, -1)


def _group_vectors(flat_books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``sum_c books[c, codes[..., c]]``: ``[..., og*ig]`` for ``codes [..., C]``."""
    out = flat_books[0][codes[..., 0]]
    for c in range(1, flat_books.shape[0]):
        out = out + flat_books[c][codes[..., c]]
    return out


def _times_h(u: torch.Tensor, Hii: torch.Tensor, og: int, ig: int) -> torch.Tensor:
    """Each of the ``og`` rows of the group vectors ``u [..., og*ig]`` times ``Hii``."""
    return (u.reshape(*u.shape[:-1], og, ig) @ Hii).reshape(u.shape)


def _cost(u: torch.Tensor, Hii: torch.Tensor, target: torch.Tensor, og: int, ig: int) -> torch.Tensor:
    """``<u Hii, u> - 2 <u, target>`` per row (the error change up to a per-row constant and ``s^2``)."""
    return (u * (_times_h(u, Hii, og, ig) - 2 * target)).sum(-1)


def _beam_search(flat_books: torch.Tensor, Hii: torch.Tensor, target: torch.Tensor, codes: torch.Tensor,
                 beam: int, og: int, ig: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best code tuple per row for one group position: ``(codes int64 [Go, C], cost [Go])``.

    The beam starts from the current codes; for each codebook in turn every beam entry tries
    all ``S`` replacements of that codebook's code and the ``beam`` best tuples go on.
    Rows are processed in chunks so that the ``[rows * beam, S]`` scores stay bounded.
    """
    n_codebooks, size, _ = flat_books.shape
    # <C_j Hii, C_j> for every codeword of every codebook: [C, S]
    quad = (flat_books * _times_h(flat_books, Hii, og, ig)).sum(-1)
    go = codes.shape[0]
    rows = chunk_rows(size * beam)
    out_codes = torch.empty_like(codes)
    out_cost = torch.empty(go, dtype=flat_books.dtype, device=codes.device)
    for a in range(0, go, rows):
        b = min(a + rows, go)
        tgt = target[a:b]  # [R, d]
        cand = codes[a:b, None, :]  # [R, 1, C]
        for c in range(n_codebooks):
            u = _group_vectors(flat_books, cand)  # [R, B, d]
            base = u - flat_books[c][cand[..., c]]  # [R, B, d]
            const = _cost(base, Hii, tgt[:, None, :], og, ig)  # [R, B]
            lin = 2 * (_times_h(base, Hii, og, ig) - tgt[:, None, :])  # [R, B, d]
            r, nb, d = lin.shape
            # cost of each replacement, but for the per-entry constant: one fused GEMM pass
            score = torch.addmm(quad[c], lin.reshape(r * nb, d), flat_books[c].t()).reshape(r, nb, size)
            score += const[..., None]
            if beam == 1 or c == n_codebooks - 1:  # the last codebook only needs the best tuple
                best, entry = min_last(score.reshape(r, -1))
                top_cost, top = best[:, None], entry[:, None]  # [R, 1]
            else:
                top_cost, top = score.reshape(r, -1).topk(min(beam, nb * size), dim=1, largest=False)  # [R, k]
            parent = torch.div(top, size, rounding_mode="floor")
            cand = torch.gather(cand, 1, parent[..., None].expand(-1, -1, n_codebooks)).clone()
            cand[..., c] = top % size
            cost = top_cost
        out_codes[a:b] = cand[:, 0]
        out_cost[a:b] = cost[:, 0]
    return out_codes, out_cost
