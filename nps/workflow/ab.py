"""`nps ab`: a personalised policy against a baseline, for a set of user profiles, scored per user.

    nps ab --run runs/steering --profile detail=alice.jsonl --profile caution=bob.jsonl \\
        --prompts prompts.txt [--baseline base | --baseline RUN_DIR[:MODEL]] [--samples 4] [--out ab]

For every profile the personalised policy is conditioned on the profile's pairs (z from its
context encoder) and generates ``samples`` responses per prompt; the baseline generates for the
same prompts and seeds: the unconditioned base model, or another run's policy (conditioned on
the same profile when it takes a user). Both are scored by a reward model: ``--scorer oracle``,
the profile's user type's true reward (the steering language's per-user oracle; only a steering run has
one), or a per-user reward model conditioned on the profile's own pairs, trained once on the run's
preference pairs and its option features and kept in its checkpoints (its unseen-pair accuracy is in the
report): ``--scorer np_btl`` (NP-BTL), or a peer method's (``vpl``, ``pal-a``, ``pal-b``, ``lore``;
``REWARD_SCORERS``), any ``nps.models.interface.PerUserRewardModel``. Any trained policy run takes part
(``nps.steering_run``): a steering run or an hh-dpo run. A generation wins when it scores higher
(a tie counts ½). Reported per user type and per profile:
the win rate, mean ± standard error over generations, and both mean rewards; written as ab.json
(with the hashes of every input, so the numbers can be reproduced), ab.md and ab.png.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from nps.config import config_to_dict
from nps.data.episodes import EpisodeSpec
from nps.data.profiles import read_pairs
from nps.errors import ConfigError
from nps.files import atomic_write_json, atomic_write_text, file_sha256, read_text
from nps.models.interface import PerUserRewardModel, check_model, context_latents
from nps.models.peers import LoReConfig, PALConfig, VPLConfig, told_the_run
from nps.models.reward import UF_NP_BTL, build_reward_model
from nps.results import ExperimentRun, save_figure
from nps.steering_run import SteeringRun, load_baseline, trained_user_types
from nps.train.evaluate import EvalConfig, mean_and_sem, pairwise_wins, win_rate
from nps.train.loop import TrainConfig, load_trained


def parse_profiles(items: list[str], user_types: Sequence[str]) -> list[tuple[str, Path]]:
    """``USER_TYPE=PATH`` arguments, USER_TYPE one of the run's ``user_types``: the user type whose
    reward scores this user (and the group its win rate is reported in)."""
    profiles = []
    for item in items:
        user_type, sep, path = item.partition("=")
        if not sep or user_type not in user_types:
            raise ConfigError(f"--profile {item!r}: write USER_TYPE=PATH with USER_TYPE one of "
                              f"{list(user_types)} (the reward that scores this user)")
        profiles.append((user_type, Path(path)))
    if not profiles:
        raise ConfigError("pass at least one --profile USER_TYPE=PATH")
    return profiles


def read_prompts(path: str | Path, codec) -> list[str]:
    """The prompts of ``path``, one per line, each one ``codec`` can template."""
    prompts = [line.strip() for line in read_text(path, "prompts, one per line").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts; write one per line")
    for number, prompt in enumerate(prompts, start=1):
        codec.prompt_ids(prompt, f"{path}:{number}")
    return prompts


NP_BTL_SCORER_CONFIG = dataclasses.replace(UF_NP_BTL, encoder=dataclasses.replace(UF_NP_BTL.encoder,
                                                                                   attention_dropout=0.0))
# ``--scorer KIND``: the per-user reward models a profile can be scored by, each with its release's
# defaults (GPO has no reward per option: its targets attend to the context, so it is not one).
REWARD_SCORERS = {
    "np_btl": ("NP-BTL", NP_BTL_SCORER_CONFIG),
    "vpl": ("VPL", VPLConfig()),
    "pal-a": ("PAL-A", PALConfig(kind="pal-a")),
    "pal-b": ("PAL-B", PALConfig(kind="pal-b")),
    "lore": ("LoRe", LoReConfig()),
}
SCORER_EPISODES = EpisodeSpec()  # the tasks a scorer trains on (its largest context: max_context)


def scorer_checkpoint(kind: str) -> str:
    """The folder under the run's checkpoints/ that the ``kind`` scorer trains into (``np_btl_reward``)."""
    return f"{kind.replace('-', '_')}_reward"


