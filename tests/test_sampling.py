"""Next-token sampling rules against direct reference implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nps.errors import ConfigError
from nps.lm.generate import SamplingConfig, left_align, nucleus_threshold, sample_next


def kept_by_sorting(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Top-p by definition: a token is kept iff the probability mass strictly above it is < top_p."""
    return np.array([probs[probs > p].sum() < top_p for p in probs])


jitted_threshold = jax.jit(nucleus_threshold)  # top_p traced: one compilation for every example


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 8.0),
    top_p=st.floats(0.01, 0.999),
    tied=st.booleans(),
)
def test_nucleus_threshold_keeps_exactly_the_sorted_prefix(seed, scale, top_p, tied):
    vocab = 48  # one shape: one compilation for every example
    logits = np.random.default_rng(seed).normal(size=(2, vocab)) * scale
    if tied:
        logits[:, : vocab // 2] = logits[:, :1]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    threshold = np.asarray(jitted_threshold(jnp.asarray(probs), top_p))
    for row in range(2):
        np.testing.assert_array_equal(probs[row] >= threshold[row, 0], kept_by_sorting(probs[row], top_p))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda sampling: np.asarray(jax.vmap(lambda k: sample_next(logits, k, sampling))(keys))
    assert set(draw(SamplingConfig(temperature=1.0, top_k=2)).ravel()) == {0, 1}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.79)).ravel()) == {0, 1}
    assert set(draw(SamplingConfig(temperature=1.0, top_p=0.81)).ravel()) == {0, 1, 2}
    assert set(draw(SamplingConfig(temperature=1.0)).ravel()) == {0, 1, 2, 3}
    assert set(draw(SamplingConfig()).ravel()) == {0}  # greedy


def test_left_align_keeps_token_order():
    tokens = np.array([[5, 6, 0, 0], [0, 7, 8, 9], [1, 2, 3, 4]])
    mask = tokens != 0
    aligned, aligned_mask = left_align(tokens, mask)
    np.testing.assert_array_equal(aligned[aligned_mask], tokens[mask])
    np.testing.assert_array_equal(aligned_mask, [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])


@pytest.mark.parametrize(
    "field, value, message",
    [("max_new_tokens", 0, "max_new_tokens=0"), ("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"),
     ("top_k", -2, "top_k")],
)
def test_bad_sampling_settings_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**{field: value})
