"""The DeepSeek-V3-style model of models/deepseek.py with DeepSeek-V3.2's sparse attention (DSA):
a lightning indexer picks, per query token, the top-k cached tokens, and MLA attends over those
only, through the sparse kernel and the 656-byte FP8 latent cache.

The indexer, as V3.2 defines it (DeepSeek-V3.2-Exp, inference/model.py `Indexer`): a few small
index heads whose queries come from the query's low-rank latent c_q (q_lora_rank) and one index
key per token from the hidden state (LayerNorm, then RoPE on its first index_rope_head_dim
columns, like the queries), and per-head weights w from the hidden state. Token t scores

    I(t) = sum_h w_h * ReLU(q_h . k_t),   w = (x @ W_w) / sqrt(index_n_heads * index_head_dim)

and a query attends over the top-k tokens it may see. V3.2 rotates q and k by a Hadamard
matrix and keeps the index keys in FP8; the rotation is orthogonal (q . k is unchanged) and only
spreads outliers before that quantization, so with bf16 index keys there is nothing for it to
do and it is left out.

Cache: a SparseCache holds the FP8 latent cache (cache.init_cache with dtype uint8, quantized
on write) and beside it one bf16 index key per token per layer, in a pool of the same pages:
token t of a request has its latent and its index keys at the same (page, offset), so one block
table and one set of lengths serve both.

Decode is deepseek.decode_step's absorbed MLA (W_UK folded into the query, W_UV applied to the
kernel's 512-wide output) with attention over the indexer's picks: the selected positions go
through the request's block table to pool indices (page_id * page + offset) for
flash_mla_with_kvcache(..., indices=...). Prefill is the same absorbed MLA on the sparse prefill
kernel (flash_mla_sparse_fwd), the batch's prompts concatenated into one call a layer, each
token over the top-k of its prompt's tokens up to it; it writes the latents and the index keys.
`naive_forward` is a plain-jnp, non-absorbed path over one whole sequence with the same sparse
selection: the reference both are tested against. It attends over its latents as the cache stores them (quantized to FP8 and read
back) and scores with index keys rounded to bf16, so that what it is compared with differs by
the kernel path's bf16 queries and outputs, not by the storage both share.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash_mla
from jax_flash_mla import cache as paged
from jax_flash_mla import fp8_cache
from jax_flash_mla.models import deepseek
from jax_flash_mla.models.deepseek import rms_norm, rope

INDEX_KEY_DTYPE = jnp.bfloat16
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Config(deepseek.Config):
    # V3.2 has 64 index heads of 128 columns (64 of them rotary) and top-k 2048; these are
    # scaled down with the rest of the model.
    index_n_heads: int = 4
    index_head_dim: int = 64
    index_rope_head_dim: int = 32
    index_topk: int = 32

    @property
    def index_weight_scale(self) -> float:
        return 1.0 / math.sqrt(self.index_n_heads * self.index_head_dim)


def init_params(config: Config, key) -> dict:
    """deepseek.init_params plus each layer's indexer: random, scaled by 1/sqrt(fan_in)."""
    c = config
    params = deepseek.init_params(c, key)
    shapes = {
        "index_wq": (c.q_lora_rank, c.index_n_heads, c.index_head_dim),
        "index_wk": (c.hidden, c.index_head_dim),
        "index_weights_proj": (c.hidden, c.index_n_heads),
    }
    layer_keys = jax.random.split(jax.random.fold_in(key, 2), c.num_layers)
    for layer, layer_key in zip(params["layers"], layer_keys):
        keys = dict(zip(shapes, jax.random.split(layer_key, len(shapes))))
        for name, shape in shapes.items():
            layer[name] = jax.random.normal(keys[name], shape, jnp.float32) / math.sqrt(shape[0])
        layer["index_k_norm"] = jnp.ones((c.index_head_dim,), jnp.float32)
        layer["index_k_bias"] = jnp.zeros((c.index_head_dim,), jnp.float32)
    return params