def scorer_of_checkpoint(name: str) -> str | None:
    """The scorer kind whose checkpoint folder is ``name`` (``vpl_reward`` -> ``vpl``); None for another name."""
    return next((kind for kind in REWARD_SCORERS if scorer_checkpoint(kind) == name), None)


def check_scorer(scorer: str) -> None:
    """Refuse an unknown ``--scorer`` in one line naming the known ones."""
    if scorer != "oracle" and scorer not in REWARD_SCORERS:
        raise ConfigError(f"--scorer {scorer!r}: use 'oracle' or one of {list(REWARD_SCORERS)}")


def scorer_config(run: SteeringRun, kind: str):
    """The ``kind`` scorer's model config for ``run``: its defaults, told the run's user types (PAL's and
    LoRe's user tables) and the training rate (PAL's rates are relative to it)."""
    return told_the_run(REWARD_SCORERS[kind][1], len(run.user_types), TrainConfig().learning_rate)


def reward_scorer(run: SteeringRun, run_dir: Path, kind: str, steps: int):
    """The ``kind`` reward model on the run's preference pairs (features: the run's option features),
    trained once into ``run_dir/checkpoints/<kind>_reward`` (resumed after); returns
    ``score(pairs, prompts, responses) -> rewards [N]`` for the user of ``pairs`` and its results."""
    config, name = scorer_config(run, kind), scorer_checkpoint(kind)
    scorer_run = ExperimentRun(name, config, run_dir, EvalConfig(num_tasks=500), progress=False)
    fit, entry = scorer_run.fit_and_evaluate_reward_model(
        name, config, run.feature_pools(), data_identity=run.data.identity,
        train=TrainConfig(steps=steps, eval_every=min(50, steps), checkpoint_every=min(50, steps)),
        episodes=SCORER_EPISODES, user_names=list(run.user_types))
    model = fit.model()

    def score(pairs, prompts, responses):
        z = context_latents(model, *run.pair_features(pairs))
        return np.asarray(model.reward(jnp.asarray(run.option_features(prompts, responses))[None], z)[0])

    return score, entry


def load_reward_scorer(run: SteeringRun, kind: str) -> PerUserRewardModel:
    """The ``kind`` reward model that ``nps ab --scorer KIND`` trained for this run (never trains one)."""
    config = scorer_config(run, kind)
    directory = run.directory / "checkpoints" / scorer_checkpoint(kind)
    if not directory.exists():
        raise ConfigError(f"{directory}: no {REWARD_SCORERS[kind][0]} reward model in this run; train it once with "
                          f"`nps ab --run {run.directory} --scorer {kind} --profile ... --prompts ...`")
    train = TrainConfig()
    model = build_reward_model(run.embedder.dim, config, seed=train.seed)
    check_model(model, PerUserRewardModel)
    return load_trained(model, directory, train, run_config={"model": config_to_dict(config),
                                                            "data": run.data.identity})


