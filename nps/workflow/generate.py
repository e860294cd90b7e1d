"""`nps generate`: responses of a trained run's policy (steering or hh-dpo), steered by a user, by an explicit
z, or along the line between two users.

    nps generate --run runs/steering --prompt "physics cooking" [--context ALICE.jsonl [--toward BOB.jsonl]]
                 [--z-file Z.json] [--samples 1] [--temperature T] [--seed 0]

Each point is a z: the user of ``--context`` (none: N^C = 0), ``--points`` points on the line from it
to the user of ``--toward``, or the z of ``--z-file`` (a JSON list of the policy's latent size).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nps.data.profiles import read_pairs
from nps.errors import ConfigError
from nps.latent import interpolate
from nps.steering_run import SteeringRun


def read_z_file(path: str | Path, run: SteeringRun) -> jax.Array:
    """z [d] from a JSON list of ``run``'s latent size of finite numbers; one that lies far outside the
    range where the encoder puts the run's users is used, with a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a JSON list of numbers ({exc})") from None
    latent_dim = run.policy.config.encoder.latent_dim
    if not (isinstance(values, list) and len(values) == latent_dim and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ConfigError(f"{path}: z must be a JSON list of {latent_dim} numbers (this policy's latent "
                          f"size), not {json.dumps(values)[:60]}")
    z = jnp.asarray(np.asarray(values, np.float32))
    if not bool(jnp.all(jnp.isfinite(z))):
        raise ConfigError(f"{path}: z has non-finite values (NaN or inf); write a list of finite numbers")
    low, high = run.latent_range()
    extreme = float(z[jnp.argmax(jnp.abs(z))])
    if not low - (high - low) <= extreme <= high + (high - low):
        warnings.warn(f"{path}: z reaches {extreme:.3g}, far outside [{low:.3g}, {high:.3g}] where the "
                      "encoder puts the run's users: expect responses unlike any user's (empty or degenerate)")
    return z


def steering_points(run: SteeringRun, *, context: str | None = None, toward: str | None = None, points: int = 5,
                    z_file: str | None = None) -> list[tuple[str, jax.Array | None]]:
    """The z's to generate for, each with the line that names it (see the module's docstring)."""
    if z_file:
        return [("z from " + z_file, read_z_file(z_file, run))]
    z = run.encode_user(read_pairs(context) if context else [])
    if not toward:
        return [(f"user of {context}" if context else "no context (N^C = 0)", z)]
    if z is None:
        raise ConfigError(f"--toward needs a conditioned policy; {run.model_name} takes no user")
    weights = np.linspace(0.0, 1.0, points)
    line = interpolate(z, run.encode_user(read_pairs(toward)), weights)
    return [(f"w = {w:.2f} toward {toward}", point) for w, point in zip(weights, line)]


def generate_steered(run: str | Path, prompt: list[str], *, model: str = "np_dpo", context: str | None = None,
                     toward: str | None = None, points: int = 5, z_file: str | None = None, samples: int = 1,
                     temperature: float | None = None, seed: int = 0, echo: Callable[[str], None] = print) -> None:
    """`nps generate`: for each point, ``samples`` responses to every prompt, echoed as "prompt => response"
    under a "# point" line; responses the policy ended at once are counted in a warning."""
    for flag, count, least in (("--samples", samples, 1), ("--points", points, 2)):
        if count < least:
            raise ConfigError(f"{flag} {count} must be at least {least}")
    if z_file and (context or toward):
        raise ConfigError("--z-file replaces --context/--toward; pass one or the other")
    loaded = SteeringRun.load(run, model)
    loaded.sampling(temperature)  # a temperature it cannot sample with is refused before anything is printed
    steered = steering_points(loaded, context=context, toward=toward, points=points, z_file=z_file)
    empty = 0
    for label, z in steered:
        echo(f"# {label}")
        for sample in range(samples):
            replies = loaded.generate(prompt, z, seed=seed + sample, temperature=temperature)
            for text, reply in zip(prompt, replies):
                echo(f"{text} => {reply}")
                empty += not reply
    if empty:
        warnings.warn(f"{empty} of {len(steered) * samples * len(prompt)} responses are empty (the policy "
                      "ended them at once)")
