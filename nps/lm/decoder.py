"""A config-driven decoder-only LM (Qwen2/Qwen2.5, Llama 3.x, Gemma 1) with LoRA and FiLM hooks.

One module serves the three families; what differs between them is a config field
(q/k/v biases, tied embeddings, the √d embedding scale, (1 + w) RMSNorm, GeGLU vs
SwiGLU, grouped-query attention, Llama 3 RoPE scaling).

Layout decisions (docs/design.md, "Decoder LM"):
- Projection weights keep Hugging Face's ``[out, in]`` layout, so loading and
  exporting are plain copies (no transposes); the einsums below contract over ``in``.
- The L blocks' weights are stacked on a leading layer axis and the blocks run in
  one ``lax.scan``: compile time does not grow with depth, and FiLM's per-block
  (γ, β) and the KV cache ride along as scanned inputs.
- Pretrained weights are ``BaseParam`` (an ``nnx.Variable`` that is not an
  ``nnx.Param``): every ``nnx.Param`` in a model built on this decoder (LoRA,
  FiLM, the context encoder) is trainable and the base is frozen by construction,
  ``nnx.split(model, BaseParam, nnx.Param)``.
- Variable sequence lengths are masks: ``token_mask`` [B, T] marks real tokens;
  positions are ``cumsum(mask) - 1`` so left- and right-padded batches give the
  same per-token results.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.errors import ConfigError
from nps.layers import BaseParam

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "gemma")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder LM. ``from_hf`` reads a Hugging Face ``config.json``."""

    model_type: str = "qwen2"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama 3 RoPE scaling ("llama3"); "default" leaves the frequencies as they are.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma multiplies embeddings by √hidden_size
    norm_weight_offset: bool = False  # Gemma's RMSNorm scales by (1 + w)
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.activation not in ("silu", "gelu_tanh"):
            raise ConfigError(f"activation {self.activation!r} must be 'silu' or 'gelu_tanh'")
        if self.rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope_type {self.rope_type!r} must be 'default' or 'llama3'")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> DecoderConfig:
        """Read a transformers ``config.json`` dict (v4 and v5 layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: field {key!r} is missing (needed for {model_type})")
            return hf[key]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        # v5 nests rope_theta and the scaling under rope_parameters; v4 has rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: default, llama3")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported; set it to false")
        activation = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}.get(activation)
        if activation is None:
            raise ConfigError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported; supported: silu, gelu_pytorch_tanh")
        attention_bias = bool(hf.get("attention_bias", False))
        gemma = model_type == "gemma"
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            scale_embeddings=gemma,
            norm_weight_offset=gemma,
            activation=activation,
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for this architecture (inverse of ``from_hf``)."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ConfigError("qwen2 has q/k/v biases and no o bias; use model_type='llama' for other bias layouts")
        if self.model_type == "gemma" and not (self.scale_embeddings and self.norm_weight_offset):
            raise ConfigError("gemma scales embeddings and uses (1 + w) RMSNorm; set both fields or use 'llama'")
        if self.model_type != "gemma" and (self.scale_embeddings or self.norm_weight_offset):
            raise ConfigError(f"{self.model_type} has no embedding scale or (1 + w) RMSNorm; use model_type='gemma'")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ConfigError(f"{self.model_type}'s attention_bias covers q, k, v and o together; set both alike")
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "llama3":
            rope |= {
                "factor": self.rope_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_positions,
            }
        hf = {
            "model_type": self.model_type,
            "architectures": [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}[
                self.model_type
            ]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[self.activation],
        }
        if self.model_type == "llama":
            hf |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        if self.model_type == "gemma":
            hf |= {"hidden_activation": hf["hidden_act"], "attention_bias": self.qkv_bias}
        return hf

    @property
    def num_params(self) -> int:
        """Parameters of the base model (LoRA excluded)."""
        return sum(int(np.prod(shape)) for shape in base_shapes(self).values())


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (α / r)·B·A on the named projections (the paper: q and v)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"lora.targets has unknown projections {unknown}; choose from {list(LORA_TARGETS)}")
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_shapes(config: DecoderConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each per-block projection."""
    d, q, kv, f = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
        config.intermediate_size,
    )
    return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (f, d), "up": (f, d), "down": (d, f)}


def _has_bias(config: DecoderConfig, name: str) -> bool:
    return {"q": config.qkv_bias, "k": config.qkv_bias, "v": config.qkv_bias, "o": config.o_bias}.get(
        name, config.mlp_bias
    )


