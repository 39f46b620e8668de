"""Seeded synthetic routing for what-if studies.

A distribution is named by a short spec string:

================================  ===========================================================
spec                              popularity of each expert (per layer, per step)
================================  ===========================================================
``uniform``                       equal
``zipf:S``                        ∝ rank^-S; the ranking is shuffled independently per layer
``dirichlet:A``                   drawn once per layer from Dirichlet(A, …, A); small A = skewed
``drift:s=S,speed=V``             zipf(S) whose hot experts move: the ranking rotates by V
                                  experts per step (V may be fractional)
``burst:s=S,p=P,factor=F``        zipf(S); in each step, with probability P, one random expert
                                  becomes F times as popular for that step
================================  ===========================================================

Each token draws its top-k *distinct* experts without replacement in proportion to
popularity (successive sampling, the Plackett-Luce law): a chunk's uniform draws in one
array, searched and deduplicated in one compiled pass (:mod:`moesim.traces._compiled`);
gate weights are the picked experts' popularities renormalised over the k, descending.

A group-limited router (DeepSeek-V2/V3: ``groups=(G, M)``, the experts in G equal groups,
each token within M of them) is drawn in two stages of the same law: the token's M groups
in proportion to their total popularity, then its k experts among those groups'
(:func:`sample_experts_grouped`). Without the limit (M = G) the plain law is drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moesim.errors import InputError
from moesim.traces.store import RoutingTrace, TraceWriter

__all__ = [
    "Distribution",
    "Popularity",
    "check_groups",
    "parse_distribution",
    "sample_experts",
    "sample_experts_grouped",
    "synth_to_store",
    "synthesize",
]

CHUNK_TOKENS = 1 << 15  # fixed, so results do not depend on memory settings

_PARAMS = {
    "uniform": {},
    "zipf": {"s": 1.2},
    "dirichlet": {"alpha": 0.3},
    "drift": {"s": 1.2, "speed": 1.0},
    "burst": {"s": 1.0, "p": 0.1, "factor": 10.0},
}


@dataclass(frozen=True)
class Distribution:
    """A parsed distribution spec (see the module docstring)."""

    kind: str
    params: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def parse_distribution(spec: str) -> Distribution:
    """Parse ``kind[:value | :key=value,...]``; the first bare value is the main parameter."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in _PARAMS:
        raise InputError(
            f"unknown distribution; valid: {', '.join(_PARAMS)}", field="dist", value=spec
        )
    params = dict(_PARAMS[kind])
    names = list(params)
    for i, item in enumerate(x for x in rest.split(",") if x.strip()):
        key, eq, val = item.partition("=")
        if not eq:
            if i > 0 or not names:
                raise InputError("expected key=value", field="dist", value=spec)
            key, val = names[0], key
        key = key.strip()
        if key not in params:
            raise InputError(
                f"unknown parameter for {kind}; valid: {', '.join(names) or 'none'}",
                field="dist",
                value=spec,
            )
        try:
            params[key] = float(val)
        except ValueError:
            raise InputError("parameter is not a number", field="dist", value=spec) from None
        if not np.isfinite(params[key]):
            raise InputError("parameter must be a finite number", field="dist", value=spec)
        if params[key] < 0 or (key in ("alpha", "factor") and params[key] == 0):
            raise InputError("parameter must be positive", field="dist", value=spec)
    if kind == "burst" and params["p"] > 1:
        raise InputError("burst probability must be at most 1", field="dist", value=spec)
    return Distribution(kind, params)


