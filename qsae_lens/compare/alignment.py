"""Weight-space alignment of two SAEs: best match, mutual nearest neighbours, one-to-one matching, Procrustes.

Every function takes the two dictionaries as raw direction matrices (decoder rows ``W_dec[d_sae, d_in]`` or
encoder columns transposed to ``[d_sae, d_in]``), normalises rows itself, and never builds the dense
``d_sae x d_sae`` similarity matrix: cosines are computed in ``block_size x block_size`` float32 tiles on
whatever device the tensors live on, so peak memory is ``O(block_size**2 + (n_a + n_b) * d)``.

The blockwise loops are written by hand because no library reduces (max / top-k over one axis) a matrix
product tile by tile; the assignment problems and the orthogonal fit are delegated to scipy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BestMatch",
    "Matching",
    "ProcrustesResult",
    "NaiveProcrustesResult",
    "normalize_rows",
    "best_match",
    "best_match_both",
    "top_k_neighbours",
    "mutual_nearest_neighbours",
    "mutual_nn_fraction",
    "one_to_one_matching",
    "fraction_above",
    "procrustes_matched",
    "procrustes_rowwise_naive",
]

#: Largest ``n_a * n_b`` solved by the exact dense Hungarian: 8192**2 float32 cosines are 256 MiB
#: (scipy copies them to float64, 512 MiB), and the dense solver takes ~10 s there on 2 CPU cores.
EXACT_MAX = 8192 * 8192


# --------------------------------------------------------------------------------------------- results
class BestMatch(NamedTuple):
    """For every row of ``a``, its most similar row of ``b``."""

    cosine: Tensor
    """Tensor[n_a] float32: cosine of each row of ``a`` with its best match in ``b``."""
    index: Tensor
    """Tensor[n_a] int64: index into ``b`` of that best match."""


class Matching(NamedTuple):
    """A one-to-one assignment between rows of ``a`` and rows of ``b`` maximising the total cosine."""

    rows: Tensor
    """Tensor[m] int64: matched rows of ``a`` (m = min(n_a, n_b)), sorted."""
    cols: Tensor
    """Tensor[m] int64: the row of ``b`` matched to each entry of ``rows``."""
    cosine: Tensor
    """Tensor[m] float32: cosine of each matched pair."""
    method: str
    """``"exact"`` (dense Hungarian), ``"sparse"`` (top-k candidate graph) or ``"sparse+exact-residual"``."""

    @property
    def mean_cosine(self) -> float:
        """Mean matched cosine (the PW-MCC of Song et al.)."""
        return float(self.cosine.double().mean()) if self.cosine.numel() else float("nan")


class ProcrustesResult(NamedTuple):
    """Orthogonal map a -> b fitted on one-to-one matched pairs, with an honest cross-validated score."""

    matched_cosine_cv: float
    """Headline: mean matched cosine of held-out latents under the map (identity or rotation) chosen and
    fitted without them."""
    cv_cosine: Tensor
    """Tensor[n_test_total] float32: the held-out matched cosines of all folds, concatenated (for CIs)."""
    fold_cosines: tuple[float, ...]
    """Mean held-out matched cosine of each fold."""
    test_shape: tuple[int, int]
    """(n_a_test, n_b_test) of one held-out matching: the shape whose random null the CV score is read against."""
    matched_cosine_in_sample: float
    """Mean matched cosine after fitting on all pairs (flattered by the d_in**2 free parameters)."""
    raw_matched_cosine: float
    """Mean matched cosine with no map (identity)."""
    rotation: Tensor
    """Tensor[d, d] float32: orthogonal R fitted on all matched pairs, ``a_unit @ R ~ b_unit[cols]``
    (in-sample: for inspection only, never for held-out data)."""
    matching: Matching
    """The in-sample matching under ``rotation``."""
    init: str
    """Starting map that won: ``"identity"`` or ``"moments"`` (eigenbases of AᵀA, BᵀB, signs by 3rd moments)."""
    n_iter: int
    """Match -> fit iterations used by the full (in-sample) fit."""
    identity_cv: float = float("nan")
    """Mean held-out matched cosine under the identity map, same folds and held-out b latents as the CV score."""
    identity_cv_cosine: Tensor | None = None
    """Tensor[n_test_total] float32: the identity's held-out matched cosines (for CIs)."""
    chosen_maps: tuple[str, ...] = ()
    """Per outer fold: ``"identity"`` or ``"rotation"``, chosen by inner CV on that fold's training latents."""
    fold_maps: tuple[Tensor, ...] = ()
    """Per outer fold: the chosen map Tensor[d, d] (identity or the rotation fitted without that fold's
    latents). Apply these, never ``rotation`` (in-sample), to held-out data."""

    @property
    def chosen_map(self) -> str:
        """``"identity"`` when most folds chose it (ties too), else ``"rotation"``."""
        n_id = sum(c == "identity" for c in self.chosen_maps)
        return "identity" if 2 * n_id >= len(self.chosen_maps) else "rotation"


