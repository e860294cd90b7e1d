"""A config-driven decoder-only LM (Qwen2/Qwen2.5, Llama 3.x, Gemma 1) with LoRA and FiLM hooks.

One module tree serves the three families; what differs between them is a config field
(q/k/v biases, tied embeddings, the √d embedding scale, (1 + w) RMSNorm, GeGLU vs
SwiGLU, grouped-query attention, Llama 3 RoPE scaling).

Structure (docs/design.md, "Decoder LMs")::

    Decoder
      embed       BaseParam [V, D]
      blocks      Block, its weights stacked on a leading layer axis [L, ...] (nnx.vmap)
        attn_norm   RMSNorm            weight [L, D]
        attn        Attention          q, k, v, o: Linear (weight [L, out, in], bias [L, out], lora)
        mlp_norm    RMSNorm
        mlp         MLP                gate, up, down: Linear
      final_norm  RMSNorm            weight [D]
      lm_head     BaseParam [V, D] (absent with tied embeddings)

- Projection weights keep Hugging Face's ``[out, in]`` layout, so loading and
  exporting are plain copies (no transposes); the einsums contract over ``in``.
  ``nps.lm.params`` maps every parameter path to its Hugging Face tensor name.
- The blocks run in one ``nnx.scan`` over the layer axis: compile time does not grow
  with depth, and FiLM's per-block (γ, β), the KV cache and the LoRA-dropout keys
  ride along as scanned inputs.
- Every weight carries its logical axes as ``out_sharding`` metadata ("vocab",
  "embed", "heads", "mlp"; "layers" for the stacked axis, added by ``nnx.vmap``);
  ``nps.lm.sharding`` maps them to a mesh.
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
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.config import check_positive
from nps.errors import ConfigError, invalid
from nps.layers import BaseParam
from nps.lm.sharding import HIDDEN, constrain, shard_decoder

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "gemma")
# Each per-block projection (the LoRA targets): the block's sub-module holding it, and the
# logical axes of its [out, in] weight.
PROJECTIONS = {
    "q": ("attn", ("heads", "embed")),
    "k": ("attn", ("heads", "embed")),
    "v": ("attn", ("heads", "embed")),
    "o": ("attn", ("embed", "heads")),
    "gate": ("mlp", ("mlp", "embed")),
    "up": ("mlp", ("mlp", "embed")),
    "down": ("mlp", ("embed", "mlp")),
}
LORA_TARGETS = tuple(PROJECTIONS)
# The logical name of the stacked layer axis (never split: every device runs every layer).
LAYERS = "layers"
# Logical axes of activations inside a block (``nps.lm.sharding.RULES`` maps them to the mesh).
_QUERIES = ("activation_batch", "activation_length", "activation_heads", None)
_KEYS = ("activation_batch", "activation_length", "activation_kv_heads", None)
_MLP = ("activation_batch", "activation_length", "activation_mlp")
# What a block keeps for the backward pass (``remat``): "none" keeps every activation; "full"
# keeps the block's input alone and recomputes the block; "dots" keeps the outputs of its weight
# matmuls (projections, LoRA) and recomputes the rest (norms, activations, attention).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "rope_original_max_positions", "max_position_embeddings")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor")
_BOOL_FIELDS = ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings", "scale_embeddings", "norm_weight_offset")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


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
            supported = ", ".join(SUPPORTED_MODEL_TYPES)
            raise invalid("model_type", self.model_type, f"is not supported; supported: {supported}")
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise invalid(name, getattr(self, name), "must be a positive integer")
        check_positive(self, *_INT_FIELDS)
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                raise invalid(name, value, "must be a positive finite number")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise invalid(name, getattr(self, name), "must be true or false")
        if self.num_heads % self.num_kv_heads:
            raise invalid("num_heads", self.num_heads, f"must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise invalid("head_dim", self.head_dim, "must be even (RoPE rotates pairs of dimensions)")
        if self.activation not in ("silu", "gelu_tanh"):
            raise invalid("activation", self.activation, "must be 'silu' or 'gelu_tanh'")
        if self.rope_type not in ("default", "llama3"):
            raise invalid("rope_type", self.rope_type, "must be 'default' or 'llama3'")
        if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise invalid("rope_high_freq_factor", self.rope_high_freq_factor,
                          f"must exceed rope_low_freq_factor={self.rope_low_freq_factor} for llama3 RoPE scaling")

    @classmethod
    def from_hf(cls, hf: Any, source: str = "config.json") -> DecoderConfig:
        """Read a transformers ``config.json`` dict (v4 and v5 layouts), checking every field's type.

        Raises ``ConfigError`` naming ``source`` and the field for anything missing, of the
        wrong type or out of range, so a corrupt or foreign config.json stops here.
        """
        fix = f"; fix {source} (is it this model's own config?)"
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: must hold a JSON object of config fields, not a {type(hf).__name__}{fix}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        checks = {int: ("an integer", _is_int), float: ("a number", _is_number), bool: ("true or false", None),
                  str: ("a string", None), dict: ("a JSON object", None)}

        def read(key, kind, default=dataclasses.MISSING, within=hf, where=""):
            """``within[key]`` checked to be of ``kind``; a missing or null key gives ``default``."""
            value = within.get(key)
            if value is None:
                if default is dataclasses.MISSING:
                    raise ConfigError(f"{source}: field {where}{key!r} is missing (needed for {model_type}){fix}")
                return default
            description, test = checks[kind]
            if not (test(value) if test else isinstance(value, kind)):
                raise ConfigError(f"{source}: {where}{key}={value!r} must be {description}{fix}")
            return value

        hidden, heads = read("hidden_size", int), read("num_attention_heads", int)
        if heads < 1:
            raise ConfigError(f"{source}: num_attention_heads={heads} must be a positive integer{fix}")
        # v5 nests rope_theta and the scaling under rope_parameters; v4 has rope_theta + rope_scaling.
        rope_key = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
        rope = read(rope_key, dict, {})
        inside = f"{rope_key}."
        rope_type = read("rope_type", str, None, rope, inside) or read("type", str, "default", rope, inside)
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: default, llama3")
        if model_type == "qwen2" and read("use_sliding_window", bool, False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported; set it to false")
        act_key = "hidden_activation" if hf.get("hidden_activation") is not None else "hidden_act"
        act_name = read(act_key, str, "silu")
        activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}.get(act_name)
        if activation is None:
            raise ConfigError(f"{source}: {act_key} {act_name!r} is not supported; supported: silu, gelu_pytorch_tanh")
        attention_bias = read("attention_bias", bool, False)
        gemma = model_type == "gemma"
        fields = dict(
            model_type=model_type,
            vocab_size=read("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=read("intermediate_size", int),
            num_layers=read("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=read("num_key_value_heads", int, heads),
            head_dim=read("head_dim", int, hidden // heads),
            rms_norm_eps=float(read("rms_norm_eps", float, 1e-6)),
            rope_theta=float(read("rope_theta", float, read("rope_theta", float, 10000.0), rope, inside)),
            rope_type=rope_type,
            rope_factor=float(read("factor", float, 1.0, rope, inside)),
            rope_low_freq_factor=float(read("low_freq_factor", float, 1.0, rope, inside)),
            rope_high_freq_factor=float(read("high_freq_factor", float, 4.0, rope, inside)),
            rope_original_max_positions=read("original_max_position_embeddings", int, 8192, rope, inside),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=read("mlp_bias", bool, False),
            tie_word_embeddings=read("tie_word_embeddings", bool, gemma),
            scale_embeddings=gemma,
            norm_weight_offset=gemma,
            activation=activation,
            max_position_embeddings=read("max_position_embeddings", int, 32768),
        )
        try:  # ranges and the rules between fields
            return cls(**fields)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}{fix}", error.field) from None

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


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters W + (α / r)·B·A on the named projections (the paper: q and v)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) for t in self.targets):
            raise invalid("lora.targets", self.targets, f"must be a list of projection names from {list(LORA_TARGETS)}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"lora.targets has unknown projections {unknown}; choose from {list(LORA_TARGETS)}")
        if not _is_int(self.rank) or self.rank < 1:
            raise invalid("lora.rank", self.rank, "must be a positive integer")
        if not (_is_number(self.alpha) and math.isfinite(self.alpha)):
            raise invalid("lora.alpha", self.alpha, "must be a finite number")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise invalid("lora.dropout", self.dropout, "must be in [0, 1)")

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


def _normal(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
    """N(0, 0.02²) drawn directly in ``dtype`` (no full-size fp32 temporary), as transformers initialises."""
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


def base_param(value: jax.Array, axes: tuple[str | None, ...]) -> BaseParam:
    """A frozen weight with its logical axes as sharding metadata.

    ``eager_sharding=False``: the axes are logical names, placed by ``nps.lm.sharding``
    (which leaves a dimension whole where a mesh axis does not divide it), not by Flax.
    """
    return BaseParam(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, computed in fp32. weight [D]; Gemma scales by (1 + w)."""

    def __init__(self, dim: int, config: DecoderConfig, dtype):
        # Gemma stores w of (1 + w), so identity is 0; the others store w itself.
        self.weight = base_param(jnp.full((dim,), 0.0 if config.norm_weight_offset else 1.0, dtype), (None,))
        self.eps = config.rms_norm_eps
        self.offset = config.norm_weight_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D] -> [..., D] in x's dtype; Gemma applies (1 + w) before the cast, the others w after."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class LoRA(nnx.Module):
    """A low-rank adapter: x -> (α/r)·B·A·x. A [r, in] is random, B [out, r] zero (the model starts as its base)."""

    def __init__(self, in_dim: int, out_dim: int, config: LoRAConfig, axes: tuple[str, str], *, rngs: nnx.Rngs):
        """``axes``: the logical axes (out, in) of the adapted weight, which A's in and B's out share."""
        bound = 1.0 / math.sqrt(in_dim)  # kaiming-uniform(a=√5) bound, as peft initialises A
        a = jax.random.uniform(rngs.params(), (config.rank, in_dim), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a, out_sharding=(None, axes[1]), eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((out_dim, config.rank), jnp.float32), out_sharding=(axes[0], "lora_rank"),
                               eager_sharding=False)
        self.scale = config.scale
        self.dropout = config.dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """The update [..., out] (fp32) for x [..., in]; ``dropout_key`` drops inputs (training)."""
        x = x.astype(jnp.float32)
        if dropout_key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0.0)
        return jnp.einsum("...r,or->...o", jnp.einsum("...i,ri->...r", x, self.a[...]), self.b[...]) * self.scale


