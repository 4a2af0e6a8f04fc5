"""Weighted k-means over group vectors: the initialisation of additive quantization (AQLM).

Points are grouped by position (the input-column group a weight vector comes from); every
point at position ``i`` measures distance with the same per-coordinate weights ``weights[i]``
(the Hessian diagonal of its columns), so the ``||c||^2`` term of a distance is shared by a
position's points and each search is one GEMM per chunk of points.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 20
"""Largest ``[rows, entries]`` score matrix held at once (4 MiB fp32: cache-sized; larger chunks
run slower on CPU)."""


def weighted_kmeans(points: torch.Tensor, weights: torch.Tensor, size: int, iterations: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means: ``size`` centroids of ``points [Gi, R, d]`` (R points at each of Gi
    positions) under the distance ``sum_d weights[i, d] * (x_d - c_d)^2`` for a point at position i.

    Starts from distinct random points (all of them, padded with repeats, when there are no more
    points than centroids). Returns ``(centroids [size, d], assignment int64 [Gi, R])``.
    """
    gi, r, d = points.shape
    p = gi * r
    flat = points.reshape(p, d)
    if p <= size:  # every point is its own centroid: exact
        extra = torch.randint(p, (size - p,), generator=generator, device=points.device)
        centroids = flat[torch.cat([torch.arange(p, device=points.device), extra])].clone()
        return centroids, torch.arange(p, device=points.device).reshape(gi, r)
    centroids = flat[torch.randperm(p, generator=generator, device=points.device)[:size]].clone()
    wx = weights[:, None, :] * points  # [Gi, R, d]
    w_flat = weights[:, None, :].expand(gi, r, d).reshape(p, d)
    assign = nearest_centroid(wx, weights, centroids)
    for _ in range(iterations):
        num = torch.zeros_like(centroids).index_add_(0, assign.reshape(-1), wx.reshape(p, d))  # [S, d]
        den = torch.zeros_like(centroids).index_add_(0, assign.reshape(-1), w_flat)
        centroids = torch.where(den > 0, num / den.clamp(min=1e-30), centroids)
        new = nearest_centroid(wx, weights, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def nearest_centroid(wx: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each point: argmin over j of ``w . c_j^2 - 2 (w x) . c_j``, position by
    position (the first term is shared by a position's points); ``wx [Gi, R, d]`` -> ``[Gi, R]``."""
    sq = weights @ (centroids * centroids).t()  # [Gi, S]
    rows = chunk_rows(centroids.shape[0])
    out = torch.empty(wx.shape[:2], dtype=torch.int64, device=wx.device)
    ct = centroids.t()
    for i in range(wx.shape[0]):
        for a in range(0, wx.shape[1], rows):
            score = torch.addmm(sq[i], wx[i, a:a + rows], ct, alpha=-2)  # [rows, S]
            out[i, a:a + rows] = min_last(score)[1]
    return out


def min_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.min(dim=-1)`` of a finite ``x``: the values and the first index of each minimum.

    PyTorch's CPU reduction that returns indices is not vectorised; these passes are: a key that
    is the column index at each minimum and at least the row length elsewhere, then its ``amin``.
    Other devices, and rows too long for the key to hold their indices in fp32, use ``min``."""
    size = x.shape[-1]
    if x.device.type != "cpu" or size >= 1 << 23:
        return x.min(dim=-1)
    m = x.amin(dim=-1, keepdim=True)
    key = (x - m).sign_().to(torch.float32).mul_(size).add_(torch.arange(size, dtype=torch.float32, device=x.device))
    return m.squeeze(-1), key.amin(dim=-1).long()


def chunk_rows(entries: int) -> int:
    """Rows per chunk of a ``[rows, entries]`` score matrix: about ``CHUNK_ELEMENTS`` values
    (cache-sized; larger chunks run slower on CPU), at least 16 rows."""
    return max(16, CHUNK_ELEMENTS // entries)