class Popularity:
    """Log-popularity of every expert for a (layer, step)."""

    def __init__(self, dist: Distribution, num_experts: int, num_layers: int, seed: int) -> None:
        self.dist, self.e = dist, num_experts
        rng = np.random.default_rng([seed, 0xD157])
        ranks = np.arange(1, num_experts + 1, dtype=np.float64)
        s = dist.params.get("s", 0.0)
        self.base = []
        for _ in range(num_layers):
            if dist.kind == "uniform":
                logp = np.zeros(num_experts)
            elif dist.kind == "dirichlet":
                logp = np.log(rng.dirichlet(np.full(num_experts, dist.params["alpha"])) + 1e-300)
            else:
                logp = -s * np.log(ranks)[rng.permutation(num_experts)]
            self.base.append(logp)
        self.seed = seed

    def __call__(self, layer: int, step: int) -> np.ndarray:
        logp = self.base[layer]
        d = self.dist
        if d.kind == "drift":
            shift = d.params["speed"] * step
            lo = int(np.floor(shift))
            frac = shift - lo
            a, b = np.roll(logp, lo), np.roll(logp, lo + 1)
            return np.logaddexp(np.log1p(-frac) + a, np.log(frac) + b) if frac else a
        if d.kind == "burst":
            rng = np.random.default_rng([self.seed, 0xB0057, layer, step])
            if rng.random() < d.params["p"]:
                logp = logp.copy()
                logp[rng.integers(self.e)] += np.log(d.params["factor"])
        return logp


def _gumbel_topk(
    logp: np.ndarray, n: int, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) distinct experts by the Gumbel-top-k trick, in sampling order, and scores."""
    scores = logp[None, :] + rng.gumbel(size=(n, logp.size))  # (n, E)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k), unordered
    picked = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(picked, order, axis=1)


def _draw_distinct(
    logp: np.ndarray, n: int, k: int, rng: np.random.Generator, draws_per_pick: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) distinct experts drawn without replacement in proportion to exp(logp), in
    the order drawn (int64), and the popularities p (E,) they were drawn from."""
    from moesim.traces._compiled import successive_draws_kernel

    p = np.exp(logp - logp.max())
    p /= p.sum()
    cdf = np.cumsum(p)
    # each row's first k distinct of k * draws_per_pick draws from the categorical
    ids, found = successive_draws_kernel(rng.random((n, k * draws_per_pick)), cdf, k)
    short = np.flatnonzero(found < k)
    if short.size:  # keep the distinct picks drawn so far, complete them by Gumbel-top-k
        got = ids[short]  # over the experts left: the conditional law of the later picks
        rr, cc = np.nonzero(got >= 0)
        scores = logp[None, :] + rng.gumbel(size=(short.size, logp.size))
        scores[rr, got[rr, cc]] = -np.inf
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (ns, k)
        j = np.arange(k)[None, :]
        m_found = found[short][:, None]
        fill = np.take_along_axis(best, np.maximum(j - m_found, 0), axis=1)
        ids[short] = np.where(j < m_found, got, fill)
    return ids, p