class SparseCache(NamedTuple):
    latents: paged.PagedLatentCache  # the FP8 latents and the pages' bookkeeping
    index_keys: jax.Array  # [num_layers, num_blocks, page_block_size, 1, index_head_dim] bf16


def init_cache(config: Config, num_blocks: int, page_block_size: int, max_requests: int,
               max_blocks_per_seq: int) -> SparseCache:
    """An empty cache: an FP8 latent pool (656 bytes a token) and an index key pool of the same
    pages. Free finished requests with cache._replace(latents=paged.free(cache.latents, ...)):
    the index keys of a freed page are overwritten before they are read again."""
    latent_cache = paged.init_cache(config.num_layers, num_blocks, page_block_size,
                                    max_requests, max_blocks_per_seq, config.latent_dim,
                                    jnp.uint8)
    index_keys = jnp.zeros(latent_cache.pool.shape[:4] + (config.index_head_dim,),
                           INDEX_KEY_DTYPE)
    return SparseCache(latent_cache, index_keys)


def _layer_norm(x, weight, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS) * weight + bias


def _rope_first(x, positions, c: Config):
    """RoPE on the first index_rope_head_dim columns (V3.2's indexer puts them first)."""
    rotary = rope(x[..., :c.index_rope_head_dim], positions, c.rope_theta)
    return jnp.concatenate([rotary, x[..., c.index_rope_head_dim:]], axis=-1)


def indexer_queries(layer, x, positions, c: Config):
    """Index queries [.., T, index_n_heads, index_head_dim] and their weights
    [.., T, index_n_heads] of the tokens x [.., T, hidden] (attention-normed hidden states).
    The queries start from c_q, the low-rank query latent the MLA queries start from."""
    c_q = rms_norm(x @ layer["w_dq"], layer["q_norm"], c.rms_eps)
    q = jnp.einsum("...r,rhd->...hd", c_q, layer["index_wq"])
    weights = (x @ layer["index_weights_proj"]) * c.index_weight_scale
    return _rope_first(q, positions, c), weights


def indexer_keys(layer, x, positions, c: Config):
    """The index key of each token, float32 [.., T, index_head_dim] (the cache keeps it bf16)."""
    k = _layer_norm(x @ layer["index_wk"], layer["index_k_norm"], layer["index_k_bias"])
    return _rope_first(k, positions, c)


def indexer_scores(q, weights, keys):
    """sum_h w_h ReLU(q_h . k_t): q [.., H, D], weights [.., H], keys [.., T, D] -> [.., T]
    (the leading axes broadcast)."""
    logits = jnp.einsum("...hd,...td->...ht", q, keys)
    return jnp.einsum("...ht,...h->...t", jax.nn.relu(logits), weights)


def top_k(scores, visible, k: int):
    """The k best visible tokens of each row: positions int32 [.., k] and valid [.., k].
    Invisible tokens score -inf before the pick, so a row with fewer than k visible tokens has
    those first and its other slots invalid."""
    _, positions = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), k)
    # From the visibility, not from the scores: a visible token that scored -inf (or NaN) may
    # tie with the invisible ones, and an invisible token must never count.
    valid = jnp.take_along_axis(visible, positions, axis=-1)
    return positions.astype(jnp.int32), valid


def _as_stored(latent):
    """latent [.., 576] as the FP8 cache gives it back (a round trip through its layout)."""
    return fp8_cache.dequantize_fp8_kvcache(fp8_cache.quantize_fp8_kvcache(latent), jnp.float32)


