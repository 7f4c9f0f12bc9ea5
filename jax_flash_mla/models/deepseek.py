"""A small DeepSeek-V3-style decoder whose decode step runs MLA through jax-flash-mla.

Attention is MLA as DeepSeek-V3 defines it: a low-rank query (q_lora_rank, RMSNorm), a
compressed KV latent c_kv (kv_lora_rank = 512, RMSNorm) plus one rotary key k_pe shared by
all heads (qk_rope_head_dim = 64), per-head up-projections to qk_nope_head_dim = 128 keys
and v_head_dim = 128 values. The cache keeps [c_kv, k_pe] (576 numbers a token), in bf16 or
float32, or in DeepSeek-V3.2's 656-byte FP8 layout (a uint8 pool: write_latents quantizes, the
kernel dequantizes as it reads).

Decode uses the weight-absorbed form: W_UK folds into the query (q_nope @ W_UK gives a
512-wide query against c_kv), so attention is MQA over the 576-wide latent, the kernel's
problem; W_UV is applied to the kernel's 512-wide output. Prefill uses plain jnp attention
(non-absorbed) and writes the latents. `naive_logits` runs the non-absorbed model over a
whole sequence: the reference the absorbed, paged, kernel path is tested against.

The MLP is a dense SwiGLU (no mixture of experts): only the attention path matters here.
Weights are random (no downloads).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash_mla
from jax_flash_mla import cache as paged


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 1024
    hidden: int = 512
    num_layers: int = 2
    num_heads: int = 16
    q_lora_rank: int = 256
    kv_lora_rank: int = 512  # the kernel's dv
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # kv_lora_rank + qk_rope_head_dim = the kernel's d (576)
    v_head_dim: int = 128
    mlp_hidden: int = 1024
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


def init_params(config: Config, key) -> dict:
    """Random weights, scaled by 1/sqrt(fan_in)."""
    c = config
    shapes = {
        "w_dq": (c.hidden, c.q_lora_rank),
        "w_uq": (c.q_lora_rank, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim),
        "w_dkv": (c.hidden, c.kv_lora_rank + c.qk_rope_head_dim),
        "w_uk": (c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim),
        "w_uv": (c.kv_lora_rank, c.num_heads, c.v_head_dim),
        "w_o": (c.num_heads, c.v_head_dim, c.hidden),
        "w_gate": (c.hidden, c.mlp_hidden),
        "w_up": (c.hidden, c.mlp_hidden),
        "w_down": (c.mlp_hidden, c.hidden),
    }
    fan_in = {"w_uq": c.q_lora_rank, "w_uk": c.kv_lora_rank, "w_uv": c.kv_lora_rank,
              "w_o": c.num_heads * c.v_head_dim}
    layers = []
    for layer_key in jax.random.split(key, c.num_layers):
        keys = dict(zip(shapes, jax.random.split(layer_key, len(shapes))))
        layer = {name: jax.random.normal(keys[name], shape, jnp.float32)
                 / math.sqrt(fan_in.get(name, shape[0])) for name, shape in shapes.items()}
        for norm, size in (("q_norm", c.q_lora_rank), ("kv_norm", c.kv_lora_rank),
                           ("attn_norm", c.hidden), ("mlp_norm", c.hidden)):
            layer[norm] = jnp.ones((size,), jnp.float32)
        layers.append(layer)
    embed_key, head_key = jax.random.split(jax.random.fold_in(key, 1))
    return {
        "embed": jax.random.normal(embed_key, (c.vocab_size, c.hidden), jnp.float32),
        "head": jax.random.normal(head_key, (c.hidden, c.vocab_size)) / math.sqrt(c.hidden),
        "final_norm": jnp.ones((c.hidden,), jnp.float32),
        "layers": layers,
    }


def rms_norm(x, weight, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, theta):
    """Rotary embedding on the last axis of x [..., T, (heads,) rope_dim] at positions [..., T]."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    if x.ndim == angles.ndim + 1:  # a heads axis between T and rope_dim
        angles = angles[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _queries(layer, h, positions, c: Config):
    """q_nope [.., T, H, nope] and rotated q_pe [.., T, H, rope]."""
    c_q = rms_norm(h @ layer["w_dq"], layer["q_norm"], c.rms_eps)
    q = jnp.einsum("...r,rhd->...hd", c_q, layer["w_uq"])
    q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, rope(q_pe, positions, c.rope_theta)


def latents(layer, h, positions, c: Config):
    """The cached latent of each token: [RMSNorm(c_kv), RoPE(k_pe)], [.., T, 576]."""
    kv = h @ layer["w_dkv"]
    c_kv = rms_norm(kv[..., :c.kv_lora_rank], layer["kv_norm"], c.rms_eps)
    k_pe = rope(kv[..., c.kv_lora_rank:], positions, c.rope_theta)
    return jnp.concatenate([c_kv, k_pe], axis=-1)


def _mlp(layer, h, c: Config):
    x = rms_norm(h, layer["mlp_norm"], c.rms_eps)
    return (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]


def _naive_attention(layer, h, positions, c: Config):
    """Non-absorbed causal MHA over one whole sequence h [T, hidden]."""
    q_nope, q_pe = _queries(layer, h, positions, c)
    latent = latents(layer, h, positions, c)
    c_kv, k_pe = latent[:, :c.kv_lora_rank], latent[:, c.kv_lora_rank:]
    k_nope = jnp.einsum("tr,rhd->thd", c_kv, layer["w_uk"])
    v = jnp.einsum("tr,rhd->thd", c_kv, layer["w_uv"])
    scores = (jnp.einsum("qhd,khd->hqk", q_nope, k_nope)
              + jnp.einsum("qhd,kd->hqk", q_pe, k_pe)) * c.softmax_scale
    t = h.shape[0]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)
    return jnp.einsum("qhd,hdo->qo", out, layer["w_o"]), latent