def _by_popularity(
    ids: np.ndarray, p: np.ndarray, table: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``ids`` (n, k) ordered by popularity, descending, ties in pick order,
    as int32, and its gate weights (the popularities renormalised over the k, float32).
    ``p``: (E,) the popularities, or (S, E) with row i's in ``p[table[i]]``."""
    e = p.shape[-1]
    k = ids.shape[1]
    # dense rank of each expert's popularity (equal popularities share a rank)
    ranks = np.stack([np.unique(-q, return_inverse=True)[1].reshape(-1) for q in p.reshape(-1, e)])
    at = ids if table is None else ids + (np.asarray(table).reshape(-1, 1) * e)
    # the packed key (rank, column), one sort; the column in the low bits
    bits = max(k - 1, 1).bit_length()
    key = (ranks.reshape(-1)[at] << bits) | np.arange(k)
    key.sort(axis=1)
    order = key & ((1 << bits) - 1)
    ids = np.take_along_axis(ids, order, axis=1)
    w = p.reshape(-1)[np.take_along_axis(at, order, axis=1)]  # (n, k)
    return ids.astype(np.int32), (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def sample_experts(
    logp: np.ndarray, n: int, k: int, rng: np.random.Generator, draws_per_pick: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) distinct experts drawn without replacement in proportion to exp(logp), and
    gate weights (each expert's popularity, renormalised over the k) in descending order.

    Successive sampling: draw experts with replacement from the categorical and keep each
    token's first k distinct ones — the same Plackett-Luce law as the Gumbel-top-k trick,
    at ``k * draws_per_pick`` draws per token instead of one per expert. The few tokens
    whose draws hold fewer than k distinct experts fall back to Gumbel-top-k.
    """
    ids, p = _draw_distinct(logp, n, k, rng, draws_per_pick)
    return _by_popularity(ids, p)


def sample_experts_grouped(
    logp: np.ndarray, n: int, k: int, groups: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) distinct experts within ``groups[1]`` of ``groups[0]`` equal expert groups
    (contiguous ids), and gate weights as :func:`sample_experts`.

    Two stages of the Plackett-Luce law: each token draws its M groups without
    replacement in proportion to each group's total popularity, then its k experts
    without replacement among those groups' experts (drawn set by set, at most C(G, M)
    sets, in the sets' lexicographic order; ordered and weighted all at once).
    """
    g, m = groups
    e = logp.size
    per = e // g
    glogp = np.logaddexp.reduce(logp.reshape(g, per), axis=1)  # (G,) group popularity
    chosen, _ = _draw_distinct(glogp, n, m, rng, 4)  # (n, M)
    # each token's set of groups as one integer (its sorted groups' digits in base G), so
    # the distinct sets come from a 1-D unique, in the same (lexicographic) order; the M
    # columns sorted by odd-even transposition (M rounds of column minima and maxima,
    # far cheaper than sorting each short row)
    cols = [chosen[:, i] for i in range(m)]
    for r in range(m):
        for i in range(r % 2, m - 1, 2):
            lo, hi = np.minimum(cols[i], cols[i + 1]), np.maximum(cols[i], cols[i + 1])
            cols[i], cols[i + 1] = lo, hi
    code = np.zeros(n, dtype=np.int64)
    for c in cols:
        code = code * g + c
    codes, which = np.unique(code, return_inverse=True)
    which = which.reshape(-1)
    sets = (codes[:, None] // (g ** np.arange(m - 1, -1, -1))) % g
    ids = np.empty((n, k), dtype=np.int64)
    p = np.empty((len(sets), e))
    group_of = np.arange(e) // per
    # each set's tokens, in token order
    by_set = np.argsort(which, kind="stable")
    counts = np.bincount(which, minlength=len(sets))
    ends = np.cumsum(counts)
    for j, groups_set in enumerate(sets):
        rows = by_set[ends[j] - counts[j] : ends[j]]
        allowed = np.zeros(g, dtype=bool)
        allowed[groups_set] = True
        ids[rows], p[j] = _draw_distinct(
            np.where(allowed[group_of], logp, -np.inf), rows.size, k, rng, 4
        )
    return _by_popularity(ids, p, which)


def check_groups(groups: tuple[int, int] | None, num_experts: int, top_k: int) -> None:
    """Raise :class:`InputError` unless ``groups`` (G, M) splits the experts evenly and
    lets a token reach k experts."""
    if groups is None:
        return
    g, m = groups
    if g < 1 or num_experts % g or not 1 <= m <= g or m * (num_experts // g) < top_k:
        raise InputError(
            f"need G dividing the {num_experts} experts and 1 <= M <= G with M x experts "
            f"per group >= top-{top_k}",
            field="groups",
            value=f"{g},{m}",
        )


def _chunks(
    dist: Distribution,
    num_experts: int,
    top_k: int,
    num_layers: int,
    num_tokens: int,
    steps: int,
    seed: int,
    groups: tuple[int, int] | None = None,
) -> Iterator[tuple[int, int, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]]:
    """Yield (step, first token, token indices, per-layer (ids, weights)) chunk by chunk."""
    if top_k > num_experts:
        raise InputError("top-k exceeds the number of experts", field="top_k", value=top_k)
    check_groups(groups, num_experts, top_k)
    limited = groups is not None and groups[1] < groups[0]
    if steps < 1 or num_tokens < steps:
        raise InputError("need at least one token per step", field="steps", value=steps)
    pop = Popularity(dist, num_experts, num_layers, seed)
    bounds = np.linspace(0, num_tokens, steps + 1).astype(np.int64)
    for step in range(steps):
        for start in range(int(bounds[step]), int(bounds[step + 1]), CHUNK_TOKENS):
            stop = min(start + CHUNK_TOKENS, int(bounds[step + 1]))
            rng = np.random.default_rng([seed, step, start])
            per_layer = [
                sample_experts_grouped(pop(la, step), stop - start, top_k, groups, rng)
                if limited and groups is not None
                else sample_experts(pop(la, step), stop - start, top_k, rng)
                for la in range(num_layers)
            ]
            yield step, start, np.arange(start, stop, dtype=np.int64), per_layer


def synthesize(
    *,
    num_experts: int,
    top_k: int,
    num_layers: int,
    num_tokens: int,
    distribution: str | Distribution = "uniform",
    steps: int = 1,
    seed: int = 0,
    groups: tuple[int, int] | None = None,
) -> RoutingTrace:
    """A synthetic trace in memory: expert_ids and gate_weights of shape (L, N, K).
    ``groups``: (G, M), each token within M of G expert groups (None: no limit)."""
    dist = parse_distribution(distribution) if isinstance(distribution, str) else distribution
    ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int32)
    ws = np.empty((num_layers, num_tokens, top_k), dtype=np.float32)
    step_of = np.empty(num_tokens, dtype=np.int32)
    for step, _start, tok, per_layer in _chunks(
        dist, num_experts, top_k, num_layers, num_tokens, steps, seed, groups
    ):
        step_of[tok] = step
        for la, (i, w) in enumerate(per_layer):
            ids[la, tok], ws[la, tok] = i, w
    return RoutingTrace(
        expert_ids=ids,
        gate_weights=ws,
        steps=step_of,
        layers=tuple(range(num_layers)),
        num_experts=num_experts,
        meta=_meta(dist, seed, steps, groups),
    )


def _meta(
    dist: Distribution, seed: int, steps: int, groups: tuple[int, int] | None = None
) -> dict[str, object]:
    capture: dict[str, object] = {"distribution": str(dist), "seed": seed, "steps": steps}
    if groups is not None:
        capture["groups"] = list(groups)
    return {
        "model": "synthetic",
        "source": f"moesim trace synth --dist {dist}",
        "capture": capture,
    }


def synth_to_store(
    out: str | Path,
    *,
    num_experts: int,
    top_k: int,
    num_layers: int,
    num_tokens: int,
    distribution: str | Distribution = "uniform",
    steps: int = 1,
    seed: int = 0,
    groups: tuple[int, int] | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Stream a synthetic trace into the store in bounded memory; same content as
    :func:`synthesize` for the same arguments (``force``: see :class:`TraceWriter`;
    ``progress(n)``: called as each chunk of ``n`` tokens is written)."""
    dist = parse_distribution(distribution) if isinstance(distribution, str) else distribution
    with TraceWriter(
        out,
        num_experts=num_experts,
        top_k=top_k,
        layers=range(num_layers),
        meta=_meta(dist, seed, steps, groups),
        force=force,
    ) as w:
        for step, _start, tok, per_layer in _chunks(
            dist, num_experts, top_k, num_layers, num_tokens, steps, seed, groups
        ):
            for la, (i, wts) in enumerate(per_layer):
                w.write(la, i, wts, token=tok, step=step)
            if progress is not None:
                progress(tok.size)
    return Path(out)
