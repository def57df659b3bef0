"""Which experts to merge: groupings of one layer's experts into clusters.

Every function works on one layer's mergeable experts (super experts are removed before) and returns
clusters as lists of local indices, each sorted, the list sorted by first member.

* :func:`hc_groups` — hierarchical clustering (HC-SMoE, arXiv 2410.08589): average linkage over L2
  distances between features (moekit uses h_e, the router-weighted mean output). Without a size cap it
  is scipy's ``linkage(method="average")`` cut into ``n`` clusters; with a cap the same agglomeration
  (Lance-Williams average-linkage update) skips merges that would exceed the cap.
* :func:`centre_groups` — centre-based grouping: the ``n`` highest-scoring experts are centres, the
  others join a centre. ``mode="nearest"`` is MC-SMoE (arXiv 2310.01334; scores = activation frequency,
  each expert joins its most similar centre); ``mode="greedy"`` is REAM-style (scores = REAP saliency;
  centres in saliency order take their nearest unassigned experts, up to the cap).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import pdist, squareform

from moekit.errors import MoekitError


def _as_clusters(labels) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        out.setdefault(int(c), []).append(i)
    return sorted((sorted(v) for v in out.values()), key=lambda g: g[0])


def check_feasible(m: int, n: int, max_size: int | None, where: str = "") -> None:
    if n < 1 and m > 0:
        raise MoekitError(f"{where}merging {m} experts into {n} clusters is impossible: ask for fewer merges")
    if max_size is not None and max_size * n < m:
        raise MoekitError(
            f"{where}{m} experts cannot form {n} clusters of at most {max_size}: raise --max-cluster or ask for fewer merges"
        )


def hc_groups(features: np.ndarray, n: int, max_size: int | None = None) -> list[list[int]]:
    """Average-linkage hierarchical clustering of ``features`` [m, d] into ``n`` clusters of at most ``max_size``."""
    m = len(features)
    check_feasible(m, n, max_size)
    if n >= m:
        return [[i] for i in range(m)]
    if max_size is None or max_size >= m:
        z = linkage(np.asarray(features, dtype=np.float64), method="average", metric="euclidean")
        return _as_clusters(cut_tree(z, n_clusters=n).ravel())
    clusters, _ = _capped_agglomeration(features, n, max_size)
    return clusters


def hc_heights(features: np.ndarray, max_size: int | None = None, min_clusters: int = 1) -> list[float]:
    """Linkage distance of each successive merge (down to ``min_clusters``), divided by the mean pairwise
    distance so that layers with different scales compare; made non-decreasing. Used to spread a global target."""
    m = len(features)
    if m <= min_clusters:
        return []
    x = np.asarray(features, dtype=np.float64)
    scale = float(pdist(x).mean()) or 1.0
    if max_size is None or max_size >= m:
        heights = linkage(x, method="average", metric="euclidean")[:, 2][: m - min_clusters]
    else:
        _, heights = _capped_agglomeration(x, max(min_clusters, math.ceil(m / max_size)), max_size)
    return list(np.maximum.accumulate(np.asarray(heights, dtype=np.float64) / scale)) if len(heights) else []


def _capped_agglomeration(features, n: int, max_size: int):
    """Average-linkage agglomeration that never forms a cluster larger than ``max_size``."""
    x = np.asarray(features, dtype=np.float64)
    d = squareform(pdist(x))
    np.fill_diagonal(d, np.inf)
    members = {i: [i] for i in range(len(x))}
    heights = []
    while len(members) > n:
        best, pair = np.inf, None
        keys = sorted(members)
        for ai, a in enumerate(keys):
            for b in keys[ai + 1:]:
                if len(members[a]) + len(members[b]) <= max_size and d[a, b] < best:
                    best, pair = d[a, b], (a, b)
        if pair is None:
            raise MoekitError(f"cannot reach {n} clusters with at most {max_size} experts each: raise --max-cluster")
        a, b = pair
        na, nb = len(members[a]), len(members[b])
        for k in members:  # Lance-Williams update for average linkage
            if k not in (a, b):
                d[a, k] = d[k, a] = (na * d[a, k] + nb * d[b, k]) / (na + nb)
        members[a] = members[a] + members.pop(b)
        d[b, :] = d[:, b] = np.inf
        heights.append(best)
    return sorted((sorted(v) for v in members.values()), key=lambda g: g[0]), heights


def centre_groups(features: np.ndarray, scores: np.ndarray, n: int, max_size: int | None = None,
                  mode: str = "nearest") -> list[list[int]]:
    """Centre-based grouping: top-``n`` ``scores`` are centres; see the module doc for ``mode``."""
    m = len(features)
    check_feasible(m, n, max_size)
    if n >= m:
        return [[i] for i in range(m)]
    x = np.asarray(features, dtype=np.float64)
    d = squareform(pdist(x))
    order = [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    centres, others = order[:n], order[n:]
    groups = {c: [c] for c in centres}
    if mode == "nearest":
        cap = max_size or m
        for e in others:  # most-used first, so that busy experts get their favourite centre
            free = [c for c in centres if len(groups[c]) < cap]
            groups[min(free, key=lambda c: d[e, c])].append(e)
    elif mode == "greedy":
        cap = max_size or math.ceil(m / n)
        left = set(others)
        for c in centres:  # most salient first
            while left and len(groups[c]) < cap:
                e = min(left, key=lambda j: (d[c, j], j))
                groups[c].append(e)
                left.remove(e)
    else:
        raise MoekitError(f"unknown centre grouping mode '{mode}': use 'nearest' or 'greedy'")
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])