class NaiveProcrustesResult(NamedTuple):
    """The methodology's flawed fit: rows taken in order, as if latent i of a were latent i of b."""

    mean_cosine: float
    """Mean over rows i of cos(a_i R, b_i)."""
    cosine: Tensor
    """Tensor[n] float32: per-row cosine after the fit."""
    rotation: Tensor
    """Tensor[d, d] float32: the fitted orthogonal map."""


# ------------------------------------------------------------------------------------------ validation
def _check_matrix(w: Tensor, name: str) -> Tensor:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, d], got {type(w).__name__}")
    if w.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor [n, d] (one direction per row), got shape {tuple(w.shape)}"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}): nothing to compare")
    if not (w.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        n_bad = int((~torch.isfinite(w)).sum())
        raise ValueError(
            f"{name} contains {n_bad} NaN/Inf values (shape {tuple(w.shape)}): the SAE weights are corrupt "
            "or training diverged; fix or reload the checkpoint before comparing"
        )
    return w


def _check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    _check_matrix(a, names[0])
    _check_matrix(b, names[1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} has shape {tuple(a.shape)} and {names[1]} has shape {tuple(b.shape)}: the direction "
            f"dimension (d_in) differs ({a.shape[1]} vs {b.shape[1]}), so cosines are undefined. Compare SAEs "
            "trained on the same model width (or map one space into the other first)."
        )


def _check_block(block_size: int) -> int:
    if int(block_size) < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return int(block_size)


def _blocks(n: int, block_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, block_size):
        yield start, min(start + block_size, n)


def normalize_rows(w: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise each row: Tensor[n, d] -> Tensor[n, d] (float32, same device).

    Cosine is invariant to the per-latent scale an SAE is free to move between encoder and decoder, so every
    comparison works on unit rows. All-zero rows stay zero (cosine 0 with everything) instead of becoming NaN.
    """
    w = _check_matrix(w, "w").float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(eps)


def _prepare(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair(a, b)
    b = b.to(a.device)
    return normalize_rows(a), normalize_rows(b)


# ------------------------------------------------------------------------------------------ best match
def _best_match_unit(a: Tensor, b: Tensor, block_size: int, both: bool) -> tuple[BestMatch, BestMatch | None]:
    """Row-max (and column-max) of a @ b.T over tiles. a, b unit rows, float32, same device."""
    n_a, n_b = a.shape[0], b.shape[0]
    dev = a.device
    row_val = torch.full((n_a,), -math.inf, device=dev)
    row_idx = torch.zeros(n_a, dtype=torch.long, device=dev)
    col_val = torch.full((n_b,), -math.inf, device=dev) if both else None
    col_idx = torch.zeros(n_b, dtype=torch.long, device=dev) if both else None
    for i0, i1 in _blocks(n_a, block_size):
        a_blk = a[i0:i1]
        for j0, j1 in _blocks(n_b, block_size):
            s = a_blk @ b[j0:j1].T  # [bi, bj] float32: the only tile alive at a time
            v, idx = s.max(dim=1)
            better = v > row_val[i0:i1]  # strict: ties keep the lowest index, like argmax on the full matrix
            row_val[i0:i1] = torch.where(better, v, row_val[i0:i1])
            row_idx[i0:i1] = torch.where(better, idx + j0, row_idx[i0:i1])
            if both:
                v, idx = s.max(dim=0)
                better = v > col_val[j0:j1]
                col_val[j0:j1] = torch.where(better, v, col_val[j0:j1])
                col_idx[j0:j1] = torch.where(better, idx + i0, col_idx[j0:j1])
    ab = BestMatch(row_val, row_idx)
    ba = BestMatch(col_val, col_idx) if both else None
    return ab, ba


def best_match(a: Tensor, b: Tensor, *, block_size: int = 4096) -> BestMatch:
    """Best match in ``b`` of every row of ``a`` by cosine.

    a: Tensor[n_a, d], b: Tensor[n_b, d] raw directions (normalised here). Returns ``BestMatch`` with
    ``cosine`` Tensor[n_a] and ``index`` Tensor[n_a] (into b). The methodology's "raw best-match cosine" is
    ``best_match(a, b).cosine.mean()``; report the distribution, not only the mean.
    """
    a_u, b_u = _prepare(a, b)
    return _best_match_unit(a_u, b_u, _check_block(block_size), both=False)[0]


def best_match_both(a: Tensor, b: Tensor, *, block_size: int = 4096) -> tuple[BestMatch, BestMatch]:
    """``(best_match(a, b), best_match(b, a))`` from one pass over the cosine tiles (half the matmuls)."""
    a_u, b_u = _prepare(a, b)
    ab, ba = _best_match_unit(a_u, b_u, _check_block(block_size), both=True)
    assert ba is not None
    return ab, ba


def _merge_top_k(best_v: Tensor, best_i: Tensor, v: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Merge a running top-k (rows of best_v/best_i) with a tile's candidates (rows of v/idx)."""
    cat_v = torch.cat([best_v, v], dim=1)
    cat_i = torch.cat([best_i, idx], dim=1)
    keep = cat_v.topk(min(k, cat_v.shape[1]), dim=1)
    return keep.values, cat_i.gather(1, keep.indices)


def _top_k_unit(
    a: Tensor, b: Tensor, k: int, block_size: int, both: bool = False
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Top-k of each row of a @ b.T (and, if ``both``, of each column) from one pass over the tiles."""
    n_a, n_b = a.shape[0], b.shape[0]
    k_row, k_col = min(k, n_b), min(k, n_a)
    dev = a.device
    row_v = torch.full((n_a, 0), -math.inf, device=dev)
    row_i = torch.zeros((n_a, 0), dtype=torch.long, device=dev)
    col_v = torch.full((n_b, 0), -math.inf, device=dev)
    col_i = torch.zeros((n_b, 0), dtype=torch.long, device=dev)
    out_v, out_i = [], []
    for i0, i1 in _blocks(n_a, block_size):
        best_v, best_i = row_v[i0:i1], row_i[i0:i1]
        new_col_v, new_col_i = [], []
        for j0, j1 in _blocks(n_b, block_size):
            s = a[i0:i1] @ b[j0:j1].T
            v, idx = s.topk(min(k_row, j1 - j0), dim=1)
            best_v, best_i = _merge_top_k(best_v, best_i, v, idx + j0, k_row)
            if both:
                v, idx = s.topk(min(k_col, i1 - i0), dim=0)
                cv, ci = _merge_top_k(col_v[j0:j1], col_i[j0:j1], v.T, idx.T + i0, k_col)
                new_col_v.append(cv)
                new_col_i.append(ci)
        out_v.append(best_v)
        out_i.append(best_i)
        if both:
            col_v, col_i = torch.cat(new_col_v), torch.cat(new_col_i)
    values, indices = torch.cat(out_v), torch.cat(out_i)
    return values, indices, (col_v if both else None), (col_i if both else None)


def top_k_neighbours(a: Tensor, b: Tensor, k: int, *, block_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar rows of ``b`` for each row of ``a``, by cosine, in decreasing order.

    a: Tensor[n_a, d], b: Tensor[n_b, d]. Returns (values Tensor[n_a, k] float32, indices Tensor[n_a, k] int64);
    k is clipped to n_b.
    """
    if int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    a_u, b_u = _prepare(a, b)
    values, indices, _, _ = _top_k_unit(a_u, b_u, int(k), _check_block(block_size))
    return values, indices


def mutual_nearest_neighbours(
    a: Tensor,
    b: Tensor,
    *,
    block_size: int = 4096,
    matches: tuple[BestMatch, BestMatch] | None = None,
) -> Tensor:
    """Tensor[n_a] bool: True where i is its best match's best match, ``nn_ba(nn_ab(i)) == i``.

    Pass ``matches=best_match_both(a, b)`` to reuse best matches already computed.
    """
    ab, ba = matches if matches is not None else best_match_both(a, b, block_size=block_size)
    return ba.index[ab.index] == torch.arange(ab.index.shape[0], device=ab.index.device)


def mutual_nn_fraction(
    a: Tensor, b: Tensor, *, block_size: int = 4096, matches: tuple[BestMatch, BestMatch] | None = None
) -> float:
    """Fraction of rows of ``a`` that are mutual nearest neighbours with a row of ``b``."""
    return float(mutual_nearest_neighbours(a, b, block_size=block_size, matches=matches).float().mean())


# -------------------------------------------------------------------------------------------- matching
def _dense_cosines(a: Tensor, b: Tensor, block_size: int) -> np.ndarray:
    """Float32 [n_a, n_b] cosine matrix filled tile by tile (only called when it fits: n_a*n_b <= exact_max)."""
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for i0, i1 in _blocks(a.shape[0], block_size):
        for j0, j1 in _blocks(b.shape[0], block_size):
            out[i0:i1, j0:j1] = (a[i0:i1] @ b[j0:j1].T).cpu().numpy()
    return out


def _pair_cosines(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, chunk: int = 1 << 16) -> Tensor:
    """cos(a[rows[p]], b[cols[p]]) for each pair p, in chunks (unit rows)."""
    out = torch.empty(rows.shape[0], device=a.device)
    for p0, p1 in _blocks(rows.shape[0], chunk):
        out[p0:p1] = (a[rows[p0:p1]] * b[cols[p0:p1]]).sum(dim=1)
    return out


def _candidate_graph(a: Tensor, b: Tensor, k: int, block_size: int):
    """Sparse [n_a, n_b] graph holding each row's top-k in b and each b row's top-k in a, weight 2 - cos > 0."""
    from scipy.sparse import csr_array

    n_a, n_b = a.shape[0], b.shape[0]
    _, ia, _, ib = _top_k_unit(a, b, k, block_size, both=True)  # one pass: rows' and columns' top-k
    rows = torch.cat([torch.arange(n_a, device=a.device).repeat_interleave(ia.shape[1]), ib.reshape(-1)])
    cols = torch.cat([ia.reshape(-1), torch.arange(n_b, device=a.device).repeat_interleave(ib.shape[1])])
    key = torch.unique(rows * n_b + cols)  # an edge found from both sides appears once
    rows, cols = key // n_b, key % n_b
    cos = _pair_cosines(a, b, rows, cols)
    # min-weight matching needs non-zero weights; 2 - cos lies in [1, 3] and minimising it maximises sum(cos)
    # because a full matching always has min(n_a, n_b) edges.
    w = (2.0 - cos.double()).cpu().numpy()
    return csr_array((w, (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n_a, n_b))


def _sparse_assignment(
    a: Tensor, b: Tensor, k: int, k_max: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, str]:
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n_a, n_b = a.shape[0], b.shape[0]
    while True:
        graph = _candidate_graph(a, b, k, block_size)
        try:
            r, c = min_weight_full_bipartite_matching(graph)
            return r, c, "sparse"
        except ValueError:
            if k >= min(k_max, max(n_a, n_b)):
                break
            k = min(k * 4, k_max)
    # Still no full matching in the candidate graph (a hub structure Hall's condition rejects): take the best
    # matching the graph allows, then assign the leftover rows to the leftover columns exactly (dense, small).
    warnings.warn(
        f"top-{k} candidate graph has no full matching; matching the leftover latents exactly", stacklevel=3
    )
    r, c = _max_partial_matching(graph)
    left_r = np.setdiff1d(np.arange(n_a), r)
    left_c = np.setdiff1d(np.arange(n_b), c)
    if left_r.size and left_c.size:
        rr, cc = _exact_assignment(
            a[torch.as_tensor(left_r, device=a.device)],
            b[torch.as_tensor(left_c, device=a.device)],
            block_size,
        )
        r, c = np.concatenate([r, left_r[rr]]), np.concatenate([c, left_c[cc]])
    order = np.argsort(r)
    return r[order], c[order], "sparse+exact-residual"


def _max_partial_matching(graph) -> tuple[np.ndarray, np.ndarray]:
    """Best matching of a sparse graph that may have no full matching.

    Classic padding: add a private dummy column per row and a private dummy row per column, each at cost
    ``big``, and connect dummy row j to dummy column i for every real edge (i, j) at a tiny cost, so the padded
    square problem always has a perfect matching; real edges chosen in it form the partial matching.
    """
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    g = graph.tocoo()
    n_a, n_b = g.shape
    big = 3.0 * (n_a + n_b + 1)  # dominates any weight sum: cardinality first, then weight
    eps = 1e-9
    ri, ci, w = g.row, g.col, g.data
    rows = np.concatenate([ri, np.arange(n_a), n_a + np.arange(n_b), n_a + ci])
    cols = np.concatenate([ci, n_b + np.arange(n_a), np.arange(n_b), n_b + ri])
    vals = np.concatenate([w, np.full(n_a, big), np.full(n_b, big), np.full(ri.size, eps)])
    padded = coo_array((vals, (rows, cols)), shape=(n_a + n_b, n_a + n_b)).tocsr()
    r, c = min_weight_full_bipartite_matching(padded)
    real = (r < n_a) & (c < n_b)
    return r[real], c[real]


def _exact_assignment(a: Tensor, b: Tensor, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    s = _dense_cosines(a, b, block_size)
    return linear_sum_assignment(s, maximize=True)


def one_to_one_matching(
    a: Tensor,
    b: Tensor,
    *,
    exact_max: int = EXACT_MAX,
    k_candidates: int = 32,
    k_max: int = 512,
    block_size: int = 4096,
) -> Matching:
    """Hungarian one-to-one matching of rows of ``a`` to rows of ``b`` maximising total cosine.

    a: Tensor[n_a, d], b: Tensor[n_b, d]; m = min(n_a, n_b) pairs are returned. Best match lets many latents
    share one partner; the one-to-one mean (PW-MCC) does not, which is what "fraction of shared latents" means.

    If ``n_a * n_b <= exact_max`` the dense float32 cosine matrix is solved exactly with
    ``scipy.optimize.linear_sum_assignment``. Past that, the candidate graph of each latent's ``k_candidates``
    nearest neighbours both ways is solved with ``scipy.sparse.csgraph.min_weight_full_bipartite_matching``;
    if it has no full matching k grows (x4, up to ``k_max``), then leftover latents are matched exactly.
    """
    a_u, b_u = _prepare(a, b)
    block_size = _check_block(block_size)
    if int(k_candidates) < 1:
        raise ValueError(f"k_candidates must be a positive integer, got {k_candidates}")
    if a_u.shape[0] * b_u.shape[0] <= exact_max:
        r, c = _exact_assignment(a_u, b_u, block_size)
        method = "exact"
    else:
        r, c, method = _sparse_assignment(a_u, b_u, int(k_candidates), int(k_max), block_size)
    rows = torch.as_tensor(np.asarray(r, dtype=np.int64), device=a_u.device)
    cols = torch.as_tensor(np.asarray(c, dtype=np.int64), device=a_u.device)
    return Matching(rows, cols, _pair_cosines(a_u, b_u, rows, cols), method)


def fraction_above(cosines: Tensor, thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)) -> dict[float, float]:
    """Fraction of ``cosines`` (Tensor[m]) strictly above each threshold: ``{0.5: ..., 0.7: ..., 0.9: ...}``."""
    if cosines.numel() == 0:
        return {float(t): float("nan") for t in thresholds}
    c = cosines.detach().float().reshape(-1)
    return {float(t): float((c > t).float().mean()) for t in thresholds}


# ------------------------------------------------------------------------------------------ Procrustes
def _orthogonal_fit(x: Tensor, y: Tensor) -> Tensor:
    """Orthogonal R (Tensor[d, d]) minimising ||x R - y||_F over matched unit rows x, y: Tensor[m, d]."""
    from scipy.linalg import orthogonal_procrustes

    r, _ = orthogonal_procrustes(x.detach().float().cpu().numpy(), y.detach().float().cpu().numpy())
    return torch.as_tensor(r, dtype=torch.float32, device=x.device)


def _moment_rotation(a: Tensor, b: Tensor) -> Tensor:
    """A pairing-free guess of the rotation R with b ~ permute(a) @ R, from permutation-invariant moments.

    If b = P a Q then bᵀb = Qᵀ (aᵀa) Q, so the eigenbases U of aᵀa and V of bᵀb satisfy Q = U S Vᵀ for a
    diagonal sign matrix S; each sign follows from the third moment of the projections, sum_i (a_i·u_k)^3,
    which the rotation carries over with that sign. Exact for a pure rotation of the model space; a poor
    guess for noisy pairs, where the identity start wins instead.
    """
    from scipy.linalg import eigh

    def basis(w: Tensor) -> tuple[np.ndarray, np.ndarray]:
        cov = (w.T @ w).double().cpu().numpy()
        _, vecs = eigh(cov)
        proj = (w @ torch.as_tensor(vecs, dtype=torch.float32, device=w.device)).double()
        return vecs, (proj**3).sum(dim=0).cpu().numpy()

    u, m3a = basis(a)
    v, m3b = basis(b)
    signs = np.sign(m3a * m3b)
    signs[signs == 0] = 1.0
    r = (u * signs) @ v.T
    return torch.as_tensor(r, dtype=torch.float32, device=a.device)


def _fit_iterate(
    a: Tensor, b: Tensor, r0: Tensor, first: Matching | None, max_iter: int, match_kw: dict
) -> tuple[Tensor, Matching, int]:
    """Alternate one-to-one matching and orthogonal fitting while the mean matched cosine improves."""
    r = r0
    m = first if first is not None else one_to_one_matching(a @ r, b, **match_kw)
    n_iter = 0
    for _ in range(max_iter):
        r_new = _orthogonal_fit(a[m.rows], b[m.cols])
        m_new = one_to_one_matching(a @ r_new, b, **match_kw)
        n_iter += 1
        if m_new.mean_cosine <= m.mean_cosine + 1e-6:
            if m_new.mean_cosine > m.mean_cosine:
                r, m = r_new, m_new
            break
        r, m = r_new, m_new
    return r, m, n_iter


def _choose_start(a: Tensor, b: Tensor, kw: dict) -> tuple[str, Tensor, Matching]:
    """Identity or moment start (whichever matches ``a`` to ``b`` better), computed from ``a`` and ``b`` only."""
    d = a.shape[1]
    raw = one_to_one_matching(a, b, **kw)
    r_mom = _moment_rotation(a, b)
    mom = one_to_one_matching(a @ r_mom, b, **kw)
    if mom.mean_cosine > raw.mean_cosine:
        return "moments", r_mom, mom
    return "identity", torch.eye(d, device=a.device), raw


def _held_out(a_test: Tensor, b: Tensor, r: Tensor, train_cols: Tensor, kw: dict) -> Matching:
    """Match held-out rows of a (under the fixed map r) one-to-one to the rows of b the training left free."""
    free = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    free[train_cols] = False
    return one_to_one_matching(a_test @ r, b[free], **kw)


def _fold_scores(
    a_tr: Tensor, a_te: Tensor, b: Tensor, max_iter: int, kw: dict
) -> tuple[Matching, Matching, Tensor]:
    """Held-out matchings of ``a_te`` under the identity and under a map fitted on ``a_tr`` only
    (its start, identity or moments, also from ``a_tr`` only); returns (identity, fitted, fitted map)."""
    d = a_tr.shape[1]
    eye = torch.eye(d, device=a_tr.device)
    _, r0, first = _choose_start(a_tr, b, kw)
    r_f, m_f, _ = _fit_iterate(a_tr, b, r0, first, max_iter, kw)
    m_id = one_to_one_matching(a_tr, b, **kw)
    return _held_out(a_te, b, eye, m_id.cols, kw), _held_out(a_te, b, r_f, m_f.cols, kw), r_f


def procrustes_matched(
    a: Tensor,
    b: Tensor,
    *,
    max_iter: int = 10,
    cv_folds: int = 2,
    seed: int = 0,
    exact_max: int = EXACT_MAX,
    k_candidates: int = 32,
    block_size: int = 4096,
    matching: Matching | None = None,
) -> ProcrustesResult:
    """Orthogonal map between the two direction spaces, chosen and scored on held-out latents.

    a: Tensor[n_a, d], b: Tensor[n_b, d] raw directions (decoder rows; unit-normalised here).

    Why not the methodology's fit: a rotation fitted row by row assumes latent i of a is latent i of b, which is
    false for independently trained SAEs, and d**2 free parameters raise any in-sample score. Here the map is
    either the identity or a rotation fitted by alternating one-to-one matching and
    ``scipy.linalg.orthogonal_procrustes`` (started from the identity or a pairing-free moment alignment,
    whichever matches better). Outer cross-validation splits a's latents into ``cv_folds`` folds. In each, on
    the training latents only, an inner 2-fold cross-validation compares the identity with the fitted rotation
    and picks the better (ties go to the identity: it has no free parameter); the chosen map, fitted on the
    training latents (its moment start too), scores the held-out latents, matched one-to-one to the latents of
    b the training matching left free. Same-space SAEs (true map = identity) therefore keep the identity
    instead of paying for d² fitted parameters. ``identity_cv_cosine`` is the identity's score under the same
    folds, reported beside the chosen map's.

    ``matching``: ``one_to_one_matching(a, b)`` when the caller already has it (same ``exact_max``,
    ``k_candidates``), so the raw matching is not solved twice.
    """
    a_u, b_u = _prepare(a, b)
    if cv_folds < 2:
        raise ValueError(f"cv_folds must be >= 2 to hold out latents, got {cv_folds}")
    n_a, n_b, d = a_u.shape[0], b_u.shape[0], a_u.shape[1]
    n_test = n_a // cv_folds
    n_train = n_a - n_test
    if n_test < 2 or n_b - min(n_train, n_b) < 1:
        raise ValueError(
            f"a has {n_a} and b has {n_b} latents: too few to hold out {cv_folds} folds with b latents left "
            "for the held-out ones (need n_a >= 2 * cv_folds and n_b > n_a - n_a // cv_folds)"
        )
    if min(n_train, n_b) < d:
        warnings.warn(
            f"Procrustes fit on {min(n_train, n_b)} matched pairs in d={d} dimensions is underdetermined "
            f"(fewer pairs than dimensions): the map has {d * d} free parameters; read the CV score only",
            stacklevel=2,
        )
    kw = dict(exact_max=exact_max, k_candidates=k_candidates, block_size=block_size)

    if matching is not None and matching.rows.shape[0] != min(n_a, n_b):
        raise ValueError(
            f"matching has {matching.rows.shape[0]} pairs but a one-to-one matching of a ({n_a} rows) and b "
            f"({n_b} rows) has {min(n_a, n_b)}: pass one_to_one_matching(a, b) or None"
        )
    raw = matching if matching is not None else one_to_one_matching(a_u, b_u, **kw)

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_a, generator=gen).to(a_u.device)
    folds = torch.tensor_split(perm, cv_folds)
    fold_cos: list[float] = []
    held_out: list[Tensor] = []
    identity_held_out: list[Tensor] = []
    chosen: list[str] = []
    fold_maps: list[Tensor] = []
    test_shape = (0, 0)
    eye = torch.eye(d, device=a_u.device)
    for f, test_idx in enumerate(folds):
        train_idx = torch.cat([folds[g] for g in range(cv_folds) if g != f])
        a_tr = a_u[train_idx]
        # inner CV on the training latents only: identity or fitted rotation?
        inner = torch.tensor_split(train_idx[torch.randperm(train_idx.numel(), generator=gen).to(a_u.device)], 2)
        score_id = score_fit = 0.0
        for i in range(2):
            m_id, m_fit, _ = _fold_scores(a_u[inner[1 - i]], a_u[inner[i]], b_u, max_iter, kw)
            score_id += m_id.mean_cosine
            score_fit += m_fit.mean_cosine
        m_id, m_fit, r_f = _fold_scores(a_tr, a_u[test_idx], b_u, max_iter, kw)
        use_identity = score_id >= score_fit
        chosen.append("identity" if use_identity else "rotation")
        test_m = m_id if use_identity else m_fit
        fold_maps.append(eye if use_identity else r_f)
        held_out.append(test_m.cosine)
        identity_held_out.append(m_id.cosine)
        fold_cos.append(test_m.mean_cosine)
        test_shape = (int(test_idx.shape[0]), int(n_b - min(n_train, n_b)))

    init, r0, first = _choose_start(a_u, b_u, kw)
    r_all, m_all, n_iter = _fit_iterate(a_u, b_u, r0, first, max_iter, kw)
    cv = torch.cat(held_out)
    id_cv = torch.cat(identity_held_out)
    return ProcrustesResult(
        matched_cosine_cv=float(cv.double().mean()),
        cv_cosine=cv,
        fold_cosines=tuple(fold_cos),
        test_shape=test_shape,
        matched_cosine_in_sample=m_all.mean_cosine,
        raw_matched_cosine=raw.mean_cosine,
        rotation=r_all,
        matching=m_all,
        init=init,
        n_iter=n_iter,
        identity_cv=float(id_cv.double().mean()),
        identity_cv_cosine=id_cv,
        chosen_maps=tuple(chosen),
        fold_maps=tuple(fold_maps),
    )


def procrustes_rowwise_naive(a: Tensor, b: Tensor) -> NaiveProcrustesResult:
    """The methodology's Procrustes: R = argmin ||A R - B|| over orthogonal R with rows taken in order.

    a, b: Tensor[n, d]. Kept so reports can show why it misleads: row i of one SAE is not latent i of the other,
    so the score mostly measures how much a d x d rotation can fit (high for n ~ d even between random SAEs, low
    for SAEs that share every latent in another order). Use ``procrustes_matched`` for the real number.
    """
    a_u, b_u = _prepare(a, b)
    if a_u.shape[0] != b_u.shape[0]:
        raise ValueError(
            f"row-wise Procrustes pairs row i of a with row i of b, so it needs equal row counts; got a "
            f"{tuple(a.shape)} and b {tuple(b.shape)}"
        )
    r = _orthogonal_fit(a_u, b_u)
    cos = ((a_u @ r) * b_u).sum(dim=1)
    return NaiveProcrustesResult(float(cos.double().mean()), cos, r)