class Linear(nnx.Module):
    """A pretrained projection: weight [out, in] (Hugging Face's layout), optional bias [out], optional LoRA."""

    def __init__(self, name: str, config: DecoderConfig, dtype, *, rngs: nnx.Rngs):
        out_dim, in_dim = projection_shapes(config)[name]
        axes = PROJECTIONS[name][1]
        has_bias = {"q": config.qkv_bias, "k": config.qkv_bias, "v": config.qkv_bias, "o": config.o_bias}.get(
            name, config.mlp_bias)
        self.weight = base_param(_normal(rngs, (out_dim, in_dim), dtype), axes)
        self.bias = base_param(jnp.zeros((out_dim,), dtype), axes[:1]) if has_bias else None
        self.lora = nnx.data(None)
        self.dropout_stream = LORA_TARGETS.index(name)  # this projection's LoRA-dropout key within a block

    def __call__(self, x: jax.Array, context: Context, layer: LayerInputs) -> jax.Array:
        """[..., in] -> [..., out]."""
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        if context.use_lora and self.lora is not None:
            key = None if layer.key is None else jax.random.fold_in(layer.key, self.dropout_stream)
            y = y + self.lora(x, key).astype(y.dtype)
        return y


class KVCache(NamedTuple):
    """Keys and values of every block: [L, B, S, H_kv, head_dim]; ``valid`` [B, S] marks filled real slots."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, config: DecoderConfig, batch: int, length: int, dtype) -> KVCache:
        """An empty cache, laid out on the enclosing mesh (``nps.lm.sharding.on_mesh``): each device
        its sequences, and its key-value heads under tensor parallelism."""
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        zeros = constrain(jnp.zeros(shape, dtype), (LAYERS, *_KEYS))
        valid = constrain(jnp.zeros((batch, length), bool), _KEYS[:2])
        return cls(zeros, zeros, valid)


class Context(NamedTuple):
    """What every block of one forward pass shares: RoPE tables cos, sin [B, T, hd] (fp32), the
    attention mask [B, T, S], the cache slot of the first token, and whether LoRA is on (static)."""

    cos: jax.Array
    sin: jax.Array
    allowed: jax.Array
    cache_index: jax.Array | int
    use_lora: bool


class LayerInputs(NamedTuple):
    """One block's share of the scanned inputs (each None when unused): FiLM's (γ, β) [B, D] each,
    the cache's (keys, values) [B, S, H_kv, hd], and the LoRA-dropout key."""

    film: tuple[jax.Array, jax.Array] | None
    cache: tuple[jax.Array, jax.Array] | None
    key: jax.Array | None


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: q, k, v, o projections."""

    def __init__(self, config: DecoderConfig, dtype, *, rngs: nnx.Rngs):
        self.q, self.k, self.v, self.o = (Linear(name, config, dtype, rngs=rngs) for name in ("q", "k", "v", "o"))
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim

    def __call__(self, x, context: Context, layer: LayerInputs):
        """x [B, T, D] -> (output [B, T, D], (keys, values) of the cache, or None without one)."""
        batch, length, _ = x.shape
        q = constrain(self.q(x, context, layer).reshape(batch, length, self.num_heads, self.head_dim), _QUERIES)
        k = constrain(self.k(x, context, layer).reshape(batch, length, self.num_kv_heads, self.head_dim), _KEYS)
        v = constrain(self.v(x, context, layer).reshape(batch, length, self.num_kv_heads, self.head_dim), _KEYS)
        q, k = rotate(q, context.cos, context.sin), rotate(k, context.cos, context.sin)
        kv = None
        if layer.cache is not None:
            cache_k, cache_v = layer.cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, context.cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, context.cache_index, 0, 0))
            kv = (k, v)
        attended = attention(q, k, v, context.allowed)
        return self.o(attended.reshape(batch, length, self.num_heads * self.head_dim), context, layer), kv


class MLP(nnx.Module):
    """The gated MLP: down(act(gate(x)) · up(x)), SwiGLU or GeGLU (tanh)."""

    def __init__(self, config: DecoderConfig, dtype, *, rngs: nnx.Rngs):
        self.gate, self.up, self.down = (Linear(name, config, dtype, rngs=rngs) for name in ("gate", "up", "down"))
        self.activation = config.activation

    def __call__(self, x, context: Context, layer: LayerInputs):
        """x [B, T, D] -> [B, T, D]."""
        gate = constrain(self.gate(x, context, layer), _MLP)
        act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down(constrain(act * self.up(x, context, layer), _MLP), context, layer)


class Block(nnx.Module):
    """One pre-norm block: h + attn(norm(h)), then + mlp(norm(·)), then FiLM's γ·h + β if given."""

    def __init__(self, config: DecoderConfig, dtype, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config, dtype)
        self.attn = Attention(config, dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config, dtype)
        self.mlp = MLP(config, dtype, rngs=rngs)

    def __call__(self, h: jax.Array, context: Context, layer: LayerInputs):
        """h [B, T, D] -> (h [B, T, D], this block's cache (keys, values) or None)."""
        attended, kv = self.attn(self.attn_norm(h), context, layer)
        h = h + attended
        h = h + self.mlp(self.mlp_norm(h), context, layer)
        if layer.film is not None:
            gamma, beta = layer.film  # [B, D] each: this block's FiLM
            h = (gamma[:, None, :] * h + beta[:, None, :]).astype(h.dtype)
        return constrain(h, HIDDEN), kv


