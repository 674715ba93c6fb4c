"""Pallas (Triton-style ``pl.pallas_call``) attention kernels behind the one attention API.

Same contract as :func:`jaxdlm.attention.xla.attention`: queries ``q [B, T, H, D]`` over keys / values
``[B, S, KVH, D]`` (``H % KVH == 0``), the mask given by per-token :class:`~jaxdlm.attention.masks.TokenInfo`.
Nothing ``[T, S]`` is materialised: every program loads the metadata of its query tile and of each key tile
it visits and evaluates :func:`jaxdlm.attention.masks.allowed` on the tile.  Which tiles a program visits
comes from :func:`jaxdlm.attention.masks.tile_classes` (per-tile min/max bounds, O(T/tq * S/tk)):
fully masked tiles are never visited, partial tiles are masked, fully visible tiles run unmasked.

Tile schedules (``KernelConfig.schedule``): ``"runs"`` (default) loops over runs of consecutive visible
tiles, so inside a run the K/V address is affine in the loop variable and Triton can software-pipeline
the loads; ``"list"`` (v1) loops over an explicit list of visible tiles.

Kernels (all Triton backend, ``compiler_params`` passed explicitly; ``interpret=True`` off GPU):

* ``_fwd_kernel`` - flash attention forward (online softmax, fp32 accumulators); one program per
  (query tile, query head, batch row).  Training / prefill / anything with more than 32 queries.
* ``_fwd_kernel`` in split mode - flash-decoding: up to 32 queries (times the GQA group, packed into one
  tile of ``T * H/KVH`` rows so each K/V tile is read once per kv head) over the cache slots, the visible
  key tiles split evenly over ``num_splits`` programs, partial results merged in XLA.  Per-row cache
  lengths come in through ``k_info.valid``.
* ``_dq_kernel`` / ``_dkdv_kernel`` - the ``custom_vjp`` backward (FlashAttention-2 style, recomputing
  the probabilities from the saved log-sum-exp); dk / dv sum over the GQA group inside the program.

Lengths that are not multiples of the tiles and head dims that are not powers of two are padded in the
wrapper (padded keys are invalid, padded head dims are zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxdlm import compat
from jaxdlm.attention import masks
from jaxdlm.attention.masks import TILE_FULL, TILE_SKIP, TokenInfo

SCHEDULES = ("runs", "list")
_BIG = 1e30  # log-sum-exp of a query row that sees no key: exp(s - _BIG) == 0 for every s
_SQ = compat.SQUEEZED


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings (hashable).  Tile sizes are powers of two >= 16.

    ``interpret=None`` means "interpret unless the default backend is a GPU".  ``num_splits=None`` picks
    the flash-decoding split count from the shape and the device (see :func:`_num_splits`).
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    block_k_decode: int = 128
    num_warps: int = 8
    num_stages: int = 3
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2
    num_warps_decode: int = 4
    num_stages_decode: int = 3
    # decode tiles of more than 32 query rows (e.g. 32 queries x GQA 4 = 128) hold a [rows, D] f32
    # accumulator and a [rows, block_k] score tile: more warps and a narrower key tile keep them in registers
    block_k_decode_wide: int = 64
    num_warps_decode_wide: int = 8
    decode_max_queries: int = 32
    num_splits: int | None = None
    min_tiles_per_split: int = 4
    schedule: str = "runs"
    interpret: bool | None = None
    debug: bool = False  # print each kernel's jaxpr and Triton IR when lowering

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_k_decode", "block_k_decode_wide"):
            val = getattr(self, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name}={val} must be a power of two >= 16 (Triton tile shapes)")


def _interpret(cfg: KernelConfig) -> bool:
    return jax.default_backend() != "gpu" if cfg.interpret is None else cfg.interpret


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ---------------------------------------------------------------------------------------------------
# padding and tile lists (XLA, outside the kernels)


def _pad_axis(x, n, axis, **kw):
    if x.shape[axis] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths, **kw)


def _pad_info(info: TokenInfo, n: int) -> TokenInfo:
    """Pad metadata to ``n`` tokens: padded tokens repeat the last one (tight tile bounds) and are invalid."""
    pos, blk, stream = (_pad_axis(x.astype(jnp.int32), n, 1, mode="edge") for x in info[:3])
    return TokenInfo(pos, blk, stream, _pad_axis(info.valid.astype(bool), n, 1, constant_values=False))


def _visit_lists(cls):
    """Schedule "list" (v1).  ``cls [B, n, m]`` -> (int32 ``[B, n, 1 + m]``,): the count of non-skipped tiles,
    then ``4 * tile + class`` for those tiles in ascending order (then padding)."""
    order = jnp.argsort(cls == TILE_SKIP, axis=-1, stable=True).astype(jnp.int32)
    entries = order * 4 + jnp.take_along_axis(cls, order, axis=-1)
    count = jnp.sum(cls != TILE_SKIP, axis=-1, keepdims=True).astype(jnp.int32)
    return (jnp.concatenate([count, entries], axis=-1),)


def _visit_runs(cls):
    """Schedule "runs" (v2).  ``cls [B, n, m]`` -> (int32 ``[B, n, 2 + 2m]``, ``cls``): the number of runs of
    consecutive non-skipped tiles, their total length, then ``start, end`` (exclusive) of each run.  Inside
    a run the key-tile address is affine in the loop variable, so Triton can software-pipeline the loads."""
    vis = cls != TILE_SKIP
    prev = jnp.pad(vis[..., :-1], ((0, 0), (0, 0), (1, 0)))
    nxt = jnp.pad(vis[..., 1:], ((0, 0), (0, 0), (0, 1)))
    starts = jnp.argsort(~(vis & ~prev), axis=-1, stable=True).astype(jnp.int32)
    ends = jnp.argsort(~(vis & ~nxt), axis=-1, stable=True).astype(jnp.int32) + 1
    count = jnp.sum(vis & ~prev, axis=-1, keepdims=True).astype(jnp.int32)
    total = jnp.sum(vis, axis=-1, keepdims=True).astype(jnp.int32)
    pairs = jnp.stack([starts, ends], axis=-1).reshape(*cls.shape[:2], 2 * cls.shape[2])
    return jnp.concatenate([count, total, pairs], axis=-1), cls


def _schedule(cls, kind: str):
    return _visit_runs(cls) if kind == "runs" else _visit_lists(cls)


def _schedule_specs(arrays, index_map):
    return [pl.BlockSpec((_SQ, _SQ, a.shape[2]), index_map) for a in arrays]


def _num_visible(sched, kind: str):
    return sched[0][1] if kind == "runs" else sched[0][0]


def _visit(sched, kind: str, lo, hi, body, init):
    """``body(tile, class, carry)`` over the visible tiles with ordinal ``lo..hi-1`` (ascending tiles)."""
    if kind == "list":
        lists_ref, = sched

        def step(j, carry):
            e = lists_ref[1 + j]
            return body(e // 4, e % 4, carry)
        return lax.fori_loop(lo, hi, step, init)
    runs_ref, cls_ref = sched

    def run(r, carry):
        carry, offset = carry
        start, end = runs_ref[2 + 2 * r], runs_ref[3 + 2 * r]
        a = jnp.maximum(start, start + lo - offset)
        b = jnp.minimum(end, start + hi - offset)
        carry = lax.fori_loop(a, b, lambda t, c: body(t, cls_ref[t], c), carry)
        return carry, offset + (end - start)
    return lax.fori_loop(0, runs_ref[0], run, (init, jnp.int32(0)))[0]


def _info_arrays(info: TokenInfo):
    return (info.pos, info.block, info.stream, info.valid.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------------
# kernel bodies


def _row_info(refs):
    """Load query-tile metadata refs ``[R]`` as a TokenInfo of ``[1, R]`` fields."""
    pos, blk, stream = (r[...][None, :] for r in refs)
    return TokenInfo(pos, blk, stream, jnp.ones_like(pos, dtype=bool))


def _key_info(refs, start, size):
    pos, blk, stream, valid = (r[pl.ds(start, size)][None, :] for r in refs)
    return TokenInfo(pos, blk, stream, valid != 0)


def _mask_tile(s, cls, q_info, k_info, window):
    """``s`` where :func:`masks.allowed`, ``-inf`` elsewhere; FULL tiles pass through unmasked."""
    def masked(s):
        return jnp.where(masks.allowed(q_info, k_info, window)[0], s, -jnp.inf)
    return lax.cond(cls == TILE_FULL, lambda s: s, masked, s)


def _dot_t(a, b, precision):
    """``a @ b.T`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _dot(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _dot_tn(a, b, precision):
    """``a.T @ b`` in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _flash_loop(sched, kind, q, q_info, k_ref, v_ref, k_refs, lo, hi, *, scale, block_k, window):
    """Online-softmax loop over visible key tiles ``lo..hi-1``: returns ``acc [R, D], m [R], l [R]`` (f32)."""
    r, d = q.shape
    prec = _precision(q.dtype)

    def body(tile, cls, carry):
        acc, m, l = carry
        start = pl.multiple_of(tile * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot_t(q, k, prec) * scale
        s = _mask_tile(s, cls, q_info, _key_info(k_refs, start, block_k), window)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, prec)
        return acc, m_new, l

    init = (jnp.zeros((r, d), jnp.float32), jnp.full((r,), -jnp.inf, jnp.float32), jnp.zeros((r,), jnp.float32))
    return _visit(sched, kind, lo, hi, body, init)


def _fwd_kernel(*refs, kind, scale, block_k, window, num_splits):
    ns = 2 if kind == "runs" else 1
    sched = refs[:ns]
    q_ref, qp_ref, qb_ref, qs_ref, k_ref, v_ref, kp_ref, kb_ref, ks_ref, kv_ref = refs[ns:ns + 10]
    out_refs = refs[ns + 10:]
    q = q_ref[...]
    q_info = _row_info((qp_ref, qb_ref, qs_ref))
    k_refs = (kp_ref, kb_ref, ks_ref, kv_ref)
    count = _num_visible(sched, kind)
    if num_splits is None:  # one program does the whole row: normalised output + log-sum-exp
        acc, m, l = _flash_loop(sched, kind, q, q_info, k_ref, v_ref, k_refs, 0, count, scale=scale,
                                block_k=block_k, window=window)
        o_ref, lse_ref = out_refs
        seen = l > 0
        o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _BIG)
    else:  # flash-decoding: this program's share of the visible tiles, unnormalised
        per = (count + num_splits - 1) // num_splits
        lo = pl.program_id(0) * per
        hi = jnp.minimum(lo + per, count)
        acc, m, l = _flash_loop(sched, kind, q, q_info, k_ref, v_ref, k_refs, lo, hi, scale=scale,
                                block_k=block_k, window=window)
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def _probs(q, k, lse, cls, q_info, k_info, scale, window, prec):
    s = _mask_tile(_dot_t(q, k, prec) * scale, cls, q_info, k_info, window)
    return jnp.exp(s - lse[:, None])


def _dq_kernel(*refs, kind, scale, block_k, window):
    ns = 2 if kind == "runs" else 1
    sched = refs[:ns]
    (q_ref, do_ref, lse_ref, delta_ref, qp_ref, qb_ref, qs_ref, k_ref, v_ref,
     kp_ref, kb_ref, ks_ref, kv_ref, dq_ref) = refs[ns:]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_info = _row_info((qp_ref, qb_ref, qs_ref))
    k_refs = (kp_ref, kb_ref, ks_ref, kv_ref)
    prec = _precision(q.dtype)

    def body(tile, cls, dq):
        start = pl.multiple_of(tile * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        p = _probs(q, k, lse, cls, q_info, _key_info(k_refs, start, block_k), scale, window, prec)
        ds = p * (_dot_t(do, v, prec) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, prec)

    dq = _visit(sched, kind, 0, _num_visible(sched, kind), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, kind, scale, block_q, group, window):
    ns = 2 if kind == "runs" else 1
    sched = refs[:ns]
    (k_ref, v_ref, kp_ref, kb_ref, ks_ref, kv_ref, q_ref, do_ref, lse_ref, delta_ref,
     qp_ref, qb_ref, qs_ref, dk_ref, dv_ref) = refs[ns:]
    k, v = k_ref[...], v_ref[...]
    pos, blk, stream, valid = (r[...][None, :] for r in (kp_ref, kb_ref, ks_ref, kv_ref))
    k_info = TokenInfo(pos, blk, stream, valid != 0)
    prec = _precision(k.dtype)

    def head(g, carry):
        def body(tile, cls, carry):
            dk, dv = carry
            start = pl.multiple_of(tile * block_q, block_q)
            q = q_ref[pl.ds(start, block_q), g, :]
            do = do_ref[pl.ds(start, block_q), g, :]
            lse = lse_ref[g, pl.ds(start, block_q)]
            delta = delta_ref[g, pl.ds(start, block_q)]
            qpos, qblk, qstr = (r[pl.ds(start, block_q)][None, :] for r in (qp_ref, qb_ref, qs_ref))
            q_info = TokenInfo(qpos, qblk, qstr, jnp.ones_like(qpos, dtype=bool))
            p = _probs(q, k, lse, cls, q_info, k_info, scale, window, prec)
            dv = dv + _dot_tn(p.astype(do.dtype), do, prec)
            ds = p * (_dot_t(do, v, prec) - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q, prec)
            return dk, dv
        return _visit(sched, kind, 0, _num_visible(sched, kind), body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------
# pallas_call wrappers


def _specs_row(n, idx):
    return pl.BlockSpec((_SQ, n), idx)


def _kv_spec(s: int, d: int, layer: int | None, head_of):
    """BlockSpec of one kv head's whole key / value row ``[S, D]``: from ``[B, S, KVH, D]``, or in place from a
    stacked heads-major cache ``[L, B, KVH, S, D]`` at the static ``layer`` (grid ``(i, j, n)``; ``head_of(j)`` is
    the kv head)."""
    if layer is None:
        return pl.BlockSpec((_SQ, s, _SQ, d), lambda i, j, n: (n, 0, head_of(j), 0))
    return pl.BlockSpec((_SQ, _SQ, _SQ, s, d), lambda i, j, n: (layer, n, head_of(j), 0, 0))


def _kv_shape(k, layer):
    """``(S, KVH)`` of keys ``[B, S, KVH, D]`` or of a stacked heads-major cache ``[L, B, KVH, S, D]``."""
    return (k.shape[1], k.shape[2]) if layer is None else (k.shape[3], k.shape[2])


def _train_fwd(q, k, v, q_info, k_info, scale, window, cfg: KernelConfig, layer=None):
    """Padded inputs (``T % bq == S % bk == 0``, ``D`` a power of two) -> ``out [B,T,H,D], lse [B,H,T]``.

    ``k, v``: ``[B, S, KVH, D]``, or a stacked cache ``[L, B, KVH, S, D]`` read in place at ``layer``."""
    b, t, h, d = q.shape
    s, kvh = _kv_shape(k, layer)
    group = h // kvh
    bq, bk = min(cfg.block_q, t), min(cfg.block_k, s)
    nq = t // bq
    sched = _schedule(masks.tile_classes(q_info, k_info, bq, bk, window), cfg.schedule)
    kernel = functools.partial(_fwd_kernel, kind=cfg.schedule, scale=scale, block_k=bk, window=window,
                               num_splits=None)
    qrow = _specs_row(bq, lambda i, j, n: (n, i))
    krow = _specs_row(s, lambda i, j, n: (n, 0))
    kvspec = _kv_spec(s, d, layer, lambda j: j // group)
    return pl.pallas_call(
        kernel,
        grid=(nq, h, b),
        in_specs=[*_schedule_specs(sched, lambda i, j, n: (n, i, 0)),
                  pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, j, n: (n, i, j, 0)), qrow, qrow, qrow,
                  kvspec, kvspec, krow, krow, krow, krow],
        out_specs=[pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, j, n: (n, i, j, 0)),
                   pl.BlockSpec((_SQ, _SQ, bq), lambda i, j, n: (n, j, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=compat.triton_compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=_interpret(cfg), debug=cfg.debug,
        name="jaxdlm_flash_fwd",
    )(*sched, q, *_info_arrays(q_info)[:3], k, v, *_info_arrays(k_info))


def _num_cores() -> int:
    """Streaming multiprocessors of the default device (``core_count``; 132, an H100's, when unknown)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", None) or 132)
    except Exception:  # noqa: BLE001  (no device query possible: keep the H100 figure)
        return 132


def _num_splits(cfg: KernelConfig, b: int, kvh: int, nk: int) -> int:
    """Key splits of flash-decoding: ``batch x kv heads x splits`` programs fill every SM (one wave), with at
    least ``cfg.min_tiles_per_split`` key tiles per program so that each still streams (``cfg.num_splits``
    overrides)."""
    if cfg.num_splits is not None:
        return max(1, min(cfg.num_splits, nk))
    fill = -(-_num_cores() // (b * kvh))
    return max(1, min(fill, nk // cfg.min_tiles_per_split))


def _decode_fwd(q, k, v, q_info, k_info, scale, window, cfg: KernelConfig, layer=None):
    """Flash-decoding.  ``q [B, T, H, D]`` (T small, D a power of two), ``k, v`` padded to ``S % bk == 0``
    (``[B, S, KVH, D]``, or a stacked cache ``[L, B, KVH, S, D]`` read in place at ``layer``).

    The ``T * G`` query rows of one kv head form one tile; returns ``out [B, T, H, D], lse [B, H, T]``.
    """
    b, t, h, d = q.shape
    s, kvh = _kv_shape(k, layer)
    group = h // kvh
    rows = t * group
    rp = _pow2(rows)
    bk = min(cfg.block_k_decode, s)
    nk = s // bk
    ns = _num_splits(cfg, b, kvh, nk)
    # rows ordered (token, head-in-group) so row r is token r // group
    qr = q.reshape(b, t, kvh, group, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, rows, d)
    qr = _pad_axis(qr, rp, 2)
    q_rows = _pad_info(TokenInfo(*(jnp.repeat(x, group, axis=1) for x in q_info)), rp)
    sched = _schedule(masks.tile_classes(q_rows, k_info, rp, bk, window), cfg.schedule)  # one q tile
    kernel = functools.partial(_fwd_kernel, kind=cfg.schedule, scale=scale, block_k=bk, window=window,
                               num_splits=ns)
    qrow = _specs_row(rp, lambda i, j, n: (n, 0))
    krow = _specs_row(s, lambda i, j, n: (n, 0))
    kvspec = _kv_spec(s, d, layer, lambda j: j)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(ns, kvh, b),
        in_specs=[*_schedule_specs(sched, lambda i, j, n: (n, 0, 0)),
                  pl.BlockSpec((_SQ, _SQ, rp, d), lambda i, j, n: (n, j, 0, 0)), qrow, qrow, qrow,
                  kvspec, kvspec, krow, krow, krow, krow],
        out_specs=[pl.BlockSpec((_SQ, _SQ, _SQ, rp, d), lambda i, j, n: (n, j, i, 0, 0)),
                   pl.BlockSpec((_SQ, _SQ, _SQ, rp), lambda i, j, n: (n, j, i, 0)),
                   pl.BlockSpec((_SQ, _SQ, _SQ, rp), lambda i, j, n: (n, j, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, ns, rp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, ns, rp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, ns, rp), jnp.float32)],
        compiler_params=compat.triton_compiler_params(cfg.num_warps_decode, cfg.num_stages_decode),
        interpret=_interpret(cfg), debug=cfg.debug,
        name="jaxdlm_flash_decode",
    )(*sched, qr, *_info_arrays(q_rows)[:3], k, v, *_info_arrays(k_info))
    # merge the splits
    m_max = jnp.max(m, axis=2, keepdims=True)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp(m - m_max)  # [B, KVH, ns, R]
    l_tot = jnp.sum(w * l, axis=2)
    seen = l_tot > 0
    out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(seen, l_tot, 1.0)[..., None]
    lse = jnp.where(seen, m_max[:, :, 0] + jnp.log(jnp.where(seen, l_tot, 1.0)), _BIG)
    out = out[:, :, :rows].reshape(b, kvh, t, group, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    lse = lse[:, :, :rows].reshape(b, kvh, t, group).transpose(0, 1, 3, 2).reshape(b, h, t)
    return out.astype(q.dtype), lse


def _train_bwd(q, k, v, q_info, k_info, out, lse, do, scale, window, cfg: KernelConfig):
    """Gradients for unpadded ``q, k, v`` (``lse [B, H, T]``); pads to the backward tiles internally."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    group = h // kvh
    bq, bk = min(cfg.block_q_bwd, _pow2(t)), min(cfg.block_k_bwd, _pow2(s))
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    nq, nk = tp // bq, sp // bk
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    qp, dop = _pad_axis(q, tp, 1), _pad_axis(do, tp, 1)
    lsep, deltap = _pad_axis(lse, tp, 2, constant_values=_BIG), _pad_axis(delta, tp, 2)
    kp, vp = _pad_axis(k, sp, 1), _pad_axis(v, sp, 1)
    qi, ki = _pad_info(q_info, tp), _pad_info(k_info, sp)
    cls = masks.tile_classes(qi, ki, bq, bk, window)
    q_sched, k_sched = _schedule(cls, cfg.schedule), _schedule(jnp.swapaxes(cls, 1, 2), cfg.schedule)
    qinfo_arrays, kinfo_arrays = _info_arrays(qi)[:3], _info_arrays(ki)
    params = compat.triton_compiler_params(cfg.num_warps_bwd, cfg.num_stages_bwd)

    qrow = _specs_row(bq, lambda i, j, n: (n, i))
    krow_all = _specs_row(sp, lambda i, j, n: (n, 0))
    kv_all = pl.BlockSpec((_SQ, sp, _SQ, d), lambda i, j, n: (n, 0, j // group, 0))
    qtile = pl.BlockSpec((_SQ, bq, _SQ, d), lambda i, j, n: (n, i, j, 0))
    rowstat = pl.BlockSpec((_SQ, _SQ, bq), lambda i, j, n: (n, j, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, kind=cfg.schedule, scale=scale, block_k=bk, window=window),
        grid=(nq, h, b),
        in_specs=[*_schedule_specs(q_sched, lambda i, j, n: (n, i, 0)), qtile, qtile, rowstat, rowstat,
                  qrow, qrow, qrow, kv_all, kv_all, krow_all, krow_all, krow_all, krow_all],
        out_specs=qtile,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=_interpret(cfg), debug=cfg.debug, name="jaxdlm_flash_bwd_dq",
    )(*q_sched, qp, dop, lsep, deltap, *qinfo_arrays, kp, vp, *kinfo_arrays)

    krow = _specs_row(bk, lambda i, j, n: (n, i))
    qrow_all = _specs_row(tp, lambda i, j, n: (n, 0))
    ktile = pl.BlockSpec((_SQ, bk, _SQ, d), lambda i, j, n: (n, i, j, 0))
    q_group = pl.BlockSpec((_SQ, tp, group, d), lambda i, j, n: (n, 0, j, 0))
    stat_group = pl.BlockSpec((_SQ, group, tp), lambda i, j, n: (n, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, kind=cfg.schedule, scale=scale, block_q=bq, group=group, window=window),
        grid=(nk, kvh, b),
        in_specs=[*_schedule_specs(k_sched, lambda i, j, n: (n, i, 0)), ktile, ktile,
                  krow, krow, krow, krow, q_group, q_group, stat_group, stat_group, qrow_all, qrow_all, qrow_all],
        out_specs=[ktile, ktile],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=_interpret(cfg), debug=cfg.debug, name="jaxdlm_flash_bwd_dkdv",
    )(*k_sched, kp, vp, *kinfo_arrays, qp, dop, lsep, deltap, *qinfo_arrays)
    return dq[:, :t], dk[:, :s], dv[:, :s]


def _key_tile(want: int, s: int, layer) -> int:
    """Key tile: ``want`` capped at the padded length; in place in a stacked cache (``layer`` set) the largest
    power of two ``<= want`` that divides ``S`` (the caller guarantees ``S % 16 == 0``), so nothing is padded."""
    bk = min(want, _pow2(s))
    if layer is not None:
        while s % bk:
            bk //= 2
    return bk


def _forward(q, k, v, q_info, k_info, scale, window, cfg: KernelConfig, layer=None):
    """Unpadded inputs -> ``out [B, T, H, D]``, ``lse [B, H, T]`` (decode kernel for ``T <= 32``).

    ``k, v``: ``[B, S, KVH, D]`` (padded here as needed) or a stacked cache ``[L, B, KVH, S, D]`` read in place
    at ``layer`` (never padded: ``S % 16 == 0``)."""
    b, t, h, d = q.shape
    s, kvh = _kv_shape(k, layer)
    axis = 1 if layer is None else 3
    if t <= cfg.decode_max_queries:
        wide = _pow2(t * (h // kvh)) > 32
        bk = _key_tile(cfg.block_k_decode_wide if wide else cfg.block_k_decode, s, layer)
        warps = cfg.num_warps_decode_wide if wide else cfg.num_warps_decode
        sp = _round_up(s, bk)
        return _decode_fwd(q, _pad_axis(k, sp, axis), _pad_axis(v, sp, axis), q_info, _pad_info(k_info, sp),
                           scale, window, dataclasses.replace(cfg, block_k_decode=bk, num_warps_decode=warps), layer)
    bq, bk = min(cfg.block_q, _pow2(t)), _key_tile(cfg.block_k, s, layer)
    tp, sp = _round_up(t, bq), _round_up(s, bk)
    out, lse = _train_fwd(_pad_axis(q, tp, 1), _pad_axis(k, sp, axis), _pad_axis(v, sp, axis), _pad_info(q_info, tp),
                          _pad_info(k_info, sp), scale, window, cfg, layer)
    return out[:, :t], lse[:, :, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_info, k_info, scale, window, cfg, layer):
    return _forward(q, k, v, q_info, k_info, scale, window, cfg, layer)[0]


def _attention_fwd(q, k, v, q_info, k_info, scale, window, cfg, layer):
    out, lse = _forward(q, k, v, q_info, k_info, scale, window, cfg, layer)
    return out, (q, k, v, q_info, k_info, out, lse)


def _attention_bwd(scale, window, cfg, layer, res, do):
    q, k, v, q_info, k_info, out, lse = res
    if layer is None:
        dq, dk, dv = _train_bwd(q, k, v, q_info, k_info, out, lse, do, scale, window, cfg)
    else:  # a stacked cache read in place: only layer `layer` receives a gradient
        seq_major = lambda x: jnp.swapaxes(x[layer], 1, 2)  # noqa: E731  [B, KVH, S, D] -> [B, S, KVH, D]
        dq, dk_l, dv_l = _train_bwd(q, seq_major(k), seq_major(v), q_info, k_info, out, lse, do, scale, window, cfg)
        dk = jnp.zeros_like(k).at[layer].set(jnp.swapaxes(dk_l, 1, 2))
        dv = jnp.zeros_like(v).at[layer].set(jnp.swapaxes(dv_l, 1, 2))
    zero_info = lambda info: jax.tree.map(  # noqa: E731
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0), info)
    return dq, dk, dv, zero_info(q_info), zero_info(k_info)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, q_info: TokenInfo, k_info: TokenInfo, *, scale: float, sliding_window=None,
              config: KernelConfig | None = None, layer: int | None = None):
    """Masked grouped-query attention with Pallas kernels (differentiable: ``custom_vjp``).

    Args:
      q: ``[B, T, H, D]`` queries; k, v: ``[B, S, KVH, D]`` with ``H % KVH == 0``; float32 or bfloat16.
        With ``layer`` (a Python int), k, v are a stacked heads-major KV cache ``[L, B, KVH, S, D]`` and the
        kernels read layer ``layer`` in place (no copy of it; when ``S`` is not a multiple of 16 or ``D`` not a
        power of two the layer is sliced out, transposed and padded instead).
      q_info, k_info: :class:`TokenInfo` with fields ``[B, T]`` / ``[B, S]``.
      scale: softmax scale.  sliding_window: optional Mistral-style window.
      config: :class:`KernelConfig` (tiles, warps, interpret, decode splits).

    Returns ``[B, T, H, D]`` in ``q.dtype``; a query that sees no key gets zeros (as the XLA path).
    """
    cfg = config or KernelConfig()
    if layer is not None:
        if k.ndim != 5 or k.shape != v.shape or not 0 <= layer < k.shape[0]:
            raise ValueError(f"layer={layer} needs stacked caches k, v [L, B, KVH, S, D] with 0 <= layer < L; "
                             f"got k {k.shape}, v {v.shape}")
        if k.shape[3] % 16 or _pow2(k.shape[4]) != k.shape[4]:
            k, v, layer = jnp.swapaxes(k[layer], 1, 2), jnp.swapaxes(v[layer], 1, 2), None
    kshape = k.shape if layer is None else (k.shape[1], k.shape[3], k.shape[2], k.shape[4])  # [B, S, KVH, D]
    if q.ndim != 4 or len(kshape) != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, H, D] and k, v [B, S, KVH, D]; got q {q.shape}, k {k.shape}, v {v.shape}")
    b, t, h, d = q.shape
    if kshape[0] != b or kshape[3] != d or h % kshape[2]:
        raise ValueError(f"k/v shape {kshape} does not fit q {q.shape}: need the same batch and head_dim and "
                         f"num_heads ({h}) divisible by num_kv_heads ({kshape[2]})")
    if q_info.pos.shape != (b, t) or k_info.pos.shape != (b, kshape[1]):
        raise ValueError(f"q_info / k_info shapes {q_info.pos.shape} / {k_info.pos.shape} must be "
                         f"{(b, t)} / {(b, kshape[1])}")
    dp = _pow2(d)
    if dp != d:  # zero head-dim padding changes neither scores nor the kept output columns
        q, k, v = (_pad_axis(x, dp, 3) for x in (q, k, v))
    window = None if sliding_window is None else int(sliding_window)
    q_info = TokenInfo(*(x.astype(jnp.int32) for x in q_info[:3]), q_info.valid.astype(bool))
    k_info = TokenInfo(*(x.astype(jnp.int32) for x in k_info[:3]), k_info.valid.astype(bool))
    out = _attention(q, k, v, q_info, k_info, float(scale), window, cfg, layer)
    return out[..., :d]


__all__ = ["KernelConfig", "attention"]
