"""A decoder loaded onto a (data 2, fsdp 2, tensor 2) mesh gives the single-device logits and tokens.

Run by tests/test_model_loading.py on 8 simulated CPU devices: ``sharded_decoder.py MODEL_DIR``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from tiny_lm import padded_batch

from nps.lm import LoRAConfig, SamplingConfig, from_pretrained, generate
from nps.train.mesh import make_mesh

assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(data=2, fsdp=2, tensor=2)
one = from_pretrained(sys.argv[1], tokenizer=False).model
many = from_pretrained(sys.argv[1], tokenizer=False, mesh=mesh, lora=LoRAConfig(rank=2)).model
# Loaded straight into the layout each weight's logical axes give (the layer axis unsplit).
gate = many.blocks.mlp.gate.weight[...].sharding.spec
assert tuple(gate) == (None, "tensor", "fsdp"), gate
assert tuple(many.embed[...].sharding.spec) == ("tensor", "fsdp"), many.embed[...].sharding
# Adapters too: A [L, r, in] by the model dimension it reads, B [L, out, r] by heads and its rank.
lora = many.blocks.attn.q.lora
assert tuple(lora.a[...].sharding.spec) == (None, None, "fsdp"), lora.a[...].sharding
assert tuple(lora.b[...].sharding.spec) == (None, "tensor", "fsdp"), lora.b[...].sharding
tokens, mask = padded_batch(batch=4)
expected = one(jnp.asarray(tokens), jnp.asarray(mask))
batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
got = jax.jit(lambda t, m: many(t, m))(jax.device_put(tokens, batch), jax.device_put(mask, batch))
np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
sampling = SamplingConfig(max_new_tokens=8)
np.testing.assert_array_equal(generate(many, tokens, sampling=sampling).tokens,
                              generate(one, tokens, sampling=sampling).tokens)