# The stacked layer axis is named in every per-block weight's sharding metadata.
_STACKED = {nnx.PARTITION_NAME: LAYERS}


def _stacked(count: int, rngs: nnx.Rngs, make, *args):
    """``count`` modules ``make(*args, rngs=...)`` with independent random draws, their weights stacked on axis 0."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=_STACKED)
    def build(rngs):
        return make(*args, rngs=rngs)

    return build(rngs)


class Decoder(nnx.Module):
    """Decoder-only LM: embeddings, L pre-norm blocks (attention + gated MLP), final norm, LM head.

    Base weights are ``BaseParam`` in ``dtype`` (bf16 or fp32); LoRA adapters are fp32
    ``nnx.LoRAParam`` inside the projections they adapt. Build random weights with
    ``Decoder(config, rngs=...)``; load pretrained ones with ``nps.lm.from_pretrained``.
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
        self.lora_config = None
        self.dtype = jnp.dtype(dtype)
        vocab, d = config.vocab_size, config.hidden_size
        self.embed = base_param(_normal(rngs, (vocab, d), dtype), ("vocab", "embed"))
        self.blocks = _stacked(config.num_layers, rngs, Block, config, dtype)
        self.final_norm = RMSNorm(d, config, dtype)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else base_param(_normal(rngs, (vocab, d), dtype), ("vocab", "embed"))
        if lora is not None:
            self.add_lora(lora, rngs=rngs)

    def projections(self) -> dict[str, Linear]:
        """Each per-block projection (stacked over layers) by its LoRA target name."""
        return {name: getattr(getattr(self.blocks, group), name) for name, (group, _) in PROJECTIONS.items()}

    def add_lora(self, lora: LoRAConfig, *, rngs: nnx.Rngs, mesh=None) -> None:
        """Attach fresh adapters (B = 0, so the model's function is unchanged); replaces any present."""
        self.lora_config = lora
        for name, linear in self.projections().items():
            out_dim, in_dim = linear.weight.shape[1:]
            adapter = None
            if name in lora.targets:
                adapter = _stacked(self.config.num_layers, rngs, LoRA, in_dim, out_dim, lora, PROJECTIONS[name][1])
            linear.lora = nnx.data(adapter)
        if mesh is not None:
            shard_decoder(self, mesh, nnx.LoRAParam)

    def remove_lora(self) -> None:
        """Drop every adapter (after merging them, or to return to the base)."""
        for linear in self.projections().values():
            linear.lora = nnx.data(None)
        self.lora_config = None

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
        remat: str = "none",
    ) -> tuple[jax.Array, KVCache | None]:
        """Final (normed) hidden states [B, T, D] of ``tokens`` [B, T] int.

        token_mask: [B, T] bool, True for real tokens (default all). film: (γ, β), each
        [B, L, D], applied to every block's output as γ·h + β (None: no FiLM). use_lora:
        False runs the frozen base (the DPO reference) with the same weights. cache:
        a ``KVCache`` whose slots [cache_index, cache_index + T) receive these tokens'
        keys and values; attention then spans the cache. positions: [B, T] (default
        ``cumsum(token_mask) - 1``, or continuing from the cache). dropout_key: enables
        LoRA dropout (training). remat: what each block keeps for the backward pass, one of
        ``REMAT_POLICIES`` ("none", "full", "dots").
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
        h = constrain(h, HIDDEN)

        if cache is None:
            key_valid, query_slots, key_slots = token_mask, jnp.arange(length), jnp.arange(length)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache_index))
            query_slots = cache_index + jnp.arange(length)
            key_slots = jnp.arange(cache.valid.shape[1])
        # [B, T, S]: causal over slots, and only real keys.
        allowed = (key_slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]
        cos, sin = rope_tables(config, positions)
        context = Context(cos, sin, allowed, cache_index, use_lora)
        layers = LayerInputs(
            film=None if film is None else (jnp.swapaxes(film[0], 0, 1), jnp.swapaxes(film[1], 0, 1)),
            cache=None if cache is None else (cache.keys, cache.values),
            key=None if dropout_key is None else jax.random.split(dropout_key, config.num_layers),
        )

        def run(block: Block, h: jax.Array, layer: LayerInputs):
            return block(h, context, layer)

        if remat not in REMAT_POLICIES:
            raise invalid("remat", remat, f"is unknown; use one of {list(REMAT_POLICIES)}")
        if remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[remat])
        # graph_updates=False: the blocks are read, never written, so the scan passes no state back out.
        h, new_kv = nnx.scan(run, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), graph_updates=False)(
            self.blocks, h, layers
        )
        h = self.final_norm(h)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], key_valid)
        return h, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits [B, ..., V] (fp32 accumulation) of hidden states [B, ..., D]."""
        logits = jnp.einsum("...d,vd->...v", hidden, self._head(), preferred_element_type=jnp.float32)
        return constrain(logits, ("activation_batch", *(None,) * (logits.ndim - 2), "activation_vocab"))

    def logits_function(self):
        """The LM head as a loss applies it, chunk by chunk (``nps.dpo.token_log_probs``): its
        vocabulary split over the model axes, fsdp included, and each chunk's hidden states gathered
        over them. Under FSDP a device then reads 1/fsdp of the head and gathers a chunk's few
        hidden states, where ``logits`` would gather the whole head for every chunk (Qwen2.5-7B's
        NP-DPO step on 16 v5e chips: 86 → 50 GB of all-gathers per step, 2.9 → 3.2 GiB of
        temporaries; ``nps plan``)."""
        head = constrain(self._head(), ("head_vocab", None))

        def logits(hidden: jax.Array) -> jax.Array:
            hidden = constrain(hidden, ("head_batch", *(None,) * (hidden.ndim - 1)))
            out = jnp.einsum("...d,vd->...v", hidden, head, preferred_element_type=jnp.float32)
            return constrain(out, ("head_batch", *(None,) * (out.ndim - 2), "head_vocab"))

        return logits

    def _head(self) -> jax.Array:
        return self.embed[...] if self.lm_head is None else self.lm_head[...]

    def __call__(self, tokens, token_mask=None, **kwargs) -> jax.Array:
        """Logits [B, T, V] (see ``hidden_states`` for the arguments; no cache)."""
        hidden, _ = self.hidden_states(tokens, token_mask, **kwargs)
        return self.logits(hidden)


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


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on [B, T, H, hd] in the half-split convention (as transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, hd]; k, v [B, S, H_kv, hd]; allowed [B, T, S] -> [B, T, H, hd].

    Scores and softmax in fp32; a query with no allowed key (padding) gets a finite
    average of the values, never NaN.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None])
