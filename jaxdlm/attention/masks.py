"""Attention masks as predicates on per-token metadata: the single source of truth for every backend.

Every query and key token carries a :class:`TokenInfo`: its RoPE position, a block id, a stream flag
(``CLEAN`` = causal / clean tokens, ``NOISY`` = tokens of a diffusion block) and, for keys, a validity
flag.  One rule decides every pass of docs/attention.md:

* a CLEAN query sees CLEAN keys at positions ``<=`` its own (plain causal attention, the AR model);
* a NOISY query sees NOISY keys of its own block (bidirectional inside the block) and CLEAN keys of
  strictly earlier blocks (the clean context);
* invalid keys (unused cache slots, padding) are never seen.

The two-stream training layout ``[x_t | x_0]`` is NOISY tokens then CLEAN tokens with block ids
``pos // block_size``; a denoise pass over a KV cache is NOISY queries in block 1 over CLEAN cache
keys in block 0; prefill / commit / verify / AR steps are CLEAN queries over CLEAN keys.  Kernels
evaluate :func:`allowed` on tiles; the XLA path evaluates it densely.
"""

from __future__ import annotations

import math

from typing import NamedTuple

import jax.numpy as jnp

CLEAN = 0
NOISY = 1

# A block id after every real block (real ids are ``pos // block_size``, far below 2**30, which still fits
# int32 with room to spare): NOISY queries see CLEAN keys of strictly earlier blocks only, so CLEAN keys in
# this block are never their context (the fully bidirectional two-stream layout).
AFTER_EVERY_BLOCK = 2**30


class TokenInfo(NamedTuple):
    """Per-token mask metadata, each field ``int32 [B, N]`` (``valid``: bool ``[B, N]``)."""

    pos: jnp.ndarray
    block: jnp.ndarray
    stream: jnp.ndarray
    valid: jnp.ndarray

    @property
    def shape(self):
        return self.pos.shape


def allowed(q: TokenInfo, k: TokenInfo, sliding_window: int | None = None) -> jnp.ndarray:
    """Whether each query may attend to each key: bool ``[B, T, S]`` for ``q [B, T]``, ``k [B, S]``.

    ``sliding_window`` (Mistral-style) additionally hides keys ``window`` or more positions behind the query.
    """
    qpos_BxTx1, qblk_BxTx1, qstream_BxTx1 = (x[:, :, None] for x in (q.pos, q.block, q.stream))
    kpos_Bx1xS, kblk_Bx1xS, kstream_Bx1xS, kvalid_Bx1xS = (x[:, None, :] for x in (k.pos, k.block, k.stream, k.valid))
    causal_BxTxS = (kstream_Bx1xS == CLEAN) & (kpos_Bx1xS <= qpos_BxTx1)
    noisy_BxTxS = (((kstream_Bx1xS == NOISY) & (kblk_Bx1xS == qblk_BxTx1))
                   | ((kstream_Bx1xS == CLEAN) & (kblk_Bx1xS < qblk_BxTx1)))
    ok_BxTxS = jnp.where(qstream_BxTx1 == CLEAN, causal_BxTxS, noisy_BxTxS) & kvalid_Bx1xS
    if sliding_window is not None:
        ok_BxTxS = ok_BxTxS & (qpos_BxTx1 - kpos_Bx1xS < sliding_window)
    return ok_BxTxS


def _full(shape, value, dtype=jnp.int32):
    return jnp.full(shape, value, dtype=dtype)


