"""What a preference model costs: its learned parameters, and the wall clock of adapting it to one new user."""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from flax import nnx

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import PairPool
from nps.train.distributed import host_value


def parameter_count(model: nnx.Module) -> int:
    """The number of trainable (``nnx.Param``) scalars of ``model``."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, params, episodes, key):
    return nnx.merge(graphdef, params).predict_log_odds(episodes, key)


def adaptation_seconds_per_user(model: nnx.Module, pool: PairPool, spec: EpisodeSpec, context_size: int,
                                num_users: int = 256, repeats: int = 5) -> float:
    """Wall clock per user of adapting ``model`` to ``num_users`` new users from ``context_size`` of their
    pairs and scoring their targets: one compiled ``predict_log_odds`` over the batch (whatever the
    method does in it: an encoder pass, cross-attention, a fit of per-user weights), after a call that
    compiles it; the median of ``repeats`` calls, divided by ``num_users``."""
    graphdef, params = nnx.split(model)
    spec = spec.for_context(context_size)
    episodes = sample_episodes(jax.random.key(0), pool, spec, num_users, context_size)
    key = jax.random.key(1)
    host_value(_predict(graphdef, params, episodes, key))
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        host_value(_predict(graphdef, params, episodes, key))
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds)) / num_users