def run_ab(run_dir: str | Path, profiles: list[tuple[str, Path]], prompts_path: str | Path, out: str | Path, *,
           model: str = "np_dpo", baseline: str = "base", samples: int = 4, seed: int = 0, scorer: str = "oracle",
           scorer_steps: int = 1000) -> dict[str, Any]:
    if samples < 1:
        raise ConfigError(f"--samples {samples} must be at least 1")
    check_scorer(scorer)
    run = SteeringRun.load(run_dir, model)
    prompts = read_prompts(prompts_path, run.codec)
    oracle = getattr(run.codec, "user_reward", None)
    if scorer == "oracle" and oracle is None:
        raise ConfigError(f"--scorer oracle: a {run.experiment} run has no true reward per user type; "
                          "score with a reward model conditioned on the profile: "
                          f"--scorer {' | '.join(REWARD_SCORERS)}")
    baseline_name, baseline_run = load_baseline(baseline)
    scorer_entry = None
    if scorer != "oracle":
        score_by_model, scorer_entry = reward_scorer(run, Path(run_dir), scorer, scorer_steps)
    asked = prompts * samples
    per_profile, wins_by_type, rewards_by_type = [], {}, {}
    for user_type, path in profiles:
        pairs = read_pairs(path, allow_empty=False)
        personalised = run.generate(asked, run.encode_user(pairs), seed=seed)
        if baseline_run is None:
            reference = run.generate(asked, seed=seed, base=True)
        else:
            reference = baseline_run.generate(asked, baseline_run.encode_user(pairs), seed=seed)
        if scorer == "oracle":
            ours, theirs = oracle(personalised, user_type), oracle(reference, user_type)
        else:
            ours, theirs = (score_by_model(pairs, asked, responses) for responses in (personalised, reference))
        wins = pairwise_wins(ours, theirs)
        wins_by_type.setdefault(user_type, []).append(wins)
        rewards_by_type.setdefault(user_type, []).append(np.stack([ours, theirs]))
        per_profile.append({"user_type": user_type, "profile": str(path), "profile_sha256": file_sha256(path),
                            "context_pairs": len(pairs), "win_rate": win_rate(ours, theirs),
                            "mean_reward": {"personalised": float(ours.mean()), "baseline": float(theirs.mean())},
                            "example": {"prompt": asked[0], "personalised": personalised[0], "baseline": reference[0]}})
    by_type = {}
    for user_type, wins in wins_by_type.items():
        rewards = np.concatenate(rewards_by_type[user_type], axis=1)
        by_type[user_type] = {"win_rate": mean_and_sem(np.concatenate(wins)),
                              "profiles": len(wins),
                              "mean_reward": {"personalised": float(rewards[0].mean()),
                                              "baseline": float(rewards[1].mean())}}
    report = {
        "inputs": {"run": str(Path(run_dir).absolute()), "model": model, "baseline": baseline_name,
                   "prompts": str(prompts_path), "prompts_sha256": file_sha256(Path(prompts_path)),
                   "samples_per_prompt": samples, "seed": seed,
                   "scorer": "per-user oracle reward" if scorer == "oracle"
                   else f"{REWARD_SCORERS[scorer][0]} conditioned on the profile"},
        "scorer_unseen_accuracy": None if scorer_entry is None else scorer_entry["unseen_accuracy"],
        "by_user_type": by_type,
        "by_profile": per_profile,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ab.json", report)
    atomic_write_text(out / "ab.md", format_markdown(report))
    plot_ab(report, out / "ab.png")
    return report


def ab_command(run: str, profile: list[str], prompts: str, out: str, *, model: str = "np_dpo",
               baseline: str = "base", samples: int = 4, seed: int = 0, scorer: str = "oracle",
               scorer_steps: int = 1000, echo=print) -> None:
    """`nps ab`: ``run_ab`` for ``USER_TYPE=PATH`` profiles, then the report as Markdown and what was written."""
    report = run_ab(run, parse_profiles(profile, trained_user_types(run)), prompts, out, model=model, baseline=baseline,
                    samples=samples, seed=seed, scorer=scorer, scorer_steps=scorer_steps)
    echo(format_markdown(report) + f"\nwrote {out}/ab.json, ab.md, ab.png")


def format_markdown(report: dict[str, Any]) -> str:
    inputs = report["inputs"]
    lines = [f"# A/B: `{inputs['model']}` personalised vs `{inputs['baseline']}`", "",
             f"Run `{inputs['run']}`; {inputs['samples_per_prompt']} samples per prompt of `{inputs['prompts']}`, "
             f"seed {inputs['seed']}; scored by {inputs['scorer']} (a tie counts ½).", "",
             "| user type | profiles | win rate | mean reward: personalised | mean reward: baseline |",
             "|---|---|---|---|---|"]
    for user_type, entry in report["by_user_type"].items():
        rate = entry["win_rate"]
        lines.append(f"| {user_type} | {entry['profiles']} | {100 * rate['mean']:.1f} ± {100 * rate['sem']:.1f} % "
                     f"(n = {rate['num_tasks']}) | {entry['mean_reward']['personalised']:.2f} | "
                     f"{entry['mean_reward']['baseline']:.2f} |")
    lines += ["", "| profile | user type | context pairs | win rate |", "|---|---|---|---|"]
    for entry in report["by_profile"]:
        rate = entry["win_rate"]
        lines.append(f"| `{entry['profile']}` | {entry['user_type']} | {entry['context_pairs']} | "
                     f"{100 * rate['mean']:.1f} ± {100 * rate['sem']:.1f} % |")
    return "\n".join(lines) + "\n"


def plot_ab(report: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(report["by_user_type"])
    rates = [report["by_user_type"][n]["win_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.2))
    ax.bar(names, [100 * r["mean"] for r in rates], yerr=[100 * r["sem"] for r in rates], capsize=4)
    ax.axhline(50, color="grey", linestyle="--")
    ax.set_ylabel(f"win rate vs {report['inputs']['baseline']} [%]")
    ax.set_ylim(0, 100)
    ax.set_title("personalised vs baseline")
    return save_figure(fig, path)
