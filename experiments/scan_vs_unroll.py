"""Is lax.scan over stacked layer weights what makes the 8B bs1 forward 3x the HBM floor? Pure JAX, no project code.

The same 8B-shaped matmuls (34 layers, bf16, batch 1) under five layer loops: lax.scan, fori_loop, a Python loop
with static indices into the stacked arrays, a Python loop over per-layer arrays, and the output head alone.
Run on an H100 on 2026-11-27 (jax 0.11.2): scan 16.69 ms, fori 16.56 ms, static index 5.95 ms (0.92x the
copy-bandwidth floor), list 6.15 ms; see experiments/results/decode_bandwidth_notes.md.

    python experiments/scan_vs_unroll.py          # 8B shapes (needs ~17 GB of device memory)
    python experiments/scan_vs_unroll.py tiny     # tiny shapes, any device
"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
TINY = len(sys.argv) > 1 and sys.argv[1] == "tiny"
L, H, Q, KV, I, V = (2, 64, 64, 32, 128, 512) if TINY else (34, 4096, 4096, 1024, 14336, 131072)
dt = jnp.bfloat16
k = jax.random.PRNGKey(0)
def rnd(shape, i): return (jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32) * 0.02).astype(dt)
stk = dict(qkv=rnd((L, H, Q + 2 * KV), 1), o=rnd((L, Q, H), 2), gu=rnd((L, H, 2 * I), 3), d=rnd((L, I, H), 4))
head = rnd((H, V), 5)
nbytes = sum(x.nbytes for x in jax.tree.leaves(stk)) + head.nbytes
def layer(h, w):
    a = h @ w["qkv"]; h = h + a[..., :Q] @ w["o"]
    g = h @ w["gu"]; h = h + (jax.nn.silu(g[..., :I]) * g[..., I:]) @ w["d"]
    return h
def proj(h): return jnp.matmul(h, head, preferred_element_type=jnp.float32).argmax(-1)
@jax.jit
def f_scan(stk, h):
    h, _ = jax.lax.scan(lambda h, w: (layer(h, w), None), h, stk); return proj(h)
@jax.jit
def f_index(stk, h):  # python loop, static index into stacked arrays
    for i in range(L): h = layer(h, jax.tree.map(lambda x: x[i], stk))
    return proj(h)
lst = [jax.tree.map(lambda x: x[i], stk) for i in range(L)]
@jax.jit
def f_list(lst, h):
    for w in lst: h = layer(h, w)
    return proj(h)
@jax.jit
def f_fori(stk, h):
    h = jax.lax.fori_loop(0, L, lambda i, h: layer(h, jax.tree.map(lambda x: x[i], stk)), h); return proj(h)
@jax.jit
def f_head_only(h): return proj(h)
def bench(f, *a, n=20):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
x = jnp.ones((1, 1, H), dt)
cp = jax.jit(lambda a: a + jnp.bfloat16(1)); big = jnp.ones((1 << 30,), dt)
tc = bench(cp, big); bw = 2 * big.nbytes / tc
print(f"weights {nbytes/1e9:.2f} GB  copy bw {bw/1e12:.2f} TB/s  floor {1e3*nbytes/bw:.2f} ms", flush=True)
for name, f, a in [("scan", f_scan, (stk, x)), ("static_index", f_index, (stk, x)), ("list", f_list, (lst, x)),
                   ("fori", f_fori, (stk, x)), ("head_only", f_head_only, (x,))]:
    try:
        t = bench(f, *a); print(f"{name:13s} {1e3*t:8.2f} ms  {t/(nbytes/bw):5.2f}x floor", flush=True)
    except Exception as e:
        print(name, "failed", repr(e)[:200], flush=True)
x32 = jnp.ones((1, 32, H), dt)
for name, f, a in [("scan_t32", f_scan, (stk, x32)), ("list_t32", f_list, (lst, x32))]:
    t = bench(f, *a); print(f"{name:13s} {1e3*t:8.2f} ms", flush=True)