def sequence_info(positions: jnp.ndarray, kind: str, block_size: int = 32, valid=None) -> TokenInfo:
    """Metadata for a whole sequence attended to without a cache.

    ``kind``: ``"causal"`` (AR), ``"bidirectional"`` (every token sees every valid token) or
    ``"block_causal"`` (NOISY tokens bidirectional inside blocks of ``block_size``; they see nothing
    outside their block - use :func:`two_stream_info` for clean context).
    """
    shape = positions.shape
    valid = jnp.ones(shape, bool) if valid is None else valid
    if kind == "causal":
        return TokenInfo(positions, _full(shape, 0), _full(shape, CLEAN), valid)
    if kind == "bidirectional":
        return TokenInfo(positions, _full(shape, 0), _full(shape, NOISY), valid)
    if kind == "block_causal":
        return TokenInfo(positions, positions // block_size, _full(shape, NOISY), valid)
    raise ValueError(f"kind={kind!r} is not a sequence mask kind; expected 'causal', 'bidirectional' or 'block_causal'")


def two_stream_info(batch: int, length: int, block_size: int, *, bidirectional: bool = False) -> TokenInfo:
    """Metadata for the training layout ``[x_t | x_0]`` (2L tokens, both halves at positions 0..L-1).

    With ``bidirectional=True`` the noisy half sees all of itself and no clean keys (a fully
    bidirectional diffusion model, for comparison studies).
    """
    pos = jnp.arange(length, dtype=jnp.int32)
    if bidirectional:
        noisy_block = _full((length,), 0)
        clean_block = _full((length,), AFTER_EVERY_BLOCK)
    else:
        noisy_block = clean_block = pos // block_size
    info = TokenInfo(
        pos=jnp.concatenate([pos, pos]),
        block=jnp.concatenate([noisy_block, clean_block]),
        stream=jnp.concatenate([_full((length,), NOISY), _full((length,), CLEAN)]),
        valid=jnp.ones((2 * length,), bool),
    )
    return TokenInfo(*(jnp.broadcast_to(x, (batch, 2 * length)) for x in info))


def cache_query_info(length: jnp.ndarray, num_new: int, kind: str) -> TokenInfo:
    """Metadata of ``num_new`` new tokens placed right after each row's cache (``length [B]``).

    ``kind``: ``"causal"`` (prefill / commit / verify / AR step) or ``"denoise"`` (a diffusion block
    that sees the cache and itself bidirectionally).
    """
    pos = length[:, None].astype(jnp.int32) + jnp.arange(num_new, dtype=jnp.int32)[None, :]
    shape = pos.shape
    valid = jnp.ones(shape, bool)
    if kind == "causal":
        return TokenInfo(pos, _full(shape, 0), _full(shape, CLEAN), valid)
    if kind == "denoise":
        return TokenInfo(pos, _full(shape, 1), _full(shape, NOISY), valid)
    raise ValueError(f"kind={kind!r} is not a cached pass kind; expected 'causal' or 'denoise'")


def cache_key_info(length: jnp.ndarray, max_len: int, num_new: int, kind: str) -> TokenInfo:
    """Metadata of the cache slots ``0..max_len-1`` after ``num_new`` tokens were written at ``length``.

    Slot ``s`` holds position ``s``.  Slots below ``length`` are the committed cache (CLEAN, block 0);
    slots ``length .. length+num_new-1`` hold the new tokens (CLEAN for causal passes, NOISY block 1 for
    denoise passes); later slots are invalid.
    """
    slot = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    length = length[:, None].astype(jnp.int32)
    shape = (length.shape[0], max_len)
    is_new = slot >= length
    valid = slot < length + num_new
    pos = jnp.broadcast_to(slot, shape)
    if kind == "causal":
        return TokenInfo(pos, _full(shape, 0), _full(shape, CLEAN), valid)
    if kind == "denoise":
        return TokenInfo(pos, is_new.astype(jnp.int32), is_new.astype(jnp.int32) * NOISY, valid)
    raise ValueError(f"kind={kind!r} is not a cached pass kind; expected 'causal' or 'denoise'")



def quadratic_block(num_new: int) -> int:
    """The block length ``N`` of a quadratic pass of ``num_new = N + N*N`` tokens (``ValueError`` otherwise)."""
    n = (math.isqrt(1 + 4 * num_new) - 1) // 2
    if n < 1 or n + n * n != num_new:
        raise ValueError(f"a quadratic pass has N + N*N tokens for a block length N; {num_new} is not of that form")
    return n


def quadratic_info(length: jnp.ndarray, block: int, max_len: int) -> tuple[TokenInfo, TokenInfo]:
    """Query and key metadata of quadratic self-speculation's layout for cache lengths ``length [B]``.

    Queries: ``N + N*N`` tokens ``[d_0..d_{N-1}, group_0 masks, ..., group_{N-1} masks]`` (``N = block``, ``c``
    the row's cache length): ``d_j`` is CLEAN at position ``c+j`` in block ``j+1``; group ``j``'s ``N`` masks are
    NOISY block ``j+2`` at positions ``c+j+1..c+j+N``, so by :func:`allowed` they see the cache, ``d_0..d_j`` and
    their own group.  Keys: the ``max_len`` cache slots after the pass wrote all its tokens at slots ``c..``
    (the masks' slots are scratch that keeps their own metadata); later slots are invalid.
    """
    b = length.shape[0]
    c = length[:, None].astype(jnp.int32)
    j = jnp.arange(block, dtype=jnp.int32)
    d_pos = c + j[None, :]
    m_pos = (c[:, :, None] + j[None, :, None] + 1 + j[None, None, :]).reshape(b, block * block)
    m_block = jnp.broadcast_to(jnp.repeat(j + 2, block)[None, :], (b, block * block))
    q = TokenInfo(
        pos=jnp.concatenate([d_pos, m_pos], axis=1),
        block=jnp.concatenate([jnp.broadcast_to(j[None, :] + 1, (b, block)), m_block], axis=1),
        stream=jnp.concatenate([_full((b, block), CLEAN), _full((b, block * block), NOISY)], axis=1),
        valid=jnp.ones((b, block + block * block), bool),
    )
    slot = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None, :], (b, max_len))
    idx = jnp.clip(slot - c, 0, block + block * block - 1)  # which new token a slot >= c holds
    new = slot >= c
    pick = lambda x: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    k = TokenInfo(pos=jnp.where(new, pick(q.pos), slot), block=jnp.where(new, pick(q.block), 0),
                  stream=jnp.where(new, pick(q.stream), CLEAN), valid=slot < c + block + block * block)
    return q, k

