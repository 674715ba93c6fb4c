"""Token choice from logits: argmax, Gumbel-max with temperature / top-k / top-p, confidences, and the
distribution-preserving speculative acceptance rule.

Every function takes logits ``float32 [..., V]``.  The MASK id is never chosen: it is removed from the
choice (argmax, sampling, the sampling distribution) but kept in the softmax denominator of the
*confidence* (docs/decoding.md), so a confidence is ``softmax(logits)[chosen]`` at temperature 1; the
diffusion policies' margin and entropy are read from the same temperature-1 distribution.

:class:`Sampler` holds the static part (greedy or not, whether top-k / top-p filters are on, the MASK
id); the numeric knobs (:class:`~jaxdlm.generation.knobs.Knobs`: temperature, top_k, top_p) are traced values so
that changing them does not recompile a generation program.

Per-row settings (the serving engine, :mod:`jaxdlm.serving`): every knob may be a scalar (one value for the
whole batch, what ``generate`` passes) or an array ``[B]`` (one value per row, broadcast against the row's
logits by :func:`per_row`); a PRNG key may be one key (``uint32 [2]``) or one key per row (``uint32 [B, 2]``:
row ``i``'s noise is drawn from its own key alone, :func:`gumbel`, :func:`uniform`).  With scalars and one key
every function computes exactly what it computed before per-row values existed.  In a sampling program a row
whose temperature is 0 takes the argmax, exactly as a greedy program does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # knobs -> policies -> sampling: the type only
    from jaxdlm.generation.knobs import Knobs

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static sampling settings (hashable: part of a jitted program's static key).

    Attributes:
      greedy: temperature 0 (argmax) when True.
      use_top_k / use_top_p: whether the (traced) top-k / top-p filters are applied.
      mask_id: the MASK token id excluded from every choice (None: nothing excluded).
    """

    greedy: bool = True
    use_top_k: bool = False
    use_top_p: bool = False
    mask_id: int | None = None


def per_row(value, ndim: int):
    """A knob broadcastable against ``ndim``-dimensional per-row data: a scalar as it is, ``[B]`` as
    ``[B, 1, ..., 1]``."""
    value = jnp.asarray(value)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def keys_per_row(key) -> bool:
    """Whether ``key`` holds one PRNG key per row (raw ``uint32 [B, 2]`` or typed ``[B]``)."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def fold_in(key, data):
    """``jax.random.fold_in`` of one key, or of each row's key with its own ``data[i]`` (``data`` scalar or
    ``[B]``)."""
    if not keys_per_row(key):
        return jax.random.fold_in(key, data)
    data = jnp.broadcast_to(jnp.asarray(data, jnp.uint32), key.shape[:1])
    return jax.vmap(jax.random.fold_in)(key, data)


def split2(key):
    """Two keys from one (``jax.random.split``), row by row for per-row keys."""
    if not keys_per_row(key):
        a, b = jax.random.split(key)
        return a, b
    both = jax.vmap(jax.random.split)(key)
    return both[:, 0], both[:, 1]


def _draw(fn, key, shape):
    """``fn(key, shape)``, or per-row keys: row ``i`` of the ``[B, ...]`` result is ``fn(key[i], shape[1:])`` (the
    same values a one-row batch draws from that key)."""
    if not keys_per_row(key):
        return fn(key, shape)
    return jax.vmap(lambda k: fn(k, shape[1:]))(key)


def gumbel(key, shape):
    """Standard Gumbel noise ``float32 shape`` (per-row keys: each row from its own key)."""
    return _draw(lambda k, s: jax.random.gumbel(k, s, jnp.float32), key, shape)


def uniform(key, shape):
    """Uniform ``[0, 1)`` noise ``float32 shape`` (per-row keys: each row from its own key)."""
    return _draw(lambda k, s: jax.random.uniform(k, s, jnp.float32), key, shape)


def _exclude_mask(logits, mask_id):
    if mask_id is None:
        return logits
    return logits.at[..., mask_id].set(NEG_INF)


def filtered_logits(logits, sampler: Sampler, knobs: Knobs):
    """Logits of the sampling distribution: ``logits / T`` with MASK and filtered tokens at ``-inf``.

    ``knobs``: :class:`Knobs`; reads ``temperature``, ``top_k`` (``<= 0`` = off) and ``top_p`` (``>= 1`` = off),
    scalars or per row (``[B]`` against ``logits [B, ..., V]``).  Top-k keeps the ``k`` largest (ties at the k-th
    value are all kept); top-p keeps the smallest prefix of the sorted distribution whose mass reaches ``top_p``
    (the top token always survives).
    """
    x = _exclude_mask(logits.astype(jnp.float32), sampler.mask_id)
    if sampler.greedy:
        return x
    temperature, top_k, top_p = (per_row(k, x.ndim) for k in (knobs.temperature, knobs.top_k, knobs.top_p))
    x = x / jnp.maximum(temperature, 1e-6)
    v = x.shape[-1]
    if sampler.use_top_k or sampler.use_top_p:
        sorted_x = -jnp.sort(-x, axis=-1)  # descending
    if sampler.use_top_k:
        k = jnp.clip(top_k, 1, v)
        kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(k - 1, x.shape[:-1] + (1,)).astype(jnp.int32), -1)
        keep = jnp.where(top_k > 0, x >= kth, True)
        x = jnp.where(keep, x, NEG_INF)
        sorted_x = jnp.where(jnp.arange(v) < jnp.where(top_k > 0, k, v), sorted_x, NEG_INF)
    if sampler.use_top_p:
        p_sorted = jax.nn.softmax(sorted_x, axis=-1)
        mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
        # number of sorted tokens kept: those whose preceding mass is < top_p (at least one)
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(sorted_x, n_keep - 1, -1)
        x = jnp.where((top_p >= 1) | (x >= cutoff), x, NEG_INF)
    return x


def _greedy_rows(logits, sampler: Sampler, knobs: Knobs):
    """Where a sampling program's rows sit at temperature 0 (``bool``, broadcast against ``[..., V]`` logits)."""
    return per_row(knobs.temperature, logits.ndim - 1) <= 0