def base_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every base weight, by its name in ``Decoder`` (per-block weights lead with L)."""
    n_layers, d = config.num_layers, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, d)}
    shapes["attn_norm"] = (n_layers, d)
    shapes["mlp_norm"] = (n_layers, d)
    for name, (out_dim, in_dim) in projection_shapes(config).items():
        shapes[name] = (n_layers, out_dim, in_dim)
        if _has_bias(config, name):
            shapes[f"{name}_bias"] = (n_layers, out_dim)
    shapes["final_norm"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, d)
    return shapes


def hf_name(name: str, layer: int | None = None) -> str:
    """The Hugging Face tensor name of a base weight (of one block for per-block weights)."""
    top = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    if name in top:
        return top[name]
    block = {
        "attn_norm": "input_layernorm.weight",
        "mlp_norm": "post_attention_layernorm.weight",
    }
    if name in block:
        return f"model.layers.{layer}.{block[name]}"
    proj, _, bias = name.partition("_")
    module = "mlp" if proj in ("gate", "up", "down") else "self_attn"
    return f"model.layers.{layer}.{module}.{proj}_proj.{'bias' if bias else 'weight'}"


def _init_weight(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
    """N(0, 0.02²) drawn directly in ``dtype`` (no full-size fp32 temporary), as transformers initialises."""
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


class Blocks(nnx.Module):
    """The L blocks' weights, stacked on a leading layer axis."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], config: DecoderConfig, dtype, rngs: nnx.Rngs):
        for name, shape in shapes.items():
            if name.endswith("norm"):
                # Gemma stores w of (1 + w), so identity is 0; the others store w itself.
                value = jnp.full(shape, 0.0 if config.norm_weight_offset else 1.0, dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(shape, dtype)
            else:
                value = _init_weight(rngs, shape, dtype)
            setattr(self, name, BaseParam(value))


class LoRA(nnx.Module):
    """Adapters A [L, r, in] (random) and B [L, out, r] (zero: the adapted model starts as the base)."""

    def __init__(self, config: DecoderConfig, lora: LoRAConfig, rngs: nnx.Rngs):
        shapes = projection_shapes(config)
        for name in lora.targets:
            out_dim, in_dim = shapes[name]
            bound = 1.0 / math.sqrt(in_dim)  # kaiming-uniform(a=√5) bound, as peft initialises A
            a = jax.random.uniform(rngs.params(), (config.num_layers, lora.rank, in_dim), jnp.float32, -bound, bound)
            setattr(self, f"{name}_a", nnx.LoRAParam(a))
            setattr(self, f"{name}_b", nnx.LoRAParam(jnp.zeros((config.num_layers, out_dim, lora.rank), jnp.float32)))


class KVCache(NamedTuple):
    """Keys and values of every block: [L, B, S, H_kv, head_dim]; ``valid`` [B, S] marks filled real slots."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool))


class Decoder(nnx.Module):
    """Decoder-only LM: embeddings, L pre-norm blocks (attention + gated MLP), final norm, LM head.

    Base weights are ``BaseParam`` in ``dtype`` (bf16 or fp32); LoRA adapters are fp32
    ``nnx.LoRAParam``. Build random weights with ``Decoder(config, rngs=...)``; load
    pretrained ones with ``nps.models.from_pretrained``.
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        lora: LoRAConfig | None = None,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.lora_config = lora
        self.dtype = jnp.dtype(dtype)
        shapes = base_shapes(config)
        self.embed = BaseParam(_init_weight(rngs, shapes["embed"], dtype))
        block_shapes = {k: v for k, v in shapes.items() if k not in ("embed", "final_norm", "lm_head")}
        self.blocks = Blocks(block_shapes, config, dtype, rngs)
        self.final_norm = BaseParam(jnp.full(shapes["final_norm"], 0.0 if config.norm_weight_offset else 1.0, dtype))
        if not config.tie_word_embeddings:
            self.lm_head = BaseParam(_init_weight(rngs, shapes["lm_head"], dtype))
        self.lora = nnx.data(LoRA(config, lora, rngs) if lora is not None else None)

    def add_lora(self, lora: LoRAConfig, *, rngs: nnx.Rngs, mesh=None) -> None:
        """Attach fresh adapters (B = 0, so the model's function is unchanged); replaces any present."""
        self.lora_config = lora
        self.lora = nnx.data(LoRA(self.config, lora, rngs))
        if mesh is not None:
            from nps.lm.sharding import shard_decoder

            shard_decoder(self.lora, mesh)

    # -- forward -----------------------------------------------------------------------------
    def hidden_states(
        self,
        tokens: jax.Array,
        token_mask: jax.Array | None = None,
        *,
        film: tuple[jax.Array, jax.Array] | None = None,
        use_lora: bool = True,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        positions: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        remat: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states [B, T, D] of ``tokens`` [B, T] int.

        token_mask: [B, T] bool, True for real tokens (default all). film: (γ, β), each
        [B, L, D], applied to every block's output as γ·h + β (None: no FiLM). use_lora:
        False runs the frozen base (the DPO reference) with the same weights. cache:
        a ``KVCache`` whose slots [cache_index, cache_index + T) receive these tokens'
        keys and values; attention then spans the cache. positions: [B, T] (default
        ``cumsum(token_mask) - 1``, or continuing from the cache). dropout_key: enables
        LoRA dropout (training). remat: recompute each block in the backward pass.
        """
        config = self.config
        batch, length = tokens.shape
        if token_mask is None:
            token_mask = jnp.ones((batch, length), bool)
        token_mask = token_mask.astype(bool)
        if positions is None:
            positions = jnp.cumsum(token_mask, axis=1) - 1
            if cache is not None:
                positions = positions + jnp.sum(cache.valid, axis=1, keepdims=True)
            positions = jnp.maximum(positions, 0)
        h = jnp.take(self.embed[...], tokens, axis=0)
        if config.scale_embeddings:
            h = h * jnp.asarray(math.sqrt(config.hidden_size), self.dtype)
        cos, sin = rope_tables(config, positions)

        if cache is None:
            key_valid, query_slots, key_slots = token_mask, jnp.arange(length), jnp.arange(length)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache_index))
            query_slots = cache_index + jnp.arange(length)
            key_slots = jnp.arange(cache.valid.shape[1])
        # [B, T, S]: causal over slots, and only real keys.
        allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]

        weights = {name: var[...] for name, var in vars(self.blocks).items() if isinstance(var, BaseParam)}
        adapters = {}
        if use_lora and self.lora is not None:
            adapters = {name: var[...] for name, var in vars(self.lora).items() if isinstance(var, nnx.LoRAParam)}
        n_layers = config.num_layers
        gamma, beta = film if film is not None else (None, None)
        layer_keys = jax.random.split(dropout_key, n_layers) if dropout_key is not None else None
        scanned = {
            "w": weights,
            "lora": adapters,
            "film": None if film is None else (jnp.swapaxes(gamma, 0, 1), jnp.swapaxes(beta, 0, 1)),
            "cache": None if cache is None else (cache.keys, cache.values),
            "key": layer_keys,
        }

        def block(h, layer):
            h, kv = _block(config, self.lora_config, h, layer, cos, sin, allowed, cache_index)
            return h, kv

        if remat:
            block = jax.checkpoint(block)
        h, new_kv = jax.lax.scan(block, h, scanned, length=n_layers)
        h = rms_norm(h, self.final_norm[...], config)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], key_valid)
        return h, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits [..., V] (fp32 accumulation) of hidden states [..., D]."""
        head = self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)

    def __call__(self, tokens, token_mask=None, **kwargs) -> jax.Array:
        """Logits [B, T, V] (see ``hidden_states`` for the arguments; no cache)."""
        hidden, _ = self.hidden_states(tokens, token_mask, **kwargs)
        return self.logits(hidden)


def rms_norm(x: jax.Array, weight: jax.Array, config: DecoderConfig) -> jax.Array:
    """RMSNorm computed in fp32; Gemma scales by (1 + w) before the cast, the others by w after."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.rms_norm_eps)
    if config.norm_weight_offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def rope_frequencies(config: DecoderConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] (fp32), with Llama 3's smooth long-context scaling."""
    dim = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
        np.float32
    )
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_positions
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim] (fp32) for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(config))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on [B, T, H, hd] in the half-split convention (as transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _project(x, layer, name, lora_config, index):
    """x [..., in] -> [..., out] through the base weight [out, in], its bias and its LoRA adapter."""
    w = layer["w"]
    y = jnp.einsum("...i,oi->...o", x, w[name])
    if f"{name}_bias" in w:
        y = y + w[f"{name}_bias"]
    if f"{name}_a" in layer["lora"]:
        a, b = layer["lora"][f"{name}_a"], layer["lora"][f"{name}_b"]
        x_in = x.astype(jnp.float32)
        if layer["key"] is not None and lora_config.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(layer["key"], index), 1 - lora_config.dropout, x.shape)
            x_in = jnp.where(keep, x_in / (1 - lora_config.dropout), 0.0)
        delta = jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x_in, a), b) * lora_config.scale
        y = y + delta.astype(y.dtype)
    return y