# ---------------------------------------------------------------------------------------------------
# tile bounds for kernels (a conservative summary of `allowed` over tiles)

TILE_SKIP, TILE_PARTIAL, TILE_FULL = 0, 1, 2


def _tile_stats(info: TokenInfo, tile: int):
    b, n = info.pos.shape
    if n % tile:
        raise ValueError(f"sequence length {n} is not a multiple of the tile {tile}; pad it first")
    r = lambda x: x.reshape(b, n // tile, tile)  # noqa: E731
    pos, blk, stream, valid = r(info.pos), r(info.block), r(info.stream), r(info.valid)
    return dict(
        pos_min=pos.min(-1), pos_max=pos.max(-1), blk_min=blk.min(-1), blk_max=blk.max(-1),
        any_clean=(stream == CLEAN).any(-1), all_clean=(stream == CLEAN).all(-1),
        any_noisy=(stream == NOISY).any(-1), all_noisy=(stream == NOISY).all(-1),
        any_notclean=(stream != CLEAN).any(-1), all_notclean=(stream != CLEAN).all(-1),
        any_valid=valid.any(-1), all_valid=valid.all(-1))


def tile_classes(q: TokenInfo, k: TokenInfo, tile_q: int, tile_k: int,
                 sliding_window: int | None = None) -> jnp.ndarray:
    """Classify each (query tile, key tile) pair from per-tile min/max bounds: int32 ``[B, T/tq, S/tk]``.

    ``TILE_SKIP``: no pair of the tile is :func:`allowed`; ``TILE_FULL``: every pair is; otherwise
    ``TILE_PARTIAL`` (the kernel evaluates :func:`allowed` per element).  The bounds are conservative
    interval arithmetic over :func:`allowed`'s rule (O(T/tq * S/tk) work, no ``[T, S]`` mask): a tile
    is only skipped when no pair can be allowed and only full when every pair must be, so a kernel that
    masks PARTIAL tiles with :func:`allowed` is exact whatever the metadata.  ``T``, ``S`` must be
    multiples of the tiles.
    """
    a = {n: x[:, :, None] for n, x in _tile_stats(q, tile_q).items()}
    c = {n: x[:, None, :] for n, x in _tile_stats(k, tile_k).items()}
    # some pair may be allowed (upper bound of the predicate)
    clean_q = a["any_clean"] & c["any_clean"] & (c["pos_min"] <= a["pos_max"])
    noisy_same = a["any_notclean"] & c["any_noisy"] & (c["blk_min"] <= a["blk_max"]) & (a["blk_min"] <= c["blk_max"])
    noisy_ctx = a["any_notclean"] & c["any_clean"] & (c["blk_min"] < a["blk_max"])
    may = c["any_valid"] & (clean_q | noisy_same | noisy_ctx)
    # every pair is allowed (lower bound)
    one_block = (a["blk_min"] == a["blk_max"]) & (c["blk_min"] == c["blk_max"]) & (a["blk_min"] == c["blk_min"])
    must_clean = a["all_clean"] & c["all_clean"] & (c["pos_max"] <= a["pos_min"])
    must_noisy = a["all_notclean"] & ((c["all_noisy"] & one_block) | (c["all_clean"] & (c["blk_max"] < a["blk_min"])))
    must = c["all_valid"] & (must_clean | must_noisy)
    if sliding_window is not None:
        may = may & (a["pos_min"] - c["pos_max"] < sliding_window)
        must = must & (a["pos_max"] - c["pos_min"] < sliding_window)
    return jnp.where(must, TILE_FULL, jnp.where(may, TILE_PARTIAL, TILE_SKIP)).astype(jnp.int32)