def choose(logits, key, sampler: Sampler, knobs: Knobs):
    """Chosen tokens ``int32 [...]``: argmax (greedy, or a row at temperature 0) or Gumbel-max over
    :func:`filtered_logits`."""
    if sampler.greedy:
        return jnp.argmax(filtered_logits(logits, sampler, knobs), axis=-1).astype(jnp.int32)

    def greedy():
        return jnp.argmax(_exclude_mask(logits.astype(jnp.float32), sampler.mask_id), axis=-1).astype(jnp.int32)

    def mixed():
        x = filtered_logits(logits, sampler, knobs)
        sampled = jnp.argmax(x + gumbel(key, x.shape), axis=-1).astype(jnp.int32)
        return jnp.where(_greedy_rows(logits, sampler, knobs), greedy(), sampled)

    return _unless_all_greedy(knobs, mixed, greedy)


def _unless_all_greedy(knobs: Knobs, mixed, greedy):
    """``mixed()``; with per-row temperatures, ``greedy()`` (the same values, none of the sampling work) when every
    row is at temperature 0."""
    t = jnp.asarray(knobs.temperature)
    if t.ndim == 0:
        return mixed()
    return jax.lax.cond(jnp.any(t > 0), mixed, greedy)


def confidence(logits, tokens):
    """``softmax(logits)[tokens]`` at temperature 1 over the full vocabulary (MASK included)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.exp(jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0])


def margin(logits, tokens, mask_id: int | None):
    """``p[tokens] - max(p[v] for v not in {tokens, MASK})``, ``p = softmax(logits)`` at temperature 1 over the
    full vocabulary (MASK included in the denominator, excluded from the runner-up since it is never chosen).

    At temperature 0 ``tokens`` is the top choice and this is the top-1 minus top-2 probability (``>= 0``);
    with sampled tokens it may be negative.  ``logits float32 [..., V]``, ``tokens int32 [...]``.
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    v = jnp.arange(p.shape[-1])
    others = v != tokens[..., None]
    if mask_id is not None:
        others = others & (v != mask_id)
    chosen = jnp.take_along_axis(p, tokens[..., None], -1)[..., 0]
    return chosen - jnp.max(jnp.where(others, p, 0.0), axis=-1)


def entropy(logits):
    """Entropy in nats ``-sum(p log p)`` of ``p = softmax(logits)`` at temperature 1 over the full vocabulary
    (MASK included): ``float32 [...]`` for ``logits [..., V]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)


def probs(logits, sampler: Sampler, knobs: Knobs):
    """The sampling distribution ``float32 [..., V]`` (one-hot argmax when greedy)."""
    if sampler.greedy:
        x = filtered_logits(logits, sampler, knobs)
        return jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=jnp.float32)

    def greedy():
        return jax.nn.one_hot(jnp.argmax(_exclude_mask(logits.astype(jnp.float32), sampler.mask_id), -1),
                              logits.shape[-1], dtype=jnp.float32)

    def mixed():
        x = filtered_logits(logits, sampler, knobs)
        return jnp.where(_greedy_rows(logits, sampler, knobs)[..., None], greedy(), jax.nn.softmax(x, axis=-1))

    return _unless_all_greedy(knobs, mixed, greedy)


def speculative_accept(draft, p, q, key):
    """Speculative rejection sampling (Leviathan et al. / Chen et al.) over a block of drafts.

    Args:
      draft: ``int32 [B, N]`` draft tokens, ``draft[:, i]`` sampled from ``q[:, i]``.
      p: ``float32 [B, N+1, V]`` target (AR) distributions; ``p[:, i]`` is the distribution of the token
        that ``draft[:, i]`` proposes; ``p[:, N]`` the one after the whole draft.
      q: ``float32 [B, N, V]`` draft distributions.
      key: PRNG key (or one per row).

    Returns ``(a [B], bonus [B])``: the number of accepted drafts and the token emitted after them
    (from the residual ``max(p - q, 0)`` at the first rejection, or from ``p[:, N]`` when all are
    accepted).  The emitted sequence ``draft[:, :a] + [bonus]`` is distributed exactly as sampling
    token by token from ``p``.
    """
    r, n = draft.shape
    k_u, k_s = split2(key)
    p_d = jnp.take_along_axis(p[:, :n], draft[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, draft[..., None], -1)[..., 0]
    u = uniform(k_u, (r, n))
    ok = u * q_d < p_d  # accept with probability min(1, p/q)
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    p_a = jnp.take_along_axis(p, a[:, None, None], 1)[:, 0]
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    q_a = jnp.take_along_axis(q_pad, a[:, None, None], 1)[:, 0]
    resid = jnp.maximum(p_a - q_a, 0.0)
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_a)
    logr = jnp.where(resid > 0, jnp.log(jnp.maximum(resid, 1e-38)), NEG_INF)
    bonus = jnp.argmax(logr + gumbel(k_s, logr.shape), -1).astype(jnp.int32)
    return a, bonus


def exact_match_accept(draft, ar):
    """Accept the longest prefix with ``ar[:, i] == draft[:, i]``; returns ``(a [B], bonus = ar[:, a])``.

    ``draft [B, N]``, ``ar [B, N+1]`` (the verifier's own choices).
    """
    ok = (ar[:, :-1] == draft).astype(jnp.int32)
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    return a, jnp.take_along_axis(ar, a[:, None], 1)[:, 0]
