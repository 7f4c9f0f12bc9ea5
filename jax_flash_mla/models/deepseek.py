"""A small DeepSeek-V3-style decoder whose decode step runs MLA through jax-flash-mla.

Attention is MLA as DeepSeek-V3 defines it: a low-rank query (q_lora_rank, RMSNorm), a
compressed KV latent c_kv (kv_lora_rank = 512, RMSNorm) plus one rotary key k_pe shared by
all heads (qk_rope_head_dim = 64), per-head up-projections to qk_nope_head_dim = 128 keys
and v_head_dim = 128 values. The cache keeps [c_kv, k_pe] (576 numbers a token).

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


def prefill(params, cache: paged.PagedLatentCache, prompts, c: Config):
    """Runs each prompt (a list of token arrays, one per request; empty for idle requests)
    through the naive path and writes its latents into the cache. Returns the cache and the
    last logits of each request."""
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    cache, ok = paged.reserve(cache, lengths)
    paged.check(ok, "prefill: reserve")
    longest = max(len(p) for p in prompts)
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
    return paged.advance(cache, lengths), jnp.stack(last_logits)


def decode_step(params, cache: paged.PagedLatentCache, tokens, active, c: Config,
                head_shards: int = 1):
    """One token for every active request: tokens [R] int32, active [R] bool.

    Returns (cache, logits [R, vocab], ok): the new tokens' latents are written (in place when
    the cache is donated), attention runs through the kernel over the paged cache with one
    schedule shared by every layer. `head_shards`: devices the heads are split over (tensor
    parallel); the schedule is sized for the heads one device computes (sized for all of them,
    128 heads over 8 GPUs would fill half of each GPU's SMs)."""
    counts = active.astype(jnp.int32)
    cache, ok = paged.reserve(cache, counts)
    positions = cache.seqlens  # the new token's position
    seqlens_after = cache.seqlens + counts
    metadata = jax_flash_mla.get_mla_metadata(seqlens_after, c.num_heads // head_shards, 1)
    h = params["embed"][tokens]
    for i, layer in enumerate(params["layers"]):
        x = rms_norm(h, layer["attn_norm"], c.rms_eps)
        cache, written = paged.write_latents(cache, i, latents(layer, x, positions, c)[:, None],
                                             counts)
        ok = ok & written
        q_nope, q_pe = _queries(layer, x, positions, c)                   # [R, H, 128], [R, H, 64]
        q_latent = jnp.einsum("bhd,rhd->bhr", q_nope, layer["w_uk"])      # W_UK absorbed
        q = jnp.concatenate([q_latent, q_pe], axis=-1)[:, None].astype(jnp.bfloat16)
        out, _ = jax_flash_mla.flash_mla_with_kvcache(
            q, cache.pool[i].astype(jnp.bfloat16), cache.block_table, seqlens_after,
            c.kv_lora_rank, metadata, softmax_scale=c.softmax_scale)
        o = jnp.einsum("bhr,rhd->bhd", out[:, 0].astype(jnp.float32), layer["w_uv"])  # W_UV
        h = h + jnp.einsum("bhd,hdo->bo", o, layer["w_o"])
        h = h + _mlp(layer, h, c)
    logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
    return paged.advance(cache, counts), logits, ok