def _block(config: DecoderConfig, lora_config, h, layer, cos, sin, allowed, cache_index):
    """One pre-norm block on h [B, T, D]; returns (output, (keys, values) of the cache or of these tokens)."""
    batch, length, _ = h.shape
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    w = layer["w"]
    x = rms_norm(h, w["attn_norm"], config)
    q = _project(x, layer, "q", lora_config, 0).reshape(batch, length, heads, head_dim)
    k = _project(x, layer, "k", lora_config, 1).reshape(batch, length, kv_heads, head_dim)
    v = _project(x, layer, "v", lora_config, 2).reshape(batch, length, kv_heads, head_dim)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if layer["cache"] is not None:
        cache_k, cache_v = layer["cache"]
        k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
    attended = attention(q, k, v, allowed)
    h = h + _project(attended.reshape(batch, length, heads * head_dim), layer, "o", lora_config, 3)
    x = rms_norm(h, w["mlp_norm"], config)
    gate = _project(x, layer, "gate", lora_config, 4)
    act = jax.nn.silu(gate) if config.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    h = h + _project(act * _project(x, layer, "up", lora_config, 5), layer, "down", lora_config, 6)
    if layer["film"] is not None:
        gamma, beta = layer["film"]  # [B, D] each: this block's FiLM
        h = (gamma[:, None, :] * h + beta[:, None, :]).astype(h.dtype)
    return h, (k, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, hd]; k, v [B, S, H_kv, hd]; allowed [B, T, S] -> [B, T, H, hd]."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, length, heads, head_dim)
