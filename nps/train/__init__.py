"""Training: ``fit`` (Optax, scanned jit steps, validation, Orbax checkpoints), evaluation, meshes."""