def naive_logits(params, tokens, c: Config):
    """Logits of every position of one sequence tokens [T], non-absorbed, float32."""
    h = params["embed"][tokens]
    positions = jnp.arange(tokens.shape[0])
    for layer in params["layers"]:
        attn, _ = _naive_attention(layer, rms_norm(h, layer["attn_norm"], c.rms_eps), positions, c)
        h = h + attn
        h = h + _mlp(layer, h, c)
    return rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]


def _check_cache_matches(params, cache: paged.PagedLatentCache, c: Config) -> None:
    """The cache has one pool per layer of params, each token's latent 576 (latent_dim) wide."""
    paged.check_cache_layout(cache)
    layers = len(params["layers"])
    if cache.pool.shape[0] != layers:
        raise ValueError(f"cache: expected {layers} layers (one per layer of params), got "
                         f"{cache.pool.shape[0]} (pool shape {tuple(cache.pool.shape)})")
    if cache.head_dim != c.latent_dim:
        raise ValueError(f"cache: expected head_dim {c.latent_dim} (kv_lora_rank + "
                         f"qk_rope_head_dim of the config), got {cache.head_dim}")


def _check_prompts(cache: paged.PagedLatentCache, prompts, c: Config) -> None:
    """One prompt per request, of token ids in the vocabulary, each on an empty request with
    room for it, all together within the free pages; on the host (prefill syncs anyway)."""
    requests = cache.seqlens.shape[0]
    if len(prompts) != requests:
        raise ValueError(f"prompts: expected {requests} prompts (one per request of the cache, "
                         f"empty for an idle one), got {len(prompts)}")
    seqlens = np.asarray(cache.seqlens)
    page = cache.page_block_size
    pages_needed = 0
    for r, prompt in enumerate(prompts):
        tokens = np.asarray(prompt)
        if tokens.size and (tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer)):
            raise TypeError(f"prompts[{r}]: expected a sequence of int token ids, got "
                            f"{tokens.dtype} of shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
            raise ValueError(f"prompts[{r}]: expected token ids in [0, {c.vocab_size}) (the "
                             f"config's vocab_size), got {tokens.min()}..{tokens.max()}")
        if tokens.size and seqlens[r]:
            raise ValueError(f"prompts[{r}]: expected an empty request (prefill starts one; free "
                             f"it first), got request {r} holding {seqlens[r]} tokens")
        if tokens.size > cache.capacity_per_request:
            raise ValueError(f"prompts[{r}]: expected at most {cache.capacity_per_request} "
                             f"tokens (the cache's max_blocks_per_seq * page_block_size), got "
                             f"{tokens.size}")
        pages_needed += -(-tokens.size // page)
    pages_free = int(np.sum(np.asarray(cache.page_owner) == paged.NO_PAGE))
    if pages_needed > pages_free:
        raise ValueError(f"prompts: expected at most {pages_free} pages of {page} tokens in all "
                         f"(the cache's free pages), got prompts needing {pages_needed}")


def prefill(params, cache: paged.PagedLatentCache, prompts, c: Config):
    """Runs each prompt (a list of token ids, one per request; empty for idle requests, which
    must be empty in the cache otherwise) through the naive path and writes its latents into
    the cache. Returns the cache and the last logits of each request (of token 0 for an idle
    one). Not jittable: it checks the prompts against the cache on the host first."""
    _check_cache_matches(params, cache, c)
    _check_prompts(cache, prompts, c)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache, ok = paged.reserve(cache, lengths)
    paged.check(ok, "prefill: reserve")
    longest = max(1, max(len(p) for p in prompts))
    last_logits = []
    layer_latents = [[] for _ in params["layers"]]
    for prompt in prompts:
        tokens = jnp.asarray(list(prompt) + [0] * (longest - len(prompt)), jnp.int32)
        h = params["embed"][tokens]
        positions = jnp.arange(longest)
        for i, layer in enumerate(params["layers"]):
            attn, latent = _naive_attention(layer, rms_norm(h, layer["attn_norm"], c.rms_eps),
                                            positions, c)
            layer_latents[i].append(latent)
            h = h + attn
            h = h + _mlp(layer, h, c)
        logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
        last_logits.append(logits[max(len(prompt) - 1, 0)])
    for i, per_request in enumerate(layer_latents):
        cache, ok = paged.write_latents(cache, i, jnp.stack(per_request), lengths)
        paged.check(ok, "prefill: write_latents")
    cache, ok = paged.advance(cache, lengths)
    paged.check(ok, "prefill: advance")
    return cache, jnp.stack(last_logits)


def check_step_tokens(tokens, active, requests: int) -> None:
    """A decode step's tokens [R] int32 and active [R] bool, R the cache's requests (shared with
    the V3.2 model, whose cache differs)."""
    for name, x, kind in (("tokens", tokens, "int32"), ("active", active, "bool")):
        if not hasattr(x, "dtype"):
            raise TypeError(f"{name}: expected a {kind} array [{requests}], got "
                            f"{type(x).__name__}")
        if np.dtype(x.dtype) != np.dtype(kind):
            raise TypeError(f"{name}: expected dtype {kind}, got {np.dtype(x.dtype).name}")
        if tuple(x.shape) != (requests,):
            raise ValueError(f"{name}: expected shape ({requests},) (one per request of the "
                             f"cache), got {tuple(x.shape)}")


def _check_step_inputs(params, cache: paged.PagedLatentCache, tokens, active, c: Config,
                       head_shards) -> None:
    _check_cache_matches(params, cache, c)
    check_step_tokens(tokens, active, cache.seqlens.shape[0])
    if (isinstance(head_shards, bool) or not isinstance(head_shards, int) or head_shards < 1
            or c.num_heads % head_shards):
        raise ValueError(f"head_shards: expected a positive int dividing the config's "
                         f"num_heads {c.num_heads}, got {head_shards!r}")


def decode_step(params, cache: paged.PagedLatentCache, tokens, active, c: Config,
                head_shards: int = 1):
    """One token for every active request: tokens [R] int32, active [R] bool.

    Returns (cache, logits [R, vocab], ok [R]): the new tokens' latents are written (in place
    when the cache is donated), attention runs through the kernel over the paged cache with one
    schedule shared by every layer. `head_shards`: devices the heads are split over (tensor
    parallel); the schedule is sized for the heads one device computes (sized for all of them,
    128 heads over 8 GPUs would fill half of each GPU's SMs).

    All-or-nothing, like `paged.reserve`: when an active request's token is outside the
    vocabulary or the cache cannot take a token for every active request, every ok flag is
    False, every logit NaN, and the cache comes back unchanged (nothing reserved, written or
    advanced)."""
    _check_step_inputs(params, cache, tokens, active, c, head_shards)
    in_vocabulary = (tokens >= 0) & (tokens < c.vocab_size)
    tokens_ok = jnp.all(in_vocabulary | ~active)
    counts = (active & tokens_ok).astype(jnp.int32)
    cache, reserved = paged.reserve(cache, counts)
    ok = reserved & tokens_ok
    counts = jnp.where(ok, counts, 0)
    positions = cache.seqlens  # the new token's position
    seqlens_after = cache.seqlens + counts
    metadata = jax_flash_mla.get_mla_metadata(seqlens_after, c.num_heads // head_shards, 1)
    h = params["embed"][jnp.where(in_vocabulary, tokens, 0)]
    for i, layer in enumerate(params["layers"]):
        x = rms_norm(h, layer["attn_norm"], c.rms_eps)
        # After a reserve that succeeded every write does; and since whether one does depends
        # on the positions, not on the layer, no request is ever written in some layers only.
        cache, written = paged.write_latents(cache, i, latents(layer, x, positions, c)[:, None],
                                             counts)
        ok = ok & written
        q_nope, q_pe = _queries(layer, x, positions, c)                   # [R, H, 128], [R, H, 64]
        q_latent = jnp.einsum("bhd,rhd->bhr", q_nope, layer["w_uk"])      # W_UK absorbed
        q = jnp.concatenate([q_latent, q_pe], axis=-1)[:, None].astype(jnp.bfloat16)
        # A bf16 pool, or the FP8 one the kernel dequantizes as it reads.
        pool = cache.pool[i] if cache.is_fp8 else cache.pool[i].astype(jnp.bfloat16)
        out, _ = jax_flash_mla.flash_mla_with_kvcache(
            q, pool, cache.block_table, seqlens_after, c.kv_lora_rank, metadata,
            softmax_scale=c.softmax_scale, is_fp8_kvcache=cache.is_fp8)
        o = jnp.einsum("bhr,rhd->bhd", out[:, 0].astype(jnp.float32), layer["w_uv"])  # W_UV
        h = h + jnp.einsum("bhd,hdo->bo", o, layer["w_o"])
        h = h + _mlp(layer, h, c)
    logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
    cache, advanced = paged.advance(cache, jnp.where(ok, counts, 0))
    ok = ok & advanced
    return cache, jnp.where(ok[:, None], logits, jnp.nan), ok
