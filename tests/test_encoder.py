import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

from nps.config import config_from_dict
from nps.encoder import ContextEncoder, EncoderConfig
from nps.errors import ConfigError
from nps.latent import DiagonalGaussian

B, C, D = 3, 6, 4
SMALL = dict(hidden_dim=16, latent_dim=8, num_heads=4)
VARIANTS = [
    EncoderConfig(aggregation="mean", **SMALL),
    EncoderConfig(aggregation="sum", inner="linear", **SMALL),
    EncoderConfig(aggregation="attention", attention_dropout=0.1, **SMALL),
    EncoderConfig(aggregation="attention", stochastic=True, layer_norm=True, **SMALL),
]
IDS = ["mean", "sum-linear", "attention", "attention-stochastic"]


def make(config):
    return ContextEncoder(D, config, rngs=nnx.Rngs(0))


_ATTENTION = make(EncoderConfig(aggregation="attention", **SMALL))


def context(seed=0, sizes=(6, 3, 0)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    chosen = jax.random.normal(k1, (B, C, D))
    rejected = jax.random.normal(k2, (B, C, D))
    mask = jnp.arange(C)[None, :] < jnp.array(sizes)[:, None]
    return chosen, rejected, mask


def leaves(out):
    return list(out) if isinstance(out, DiagonalGaussian) else [out]


# Attention's invariance is the hypothesis property below, over every permutation and context size.
@pytest.mark.parametrize("config", [v for v, i in zip(VARIANTS, IDS) if i != "attention"],
                         ids=[i for i in IDS if i != "attention"])
def test_permutation_invariance(config):
    encoder = make(config)
    chosen, rejected, mask = context(sizes=(6, 6, 6))
    perm = jax.random.permutation(jax.random.key(3), C)
    out = encoder(chosen, rejected, mask)
    permuted = encoder(chosen[:, perm], rejected[:, perm], mask[:, perm])
    for a, b in zip(leaves(out), leaves(permuted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", VARIANTS, ids=IDS)
def test_padding_invariance_junk_in_masked_slots_changes_nothing(config):
    encoder = make(config)
    chosen, rejected, mask = context()
    junk_chosen = jnp.where(mask[..., None], chosen, jnp.nan)
    junk_rejected = jnp.where(mask[..., None], rejected, 1e6)
    for a, b in zip(leaves(encoder(chosen, rejected, mask)), leaves(encoder(junk_chosen, junk_rejected, mask))):
        chex.assert_tree_all_finite(b)
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # A shorter capacity with the same real pairs gives the same z as well.
    short = encoder(chosen[:, :4], rejected[:, :4], mask[:, :4])
    np.testing.assert_allclose(leaves(encoder(chosen, rejected, mask))[0][1:], leaves(short)[0][1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", VARIANTS, ids=IDS)
def test_empty_context_is_finite_and_is_the_learned_prior(config):
    encoder = make(config)
    chosen, rejected, _ = context()
    empty = jnp.zeros((B, C), bool)
    out = leaves(encoder(chosen, rejected, empty))
    chex.assert_tree_all_finite(out)
    other = leaves(encoder(chosen * 7 + 1, -rejected, empty))
    for a, b in zip(out, other):
        np.testing.assert_allclose(a, b)  # does not depend on the (masked) content
        np.testing.assert_allclose(a, jnp.broadcast_to(a[:1], a.shape))  # one prior for every task
    nonempty = leaves(encoder(chosen, rejected, jnp.ones((B, C), bool)))[0]
    assert not np.allclose(out[0], nonempty)


def test_one_trace_serves_every_context_size():
    encoder = make(VARIANTS[2])
    graphdef, state = nnx.split(encoder)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def encode(state, chosen, rejected, mask):
        return nnx.merge(graphdef, state)(chosen, rejected, mask)

    chosen, rejected, _ = context()
    outs = [encode(state, chosen, rejected, jnp.arange(C)[None, :] < n) for n in range(C + 1)]
    assert len({np.asarray(o).tobytes() for o in outs}) == C + 1


@pytest.mark.parametrize("config", VARIANTS, ids=IDS)
def test_gradients_are_finite_with_an_all_masked_row(config):
    encoder = make(config)
    graphdef, state = nnx.split(encoder)
    chosen, rejected, mask = context(sizes=(0, 2, 0))

    def loss(state):
        out = nnx.merge(graphdef, state)(chosen, rejected, mask, key=jax.random.key(0))
        return sum(jnp.sum(x**2) for x in leaves(out))

    grads = jax.jit(jax.grad(loss))(state)
    chex.assert_tree_all_finite(grads)


def test_dropout_needs_a_key_and_stochastic_output_is_a_gaussian():
    encoder = make(VARIANTS[2])
    chosen, rejected, mask = context(sizes=(6, 6, 6))
    a = encoder(chosen, rejected, mask, key=jax.random.key(0))
    b = encoder(chosen, rejected, mask, key=jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(encoder(chosen, rejected, mask), encoder(chosen, rejected, mask))
    q = make(VARIANTS[3])(chosen, rejected, mask)
    assert isinstance(q, DiagonalGaussian)
    chex.assert_shape([q.mean, q.std], (B, SMALL["latent_dim"]))
    assert bool(jnp.all(q.std > 0))


def test_choice_order_matters():
    """[chosen ‖ rejected] is ordered by the choice: swapping flips the evidence."""
    encoder = make(VARIANTS[0])
    chosen, rejected, mask = context(sizes=(6, 6, 6))
    assert not np.allclose(encoder(chosen, rejected, mask), encoder(rejected, chosen, mask))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("aggregation", "max", "encoder.aggregation='max' is unknown"),
        ("inner", "cnn", "encoder.inner='cnn' is unknown"),
        ("num_heads", 5, "divisible"),
        ("attention_dropout", 1.5, "attention_dropout"),
        ("activation", "swish2", "encoder.activation='swish2' is unknown"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict(EncoderConfig, {**SMALL, "aggregation": "attention", field: value}, "encoder")


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, C), min_size=B, max_size=B), seed=st.integers(0, 2**16))
def test_any_permutation_of_real_and_padded_slots_gives_the_same_z(sizes, seed):
    """Property: for any context sizes, shuffling all slots (real and padding alike) keeps z."""
    encoder = _ATTENTION
    chosen, rejected, mask = context(seed, tuple(sizes))
    perm = jax.random.permutation(jax.random.key(seed), C)
    np.testing.assert_allclose(
        encoder(chosen, rejected, mask), encoder(chosen[:, perm], rejected[:, perm], mask[:, perm]), rtol=1e-4, atol=1e-5
    )



def test_attention_pooling_equals_summing_the_per_slot_outputs():
    attention = _ATTENTION.attention
    chosen, rejected, mask = context(sizes=(6, 2, 0))
    h = jax.random.normal(jax.random.key(4), (B, C, SMALL["hidden_dim"]))
    expected = jnp.sum(jnp.where(mask[..., None], attention(h, mask, None), 0.0), axis=-2)
    np.testing.assert_allclose(attention.pooled(h, mask, None), expected, rtol=1e-5, atol=1e-5)
