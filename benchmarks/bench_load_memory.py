"""Peak host memory of ``from_pretrained`` against the size of the checkpoint it loads.

Writes a Qwen2-shaped checkpoint with random weights (in a child process), then loads
it in a fresh child process that resets its peak-RSS counter (``/proc/self/clear_refs``)
just before ``from_pretrained`` and reads ``VmHWM`` after: the peak growth is what the
load cost. Exits 1 if the ratio exceeds ``--max-ratio``. Linux only. Usage:

    python benchmarks/bench_load_memory.py [--hidden 768] [--layers 8] [--dtype float32] [--max-ratio 1.3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Random weights drawn by NumPy into the shapes of an abstract model: JAX's initialisers (threefry)
# take ~10 s for 400 MB on a CPU, and the load measured below does not depend on the values.
WRITE = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from nps.layers import BaseParam
    from nps.lm import Decoder, DecoderConfig
    from nps.lm.loading import save_pretrained
    directory, hidden, layers, vocab, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    hf = dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
              num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
              tie_word_embeddings=False, rope_theta=1e6, rms_norm_eps=1e-6)
    abstract = nnx.eval_shape(lambda: Decoder(DecoderConfig.from_hf(hf), dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))
    graphdef, weights, rest = nnx.split(abstract, BaseParam, ...)
    rng = np.random.default_rng(0)
    weights = jax.tree.map(lambda w: (0.02 * rng.standard_normal(w.shape, np.float32)).astype(w.dtype), weights)
    save_pretrained(nnx.merge(graphdef, weights, rest), directory, hf)
    """
)

LOAD = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp
    from flax import nnx
    from nps.layers import BaseParam
    from nps.lm import from_pretrained

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    jax.block_until_ready(jnp.zeros(8) + 1)  # start the backend before measuring
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    model = from_pretrained(sys.argv[1], dtype=jnp.dtype(sys.argv[2]), tokenizer=False).model
    jax.block_until_ready(nnx.state(model))
    peak = status("VmHWM")
    size = sum(v[...].nbytes for _, v in nnx.to_flat_state(nnx.state(model, BaseParam)))
    print(size, peak - before, status("VmRSS") - before)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-ratio", type=float, default=1.3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write = [str(x) for x in (directory, args.hidden, args.layers, args.vocab, args.dtype)]
        subprocess.run([sys.executable, "-c", WRITE, *write], check=True)
        file_mb = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) / 2**20
        out = subprocess.run(
            [sys.executable, "-c", LOAD, directory, args.dtype], check=True, capture_output=True, text=True
        ).stdout.split()
    size, peak, resident = (int(x) for x in out[-3:])
    ratio = peak / size
    print(f"checkpoint: {file_mb:.0f} MiB on disk ({args.dtype}); model in memory: {size / 2**20:.0f} MiB")
    print(f"peak host memory growth while loading: {peak / 2**20:.0f} MiB = {ratio:.3f}x the model")
    print(f"resident after loading: {resident / 2**20:.0f} MiB = {resident / size:.3f}x the model")
    if ratio > args.max_ratio:
        print(f"FAIL: peak {ratio:.3f}x exceeds {args.max_ratio}x")
        sys.exit(1)


if __name__ == "__main__":
    main()