def _naive_sparse_attention(layer, x, positions, picks, c: Config):
    """Non-absorbed attention of one sequence x [T, hidden], each position over the indexer's
    top-k of the positions up to it, or over its row of picks (bool [T, T]) where that row
    picks any. Returns the output [T, hidden], the index scores [T, T] (-inf where a position
    may not look), and the latents [T, 576] and index keys [T, index_head_dim] (float32) to be
    cached."""
    t = x.shape[0]
    q_nope, q_pe = deepseek._queries(layer, x, positions, c)
    latent = deepseek.latents(layer, x, positions, c)
    stored = _as_stored(latent)
    keys = indexer_keys(layer, x, positions, c)
    index_q, weights = indexer_queries(layer, x, positions, c)
    stored_keys = keys.astype(INDEX_KEY_DTYPE).astype(jnp.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, indexer_scores(index_q, weights, stored_keys[None]), -jnp.inf)
    picked, valid = top_k(scores, causal, min(c.index_topk, t))
    selected = jnp.any((picked[..., None] == jnp.arange(t)) & valid[..., None], axis=1)
    selected = jnp.where(jnp.any(picks, axis=1, keepdims=True), picks, selected)

    c_kv, k_pe = stored[:, :c.kv_lora_rank], stored[:, c.kv_lora_rank:]
    k_nope = jnp.einsum("tr,rhd->thd", c_kv, layer["w_uk"])
    v = jnp.einsum("tr,rhd->thd", c_kv, layer["w_uv"])
    logits = (jnp.einsum("qhd,khd->hqk", q_nope, k_nope)
              + jnp.einsum("qhd,kd->hqk", q_pe, k_pe)) * c.softmax_scale
    logits = jnp.where(selected, logits, -jnp.inf)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v)
    return jnp.einsum("qhd,hdo->qo", out, layer["w_o"]), scores, latent, keys


class NaiveForward(NamedTuple):
    logits: jax.Array  # [T, vocab]
    index_scores: jax.Array  # [layers, T, T]: what each position picked from, -inf past it
    latents: jax.Array  # [layers, T, 576], before FP8
    index_keys: jax.Array  # [layers, T, index_head_dim], before bf16


@functools.partial(jax.jit, static_argnames="c")
def naive_forward(params, tokens, c: Config, picks=None) -> NaiveForward:
    """The non-absorbed model over one sequence tokens [T], float32: each position attends over
    its indexer's top-k of the positions up to it, as the cache stores their latents (FP8, read
    back) and scored with their index keys as stored (bf16). The causal pick makes padding after
    a sequence harmless: no earlier position sees it.

    picks: bool [layers, T, T] or None: a row that picks any position replaces that position's
    own pick in that layer (to replay the tokens another path selected, whose index scores
    differ from these by its rounding: a near tie at the top-k boundary may go either way)."""
    h = params["embed"][tokens]
    t = tokens.shape[0]
    positions = jnp.arange(t)
    if picks is None:
        picks = jnp.zeros((len(params["layers"]), t, t), bool)
    outputs = []
    for layer, layer_picks in zip(params["layers"], picks):
        x = rms_norm(h, layer["attn_norm"], c.rms_eps)
        attn, *cached = _naive_sparse_attention(layer, x, positions, layer_picks, c)
        outputs.append(cached)
        h = h + attn
        h = h + deepseek._mlp(layer, h, c)
    logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
    return NaiveForward(logits, *(jnp.stack(x) for x in zip(*outputs)))


