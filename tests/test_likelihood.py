import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nps.latent import DiagonalGaussian, gaussian_kl
from nps.likelihood import (
    btl_log_odds,
    btl_log_prob,
    choice_accuracy,
    choice_nll,
    dpl_log_odds,
    dpl_log_prob,
    masked_mean,
    posterior_predictive_log_odds,
)


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_btl_matches_closed_form():
    ra, rb = jnp.array([2.0, -1.0, 0.0]), jnp.array([0.5, 3.0, 0.0])
    expected = [math.log(math.exp(a) / (math.exp(a) + math.exp(b))) for a, b in zip([2.0, -1.0, 0.0], [0.5, 3.0, 0.0])]
    np.testing.assert_allclose(btl_log_prob(ra, rb), expected, rtol=1e-6)
    np.testing.assert_allclose(btl_log_odds(ra, rb), [1.5, -4.0, 0.0])


def test_dpl_is_the_exact_gaussian_cdf():
    mu_a, sd_a, mu_b, sd_b = 1.0, 0.5, 0.2, 1.5
    gap = (mu_a - mu_b) / math.sqrt(sd_a**2 + sd_b**2)
    np.testing.assert_allclose(dpl_log_prob(mu_a, sd_a, mu_b, sd_b), math.log(normal_cdf(gap)), rtol=1e-6)
    # The logistic approximation of the released code differs from it.
    logistic = math.log(1 / (1 + math.exp(-math.sqrt(2 * math.pi) * gap)))
    assert abs(float(dpl_log_prob(mu_a, sd_a, mu_b, sd_b)) - logistic) > 1e-3


def test_dpl_log_odds_agree_with_log_prob_and_stay_finite_in_the_tails():
    mu_a = jnp.array([-40.0, -3.0, 0.0, 3.0, 40.0])
    sd = jnp.ones_like(mu_a)
    zeros = jnp.zeros_like(mu_a)
    log_odds = dpl_log_odds(mu_a, sd, zeros, sd)
    np.testing.assert_allclose(jax.nn.log_sigmoid(log_odds), dpl_log_prob(mu_a, sd, zeros, sd), rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(dpl_log_prob(mu_a, sd, zeros, sd))
    # Far tail: log Φ(-40/√2) ≈ -x²/2 - log(-x √(2π)), finite, not -inf.
    assert -450 < float(dpl_log_prob(-40.0, 1.0, 0.0, 1.0)) < -390


def test_posterior_predictive_averages_probabilities_not_log_odds():
    samples = jnp.array([[2.0], [-1.0], [0.5]])
    p = np.mean(1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5]))))
    np.testing.assert_allclose(posterior_predictive_log_odds(samples, axis=0), [math.log(p / (1 - p))], rtol=1e-5)
    same = jnp.full((4, 3), 1.7)
    np.testing.assert_allclose(posterior_predictive_log_odds(same), jnp.full((3,), 1.7), rtol=1e-5)


def test_accuracy_counts_ties_as_half_and_respects_the_mask():
    log_odds = jnp.array([[1.0, -1.0, 0.0, 5.0]])
    mask = jnp.array([[True, True, True, False]])
    np.testing.assert_allclose(choice_accuracy(log_odds, mask), [0.5])
    np.testing.assert_allclose(choice_nll(jnp.zeros((1, 3)), jnp.ones((1, 3), bool)), [math.log(2)], rtol=1e-6)


def test_masked_mean_of_an_empty_row_is_zero_not_nan():
    out = masked_mean(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[False, False], [True, False]]))
    np.testing.assert_allclose(out, [0.0, 3.0])


def test_gaussian_kl_closed_form():
    q = DiagonalGaussian(jnp.array([1.0]), jnp.array([2.0]))
    p = DiagonalGaussian(jnp.array([0.0]), jnp.array([1.0]))
    np.testing.assert_allclose(gaussian_kl(q, p), 2.0 - math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(gaussian_kl(q, q), 0.0, atol=1e-7)
    # KL is not symmetric: KL(p‖q) = log 2 + (1 + 1)/8 − 1/2.
    np.testing.assert_allclose(gaussian_kl(p, q), math.log(2.0) + 2.0 / 8.0 - 0.5, rtol=1e-6)
    # Sums over dimensions.
    q2 = DiagonalGaussian(jnp.array([[1.0, 1.0]]), jnp.array([[2.0, 2.0]]))
    p2 = DiagonalGaussian(jnp.zeros((1, 2)), jnp.ones((1, 2)))
    np.testing.assert_allclose(gaussian_kl(q2, p2), [2 * (2.0 - math.log(2.0))], rtol=1e-6)


def test_reparameterised_samples_have_the_right_moments_and_gradients():
    q = DiagonalGaussian(jnp.array([1.0, -2.0]), jnp.array([0.5, 3.0]))
    z = q.sample(jax.random.key(0), 20_000)
    chex.assert_shape(z, (20_000, 2))
    np.testing.assert_allclose(z.mean(0), q.mean, atol=0.05)
    np.testing.assert_allclose(z.std(0), q.std, rtol=0.03)
    grad = jax.grad(lambda m: q._replace(mean=m).sample(jax.random.key(1), 8).sum())(q.mean)
    np.testing.assert_allclose(grad, [8.0, 8.0])


def test_from_raw_std_is_positive_for_any_raw_value():
    q = DiagonalGaussian.from_raw(jnp.zeros(3), jnp.array([-1e4, 0.0, 1e4]))
    assert bool(jnp.all(q.std > 0)) and bool(jnp.all(jnp.isfinite(q.std)))


def test_choice_probabilities_of_both_orders_sum_to_one():
    a, b = jnp.array(0.3), jnp.array(-1.2)
    np.testing.assert_allclose(jnp.exp(btl_log_prob(a, b)) + jnp.exp(btl_log_prob(b, a)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        jnp.exp(dpl_log_prob(a, 0.4, b, 0.9)) + jnp.exp(dpl_log_prob(b, 0.9, a, 0.4)), 1.0, rtol=1e-6
    )
