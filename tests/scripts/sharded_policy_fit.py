"""NP-DPO training with the base sharded over (data 2, fsdp 2, tensor 2) by from_pretrained, batches
split and adapters replicated, equals one device.

Run by tests/test_dpo.py on 8 simulated CPU devices.
"""

import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from test_dpo import POLICY, SPEC, make_pool
from tiny_lm import write_nps_model

from nps.data.pairs import OptionPairPool
from nps.lm import from_pretrained
from nps.models.policy import SteerablePolicy, with_reference_log_probs
from nps.train.loop import TrainConfig, fit
from nps.train.mesh import make_mesh

assert jax.device_count() == 8, jax.devices()
directory = Path(tempfile.mkdtemp())
write_nps_model(directory, "qwen2", seed=3, tokenizer=False, vocab_size=40)
mesh = make_mesh(data=2, fsdp=2, tensor=2)


def policy(mesh=None):
    decoder = from_pretrained(directory, tokenizer=False, mesh=mesh).model
    return SteerablePolicy(decoder, 6, POLICY, rngs=nnx.Rngs(1))


pool = make_pool()
pool = OptionPairPool(pool.pairs, with_reference_log_probs(policy(), pool.options, batch_size=32))
train = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, optimizer="adamw", eval_every=3, checkpoint_every=3,
                    val_tasks=8)
one = fit(policy(), pool, pool, SPEC, train, progress=False, mesh=make_mesh(data=1))  # one device
many = fit(policy(mesh), pool, pool, SPEC, train, progress=False, mesh=mesh)
# Adam turns reduction-order noise in near-zero gradients into small update differences; a
# real disagreement would be of the size of a step (lr = 1e-2).
for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
np.testing.assert_allclose([h["val_nll"] for h in one.history], [h["val_nll"] for h in many.history], rtol=1e-3)