def _check_cache_matches(params, cache: SparseCache, c: Config) -> None:
    """An FP8 latent pool of one layer per layer of params, and index keys on the same pages."""
    if not isinstance(cache, SparseCache):
        hint = ("; decode_step returns (cache, logits, ok)"
                if isinstance(cache, tuple) and cache and isinstance(cache[0], SparseCache)
                else "")
        raise TypeError(f"cache: expected a SparseCache (from deepseek_v32.init_cache), got "
                        f"{type(cache).__name__}{hint}")
    paged.check_cache_layout(cache.latents)
    pool = cache.latents.pool
    if not cache.latents.is_fp8:
        raise TypeError(f"cache.latents.pool: expected dtype uint8 (the FP8 layout the sparse "
                        f"decode reads), got {np.dtype(pool.dtype).name}")
    layers = len(params["layers"])
    if pool.shape[0] != layers:
        raise ValueError(f"cache: expected {layers} layers (one per layer of params), got "
                         f"{pool.shape[0]} (pool shape {tuple(pool.shape)})")
    want = tuple(pool.shape[:4]) + (c.index_head_dim,)
    keys = cache.index_keys
    if not hasattr(keys, "shape") or tuple(keys.shape) != want:
        raise ValueError(f"cache.index_keys: expected shape {want} (the latent pool's pages, "
                         f"index_head_dim of the config), got "
                         f"{tuple(getattr(keys, 'shape', ()))}")
    if not jnp.issubdtype(keys.dtype, jnp.floating):
        raise TypeError(f"cache.index_keys: expected a floating dtype, got "
                        f"{np.dtype(keys.dtype).name}")


def _write_layer(cache: SparseCache, layer: int, latent, keys, counts):
    """Writes latents [R, n, 576] and index keys [R, n, index_head_dim] of `layer` at each
    request's next positions; the keys go through write_latents too, on a view of the cache
    whose pool is the index key pool (same pages, same checks, same dropped writes)."""
    latent_cache, ok = paged.write_latents(cache.latents, layer, latent, counts)
    key_view, keys_ok = paged.write_latents(latent_cache._replace(pool=cache.index_keys), layer,
                                            keys, counts)
    return SparseCache(latent_cache, key_view.pool), ok & keys_ok


class PrefillForward(NamedTuple):
    logits: jax.Array  # [N, vocab]
    latents: jax.Array  # [layers, N, 576], before FP8
    index_keys: jax.Array  # [layers, N, index_head_dim], before bf16
    indices: jax.Array  # int32 [layers, N, topk]: the tokens each attended over, -1 unused


@functools.partial(jax.jit, static_argnames="c")
def prefill_forward(params, tokens, segments, positions, c: Config) -> PrefillForward:
    """A batch of prompts, concatenated (tokens, segments and positions int32 [N]: the token
    ids, which prompt each belongs to, its position in that prompt), through the model with
    each layer's attention on the sparse prefill kernel: each token over the indexer's top-k of
    its prompt's tokens up to it, indices into the batch's concatenated latents, one
    flash_mla_sparse_fwd call a layer for every prompt. The latents are read as the FP8 cache
    stores them (exact in bf16) and the index keys as bf16, as naive_forward reads them."""
    n = tokens.shape[0]
    h = params["embed"][tokens]
    visible = (segments[:, None] == segments[None, :]) & (positions[None, :] <= positions[:, None])
    topk = min(c.index_topk, n)
    outputs = []
    for layer in params["layers"]:
        x = rms_norm(h, layer["attn_norm"], c.rms_eps)
        latent = deepseek.latents(layer, x, positions, c)
        keys = indexer_keys(layer, x, positions, c)
        index_q, weights = indexer_queries(layer, x, positions, c)
        stored_keys = keys.astype(INDEX_KEY_DTYPE).astype(jnp.float32)
        scores = indexer_scores(index_q, weights, stored_keys[None])  # [N, N]
        picked, valid = top_k(scores, visible, topk)
        indices = jnp.where(valid, picked, -1)
        q_nope, q_pe = deepseek._queries(layer, x, positions, c)         # [N, H, 128], [N, H, 64]
        q_latent = jnp.einsum("thd,rhd->thr", q_nope, layer["w_uk"])      # W_UK absorbed
        q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(jnp.bfloat16)
        kv = _as_stored(latent).astype(jnp.bfloat16)[:, None]
        out, _, _ = jax_flash_mla.flash_mla_sparse_fwd(q, kv, indices[:, None], c.softmax_scale,
                                                       d_v=c.kv_lora_rank)
        o = jnp.einsum("thr,rhd->thd", out.astype(jnp.float32), layer["w_uv"])  # W_UV
        h = h + jnp.einsum("thd,hdo->to", o, layer["w_o"])
        h = h + deepseek._mlp(layer, h, c)
        outputs.append((latent, keys, indices))
    logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
    return PrefillForward(logits, *(jnp.stack(x) for x in zip(*outputs)))


def concatenated(prompts):
    """(tokens, segments, positions) int32 [N] of prompts (lists of token ids) one after
    another, N their total length (at least 1: an all-idle batch runs one token of prompt -1)."""
    tokens = [t for p in prompts for t in p]
    segments = [r for r, p in enumerate(prompts) for _ in p]
    positions = [i for p in prompts for i in range(len(p))]
    if not tokens:
        tokens, segments, positions = [0], [-1], [0]
    return tuple(jnp.asarray(x, jnp.int32) for x in (tokens, segments, positions))


def prefill(params, cache: SparseCache, prompts, c: Config):
    """deepseek.prefill for the sparse model: the prompts (lists of token ids, one per request;
    empty for idle requests, which must be empty in the cache otherwise) run together through
    prefill_forward, whose attention is the sparse prefill kernel, and their latents (quantized
    to FP8) and index keys are written. Returns the cache and the last logits of each request
    (of the batch's first token for an idle one). Not jittable: it checks the prompts against
    the cache on the host first."""
    _check_cache_matches(params, cache, c)
    deepseek._check_prompts(cache.latents, prompts, c)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    latent_cache, ok = paged.reserve(cache.latents, lengths)
    paged.check(ok, "prefill: reserve")
    cache = cache._replace(latents=latent_cache)
    forward = prefill_forward(params, *concatenated(prompts), c)
    starts = np.concatenate([[0], np.cumsum([len(p) for p in prompts])])
    longest = max(1, max(len(p) for p in prompts))
    # Each request's rows of the batch, padded to the longest prompt (the padding is not
    # written: write_latents takes `lengths` tokens of each).
    rows = jnp.asarray([[min(start + i, forward.logits.shape[0] - 1) for i in range(longest)]
                        for start in starts[:-1]], jnp.int32)
    for i in range(len(params["layers"])):
        cache, ok = _write_layer(cache, i, forward.latents[i][rows], forward.index_keys[i][rows],
                                 lengths)
        paged.check(ok, "prefill: write")
    latent_cache, ok = paged.advance(cache.latents, lengths)
    paged.check(ok, "prefill: advance")
    last = jnp.asarray([start + len(p) - 1 if len(p) else 0 for start, p in zip(starts, prompts)],
                       jnp.int32)
    return cache._replace(latents=latent_cache), forward.logits[last]


def _check_step_inputs(params, cache: SparseCache, tokens, active, c: Config) -> None:
    _check_cache_matches(params, cache, c)
    deepseek.check_step_tokens(tokens, active, cache.latents.seqlens.shape[0])


def _selected_indices(cache: SparseCache, layer: int, index_q, weights, seqlens, topk: int):
    """Pool indices int32 [R, topk] (page_id * page + offset) of each request's top-k tokens
    among its first seqlens[r]; -1 in the slots past min(seqlens[r], topk)."""
    table = cache.latents.block_table
    page = cache.latents.page_block_size
    # Columns without a page (-1) read page 0; the positions they hold are past the length.
    keys = cache.index_keys[layer][jnp.maximum(table, 0)]   # [R, blocks, page, 1, D]
    keys = keys.reshape(table.shape[0], -1, keys.shape[-1]).astype(jnp.float32)
    scores = indexer_scores(index_q, weights, keys)              # [R, blocks * page]
    visible = jnp.arange(scores.shape[1]) < seqlens[:, None]
    positions, valid = top_k(scores, visible, topk)
    pages = jnp.take_along_axis(table, positions // page, axis=1)
    return jnp.where(valid, pages * page + positions % page, -1)


def decode_step(params, cache: SparseCache, tokens, active, c: Config):
    """One token for every active request: tokens [R] int32, active [R] bool.

    deepseek.decode_step's contract (returns (cache, logits [R, vocab], ok [R]); all-or-nothing:
    a token outside the vocabulary or a cache that cannot take a token for every active request
    leaves the cache unchanged, every flag False and every logit NaN), with each layer's
    attention over the top-k tokens its indexer picks among the request's tokens, the new one
    included, through the sparse kernel on the FP8 pool. One schedule serves every layer: each
    request attends over min(length, topk) tokens in all of them.
    """
    return decode_step_with_indices(params, cache, tokens, active, c)[:3]


def decode_step_with_indices(params, cache: SparseCache, tokens, active, c: Config):
    """decode_step, and the pool indices each layer attended over: int32 [num_layers, R, topk]
    (page_id * page + offset, -1 in unused slots), the indices the sparse kernel got."""
    _check_step_inputs(params, cache, tokens, active, c)
    in_vocabulary = (tokens >= 0) & (tokens < c.vocab_size)
    tokens_ok = jnp.all(in_vocabulary | ~active)
    counts = (active & tokens_ok).astype(jnp.int32)
    latent_cache, reserved = paged.reserve(cache.latents, counts)
    cache = cache._replace(latents=latent_cache)
    ok = reserved & tokens_ok
    counts = jnp.where(ok, counts, 0)
    positions = latent_cache.seqlens  # the new token's position
    seqlens_after = latent_cache.seqlens + counts
    topk = min(c.index_topk, latent_cache.capacity_per_request)
    topk_length = jnp.minimum(seqlens_after, topk)
    metadata = jax_flash_mla.get_mla_metadata(None, c.num_heads, 1, c.num_heads, True, topk,
                                              topk_length=topk_length)
    h = params["embed"][jnp.where(in_vocabulary, tokens, 0)]
    layer_indices = []
    for i, layer in enumerate(params["layers"]):
        x = rms_norm(h, layer["attn_norm"], c.rms_eps)
        # Written before the pick: the new token is one of those its query may select.
        cache, written = _write_layer(cache, i, deepseek.latents(layer, x, positions, c)[:, None],
                                      indexer_keys(layer, x, positions, c)[:, None], counts)
        ok = ok & written
        index_q, weights = indexer_queries(layer, x, positions, c)
        indices = _selected_indices(cache, i, index_q, weights, seqlens_after, topk)
        layer_indices.append(indices)
        q_nope, q_pe = deepseek._queries(layer, x, positions, c)         # [R, H, 128], [R, H, 64]
        q_latent = jnp.einsum("bhd,rhd->bhr", q_nope, layer["w_uk"])      # W_UK absorbed
        q = jnp.concatenate([q_latent, q_pe], axis=-1)[:, None].astype(jnp.bfloat16)
        out, _ = jax_flash_mla.flash_mla_with_kvcache(
            q, cache.latents.pool[i], None, None, c.kv_lora_rank, metadata, c.softmax_scale,
            False, is_fp8_kvcache=True, indices=indices[:, None], topk_length=topk_length)
        o = jnp.einsum("bhr,rhd->bhd", out[:, 0].astype(jnp.float32), layer["w_uv"])  # W_UV
        h = h + jnp.einsum("bhd,hdo->bo", o, layer["w_o"])
        h = h + deepseek._mlp(layer, h, c)
    logits = rms_norm(h, params["final_norm"], c.rms_eps) @ params["head"]
    latent_cache, advanced = paged.advance(cache.latents, jnp.where(ok, counts, 0))
    ok = ok & advanced
    return (cache._replace(latents=latent_cache), jnp.where(ok[:, None], logits, jnp.nan), ok,
            jnp.stack(layer_indices))
