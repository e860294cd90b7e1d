"""Is a person's profile consistent, and have their preferences drifted? Judged by a trained model.

Works on any per-user preference model (``nps.models.interface``; NP-BTL reward models and NP-DPO
policies): ``context_latent(episodes) -> z [B, d]`` (z from each task's context pairs, the
mean of q(z | C) for a variational encoder) and ``target_log_odds(episodes, z) -> [B, T]``. A
profile's N answers are given as two option pytrees with leading axis N, ``chosen`` and
``rejected``, in the model's own form: feature arrays [N, D] for a reward model (the synthetic
tasks need no text), a policy's ``PolicyOptions`` for NP-DPO (``SteeringRun.pair_options``).

- **Leave-one-out**: for every answer i, p_i = p(y_i | the other answers), the posterior
  predictive probability of what the person answered given the rest of the profile:

      p_i = Σ_m w_m p(y_i | z_m),   w_m ∝ Π_{k ≠ i} p(y_k | z_m)   over the z_m that did not read y_i,

  a posterior over z on proposals from the model's own encoder: z of all answers but one (the
  plain leave-one-out z) and z of random halves of the profile. An encoder trained on consistent
  users reads a context with a mistaken answer as evidence for another user, so the plain z of the
  rest is thrown off by every other mistake in it; the weights keep the z's that explain the rest
  (measured in docs/results.md). Every z comes from a mask over one fixed context capacity
  (``context_capacity``: the next multiple of 8 ≥ N), vmapped with the masks: one compiled program
  serves every profile of a capacity bucket. Answers with p_i below ``implausible_below`` are listed.
  A profile longer than a block (``block_size``: the context the model was trained on plus the
  answer left out, in its capacity bucket) is checked block by block, each block of consecutive
  answers as a profile of its own: an encoder never reads a context much larger than any it was
  trained on, and time and memory grow linearly with the answers (a whole-profile table grows with
  their square: 1,000 answers asked for 1.37 TB).
- **The same pair answered both ways**, and a **position bias**: an exact two-sided binomial test
  of the number of "first" (left) choices among the answers whose display position was recorded.
- **Drift**: for a split k of the last ``window`` answers into earlier ones E and recent ones R,

      T(k) = Σ_{i ∈ E} log p(y_i | z(E)) + Σ_{i ∈ R} log p(y_i | z(R)) − Σ_i log p(y_i | z(E ∪ R)),

  the log-likelihood ratio of two preferences (a z inferred from the earlier answers, another
  from the recent ones) against one z for all of them: large when the recent answers are better
  explained by a z of their own. The statistic is max_k T(k) over splits that leave
  ``min_segment`` answers on each side, and the split that attains it is where the drift starts. Its p-value is a
  permutation test: under no drift the answers are exchangeable, so the statistic of randomly
  reordered profiles is its null distribution. Permutations run in batches and stop once enough
  of them reach the observed statistic that drift can no longer be flagged (Besag & Clifford's
  sequential p-value, valid at every stopping point), so profiles without drift cost a few batches.

``check_profile_file`` is `nps profile check`: a profile file judged by a trained run (steering or hh-dpo).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.data.episodes import Episodes, context_capacity
from nps.data.profiles import PAIR_FIELDS, read_profile
from nps.errors import ConfigError
from nps.files import atomic_write_json, file_sha256
from nps.models.interface import PerUserPreferenceModel, check_model
from nps.steering_run import SteeringRun
from nps.workflow.ab import SCORER_EPISODES, load_reward_scorer, scorer_of_checkpoint

SUBSETS = 64  # random halves of a profile whose z's the leave-one-out posterior weighs
ORDERS_PER_BATCH = 8  # permuted orders whose latents are computed in one compiled call
PAIRS_PER_CALL = 512  # (latent, answer) log-likelihoods per compiled call


def _num_rows(tree: Any) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _padded(tree: Any, capacity: int) -> Any:
    """Rows [N, ...] -> [capacity, ...], padded with copies of the first row (masked out wherever
    used, and finite, unlike zeros through a language model)."""
    return jax.tree.map(lambda x: jnp.concatenate([jnp.asarray(x), jnp.repeat(jnp.asarray(x)[:1],
                                                   capacity - x.shape[0], axis=0)]), tree)


def _tasks(chosen: Any, rejected: Any, context_mask: jax.Array, target_chosen: Any, target_rejected: Any) -> Episodes:
    """Tasks [B] that share one context table: chosen / rejected [C, ...], context_mask [B, C],
    targets [B, T, ...]. The fields no prediction reads (users, which targets are in the context) are placeholders."""
    batch, targets = jax.tree.leaves(target_chosen)[0].shape[:2]
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape)), tree)  # noqa: E731
    return Episodes(broadcast(chosen), broadcast(rejected), context_mask, target_chosen, target_rejected,
                    jnp.ones((batch, targets), bool), jnp.zeros((batch, targets), bool),
                    jnp.zeros((batch,), jnp.int32), jnp.ones((batch, 1)))


# -- leave-one-out ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _log_likelihood_table(graphdef, state, chosen, rejected, masks):
    """log p(recorded choice of every answer | z of mask m) [M, C], masks [M, C] over the answers [C, ...]."""
    model = nnx.merge(graphdef, state)
    everyone = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

    def under(mask):
        task = _tasks(chosen, rejected, mask[None], everyone(chosen), everyone(rejected))
        return jax.nn.log_sigmoid(model.target_log_odds(task, model.context_latent(task))[0])

    return jax.vmap(under)(masks)


def proposal_masks(count: int, subsets: int = SUBSETS, seed: int = 0) -> np.ndarray:
    """The contexts whose z the leave-one-out posterior weighs [capacity + subsets, capacity]: all
    answers but one (one row per slot), then ``subsets`` random halves of the ``count`` answers."""
    capacity = context_capacity(count)
    masks = np.zeros((capacity + subsets, capacity), bool)
    masks[:capacity, :count] = True
    masks[np.arange(capacity), np.arange(capacity)] = False
    rng = np.random.default_rng(seed)
    for row in range(capacity, capacity + subsets):
        masks[row, rng.choice(count, count // 2, replace=False)] = True
    return masks


def block_size(trained_context: int) -> int:
    """The most answers the leave-one-out reads together: a context as large as the model's largest in
    training (``EpisodeSpec.max_context``) plus the answer left out, rounded up to its capacity bucket."""
    return context_capacity(trained_context + 1)


def leave_one_out(model: PerUserPreferenceModel, chosen: Any, rejected: Any, *, trained_context: int,
                  subsets: int = SUBSETS, seed: int = 0) -> np.ndarray:
    """p [N]: each recorded choice's posterior predictive probability given the other answers of its
    block (the module's docstring has the posterior): all N − 1 others when N ≤ ``block_size``.

    chosen, rejected: option pytrees with leading axis N (N ≥ 1; with N = 1 the context is empty).
    ``trained_context``: the largest context the model was trained on; longer profiles are cut into
    blocks of consecutive answers of near-equal sizes, at most ``block_size(trained_context)`` each.
    ``subsets`` random halves of a block (fixed by ``seed``) propose z's beside its plain
    leave-one-out ones.
    """
    check_model(model, PerUserPreferenceModel)
    count = _num_rows(chosen)
    graphdef, state = nnx.split(model)
    probabilities = np.empty(count)
    for block in np.array_split(np.arange(count), max(1, -(-count // block_size(trained_context)))):
        start, stop = block[0], block[-1] + 1
        answers = [jax.tree.map(lambda x: x[start:stop], tree) for tree in (chosen, rejected)]
        probabilities[start:stop] = _block_leave_one_out(graphdef, state, *answers, subsets, seed)
    return probabilities


def _block_leave_one_out(graphdef, state, chosen: Any, rejected: Any, subsets: int, seed: int) -> np.ndarray:
    """``leave_one_out`` of answers that form one block."""
    count = _num_rows(chosen)
    masks = proposal_masks(count, subsets, seed)
    capacity = masks.shape[1]
    log_likelihood = np.asarray(_log_likelihood_table(graphdef, state, _padded(chosen, capacity),
                                                      _padded(rejected, capacity), jnp.asarray(masks)),
                                np.float64)[:, :count]  # [M, N]
    # Each z's evidence from every answer but i, and only the z's that did not read answer i.
    evidence = np.where(masks[:, :count], -np.inf, log_likelihood.sum(axis=1, keepdims=True) - log_likelihood)
    weights = np.exp(evidence - evidence.max(axis=0, keepdims=True))
    return np.sum(weights * np.exp(log_likelihood), axis=0) / np.sum(weights, axis=0)


# -- drift ------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _segment_latents(graphdef, state, chosen, rejected, masks):
    """z [M, d] of the answers selected by each of M masks [M, C] over the answers [C, ...]."""
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (masks.shape[0], *x.shape)), tree)  # noqa: E731
    contexts = Episodes(broadcast(chosen), broadcast(rejected), masks, None, None, None, None, None, None)
    return nnx.merge(graphdef, state).context_latent(contexts)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_log_likelihoods(graphdef, state, chosen, rejected, latents, latent_index, answer_index):
    """log p(recorded choice of answer ``answer_index[s]`` | z = ``latents[latent_index[s]]``) [S]."""
    target = lambda tree: jax.tree.map(lambda x: x[answer_index][:, None], tree)  # noqa: E731
    targets = Episodes(None, None, None, target(chosen), target(rejected), jnp.ones((answer_index.shape[0], 1), bool),
                       None, None, None)
    log_odds = nnx.merge(graphdef, state).target_log_odds(targets, latents[latent_index])
    return jax.nn.log_sigmoid(log_odds[:, 0])


@dataclasses.dataclass(frozen=True)
class Drift:
    """The drift test of one profile.

    statistic: max over splits of T(k) for the recorded order (None: too few answers to split).
    p_value: the permutation p-value of ``statistic``. change_at: the index (0-based, in the
    profile) of the first recent answer at the best split. split_statistics: T(k) per split,
    ``{index of the first recent answer: T}``. analysed: how many of the last answers were tested.
    """

    statistic: float | None
    p_value: float | None
    change_at: int | None
    flagged: bool
    threshold: float
    permutations: int
    analysed: int
    min_segment: int
    split_statistics: dict[int, float]

    @property
    def needed(self) -> int:
        """Answers needed before drift can be tested."""
        return 2 * self.min_segment


class _SplitStatistics:
    """T(k) of many orders of the same n answers: each segment's latent from its mask over one
    context table, then each answer's log-likelihood under its own segment's latent."""

    def __init__(self, model, chosen: Any, rejected: Any, min_segment: int):
        self.count = _num_rows(chosen)
        self.capacity = context_capacity(self.count)
        self.graphdef, self.state = nnx.split(model)
        self.chosen, self.rejected = _padded(chosen, self.capacity), _padded(rejected, self.capacity)
        self.splits = np.arange(min_segment, self.count - min_segment + 1)  # k: the number of earlier answers
        everyone = np.zeros((ORDERS_PER_BATCH * context_capacity(len(self.splits)) * 2, self.capacity), bool)
        everyone[:, : self.count] = True  # the shape of a batch's masks: no program of its own
        latents = self._latents(everyone)
        self.one_latent = self._log_likelihoods(latents, np.zeros(self.count, np.int64), np.arange(self.count)).sum()

    def _latents(self, masks: np.ndarray) -> jax.Array:
        return _segment_latents(self.graphdef, self.state, self.chosen, self.rejected, jnp.asarray(masks))

    def _log_likelihoods(self, latents: jax.Array, latent_index: np.ndarray, answer_index: np.ndarray) -> np.ndarray:
        """log p(answer_index[s]'s recorded choice | latents[latent_index[s]]) [S], in fixed-size calls."""
        values = np.empty(len(latent_index))
        for start in range(0, len(latent_index), PAIRS_PER_CALL):
            stop = min(start + PAIRS_PER_CALL, len(latent_index))
            latent_batch, answer_batch = np.zeros(PAIRS_PER_CALL, np.int64), np.zeros(PAIRS_PER_CALL, np.int64)
            latent_batch[: stop - start] = latent_index[start:stop]
            answer_batch[: stop - start] = answer_index[start:stop]
            batch = _answer_log_likelihoods(self.graphdef, self.state, self.chosen, self.rejected, latents,
                                            jnp.asarray(latent_batch), jnp.asarray(answer_batch))
            values[start:stop] = np.asarray(batch)[: stop - start]
        return values

    def __call__(self, orders: np.ndarray) -> np.ndarray:
        """orders [O, n] (O ≤ ORDERS_PER_BATCH, each a permutation of 0..n-1) -> T [O, K]."""
        count, capacity, splits = self.count, self.capacity, self.splits
        num_orders = orders.shape[0]
        ranks = np.full((ORDERS_PER_BATCH, capacity), capacity, np.int64)  # padding rows rank past every split
        ranks[np.arange(num_orders)[:, None], orders] = np.arange(count)
        slots = context_capacity(len(splits))  # splits padded to a bucket too: one compiled shape per bucket
        split_at = np.full(slots, capacity)
        split_at[: len(splits)] = splits
        earlier = ranks[:, None, :] < split_at[None, :, None]  # [O, S splits, C answers]
        recent = (ranks[:, None, :] >= split_at[None, :, None]) & (ranks[:, None, :] < count)
        latents = self._latents(np.stack([earlier, recent], axis=2).reshape(-1, capacity))  # [O·S·2, d]
        # Every answer of every real (order, split) under its own segment's latent.
        order_ids, split_ids, answer_ids = np.nonzero(np.ones((num_orders, len(splits), count), bool))
        side = ~earlier[order_ids, split_ids, answer_ids]
        log_likelihood = self._log_likelihoods(latents, (order_ids * slots + split_ids) * 2 + side, answer_ids)
        statistics = np.zeros((num_orders, len(splits)))
        np.add.at(statistics, (order_ids, split_ids), log_likelihood)
        return statistics - self.one_latent


# The p-value at which drift and position bias are flagged. Both tests are exact (a permutation
# p-value, a binomial one), so a stable user is flagged with probability at most this; at 0.05 the
# measured false-alarm rate sat on the 5 % a study can tolerate (6.2 ± 1.0 % of 600 simulated
# stable users), so the default keeps a margin below it (docs/results.md, `nps reproduce consistency`).
ALERT_THRESHOLD = 0.04


def drift_test(
    model: PerUserPreferenceModel, chosen: Any, rejected: Any, *, threshold: float = ALERT_THRESHOLD,
    min_segment: int = 3, window: int = 24, permutations: int = 99, stop_after: int | None = None, seed: int = 0,
) -> Drift:
    """Whether the recent answers are better explained by their own z than by the earlier answers' z.

    chosen, rejected: option pytrees with leading axis N, in the order answered. The last
    ``window`` answers are tested (older ones are ignored); splits keep ``min_segment`` answers
    on each side. ``permutations``: the most random orders drawn; drawing stops once ``stop_after``
    of them reach the observed statistic. The default, ⌊threshold · permutations⌋ + 1, stops only
    once the complete test could no longer flag drift (and then p = stop_after / drawn > threshold),
    so the verdict is always the complete test's. ``seed`` fixes the orders: the same profile gives
    the same result. Flagged when p ≤ ``threshold``.
    """
    check_model(model, PerUserPreferenceModel)
    if stop_after is None:
        stop_after = int(threshold * permutations) + 1
    if min_segment < 1:
        raise ValueError(f"min_segment={min_segment} must be at least 1")
    total = _num_rows(chosen)
    analysed = min(total, window)
    start = total - analysed
    empty = Drift(None, None, None, False, threshold, 0, analysed, min_segment, {})
    if analysed < 2 * min_segment:
        return empty
    recent = lambda tree: jax.tree.map(lambda x: x[start:], tree)  # noqa: E731
    statistics_of = _SplitStatistics(model, recent(chosen), recent(rejected), min_segment)
    rng = np.random.default_rng(seed)
    observed_splits = statistics_of(np.arange(analysed)[None])[0]
    observed = float(observed_splits.max())
    exceed, drawn = 0, 0
    while drawn < permutations and exceed < stop_after:
        size = min(ORDERS_PER_BATCH, permutations - drawn)
        orders = np.stack([rng.permutation(analysed) for _ in range(size)])
        for value in statistics_of(orders).max(axis=1):
            drawn += 1
            exceed += bool(value >= observed)
            if exceed == stop_after:
                break
    p_value = exceed / drawn if exceed == stop_after else (exceed + 1) / (drawn + 1)
    best = int(statistics_of.splits[int(np.argmax(observed_splits))])
    return Drift(observed, float(p_value), start + best, p_value <= threshold, threshold, drawn, analysed,
                 min_segment, {start + int(k): float(t) for k, t in zip(statistics_of.splits, observed_splits)})


# -- answers given both ways, position bias --------------------------------------------------------
def contradictions(pairs: Sequence[dict[str, str]]) -> list[tuple[int, int]]:
    """(i, j), i < j: answers to the same prompt and responses with opposite choices."""
    seen: dict[tuple[str, str, str], list[int]] = {}
    found = []
    for j, pair in enumerate(pairs):
        for i in seen.get((pair["prompt"], pair["rejected"], pair["chosen"]), []):
            found.append((i, j))
        seen.setdefault((pair["prompt"], pair["chosen"], pair["rejected"]), []).append(j)
    return found


class PositionBias(NamedTuple):
    """How often the first (left) response was chosen among ``answered`` answers with a recorded
    position, and the exact two-sided binomial p-value against ½ (None when none was recorded)."""

    first: int
    answered: int
    p_value: float | None
    flagged: bool


def position_bias(positions: Sequence[str | None], threshold: float = ALERT_THRESHOLD) -> PositionBias:
    """positions: per answer "first", "second" or None (not recorded, e.g. a hand-written profile)."""
    from scipy.stats import binomtest

    recorded = [p for p in positions if p in ("first", "second")]
    first = sum(p == "first" for p in recorded)
    if not recorded:
        return PositionBias(0, 0, None, False)
    p_value = float(binomtest(first, len(recorded), 0.5).pvalue)
    return PositionBias(first, len(recorded), p_value, p_value <= threshold)


# -- the whole report -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConsistencyReport:
    """One profile's checks. ``plausibility``: the leave-one-out p of each answer, in profile order;
    ``implausible``: indices of answers with p < ``implausible_below``, least plausible first."""

    pairs: list[dict[str, str]]
    plausibility: list[float]
    implausible_below: float
    contradictions: list[tuple[int, int]]
    position: PositionBias
    drift: Drift

    @property
    def implausible(self) -> list[int]:
        low = [i for i, p in enumerate(self.plausibility) if p < self.implausible_below]
        return sorted(low, key=lambda i: self.plausibility[i])

    @property
    def agreement(self) -> float | None:
        """Share of answers the rest of the profile predicts (p ≥ ½)."""
        return float(np.mean(np.asarray(self.plausibility) >= 0.5)) if self.plausibility else None

    def to_json(self) -> dict[str, Any]:
        return {
            "answers": len(self.pairs),
            "agreement": self.agreement,
            "leave_one_out": [pair | {"answer": i + 1, "probability": p}
                              for i, (pair, p) in enumerate(zip(self.pairs, self.plausibility))],
            "implausible_below": self.implausible_below,
            "implausible": [i + 1 for i in self.implausible],
            "answered_both_ways": [[i + 1, j + 1] for i, j in self.contradictions],
            "position": self.position._asdict(),
            "drift": dataclasses.asdict(self.drift) | {
                "change_at": None if self.drift.change_at is None else self.drift.change_at + 1,
                "split_statistics": {str(k + 1): v for k, v in self.drift.split_statistics.items()}},
            "numbering": "answers are numbered from 1 in profile order (skips not counted)",
        }


def check_profile(
    model: PerUserPreferenceModel, pairs: Sequence[dict[str, str]], chosen: Any, rejected: Any,
    positions: Sequence[str | None] | None = None, *, trained_context: int, implausible_below: float = 0.2,
    threshold: float = ALERT_THRESHOLD, **drift_settings,
) -> ConsistencyReport:
    """Every check of one profile: ``pairs`` (prompt/chosen/rejected, for the report), their options
    ``chosen`` / ``rejected`` as the model reads them (leading axis N = len(pairs); None when N = 0), and the display
    position of each choice where recorded. ``trained_context``: the largest context the model was
    trained on (``leave_one_out``). ``drift_settings``: ``drift_test``'s keywords."""
    check_model(model, PerUserPreferenceModel)
    if pairs and len(pairs) != _num_rows(chosen):
        raise ValueError(f"{len(pairs)} pairs but {_num_rows(chosen)} option rows")
    plausibility = leave_one_out(model, chosen, rejected, trained_context=trained_context).tolist() if pairs else []
    drift = drift_test(model, chosen, rejected, threshold=threshold, **drift_settings) if pairs else Drift(
        None, None, None, False, threshold, 0, 0, drift_settings.get("min_segment", 3), {})
    return ConsistencyReport(list(pairs), plausibility, implausible_below, contradictions(pairs),
                             position_bias(positions or [None] * len(pairs), threshold), drift)


def format_report(report: ConsistencyReport, name: str = "profile") -> str:
    """The report as the CLI prints it: one line per finding, answers numbered from 1."""
    lines = [f"{name}: {len(report.pairs)} answers"]
    if report.pairs:
        lines.append(f"the rest of the profile predicts {100 * report.agreement:.0f} % of the answers (leave-one-out)")
    if report.implausible:
        lines.append(f"implausible answers (leave-one-out p < {report.implausible_below:g}):")
        for i in report.implausible:
            pair = report.pairs[i]
            lines.append(f"  #{i + 1} p = {report.plausibility[i]:.3f}: {pair['prompt']!r}: chose {pair['chosen']!r} "
                         f"over {pair['rejected']!r}")
    else:
        lines.append(f"no implausible answers (every leave-one-out p ≥ {report.implausible_below:g})")
    for i, j in report.contradictions:
        lines.append(f"answered both ways: #{i + 1} and #{j + 1} ({report.pairs[i]['prompt']!r})")
    position = report.position
    if position.answered:
        verdict = "a position bias" if position.flagged else "no position bias"
        lines.append(f"first (left) response chosen {position.first} of {position.answered} times: "
                     f"binomial p = {position.p_value:.3f}, {verdict}")
    else:
        lines.append("position bias: not tested (no display positions recorded in this profile)")
    drift = report.drift
    if drift.statistic is None:
        lines.append(f"drift: not tested (needs {drift.needed} answers)")
    elif drift.flagged:
        lines.append(f"DRIFT: the answers from #{drift.change_at + 1} on fit another preference better "
                     f"(statistic {drift.statistic:.2f}, permutation p = {drift.p_value:.3f} ≤ {drift.threshold:g})")
    else:
        lines.append(f"no drift: statistic {drift.statistic:.2f}, permutation p = {drift.p_value:.3f} "
                     f"(> {drift.threshold:g}; last {drift.analysed} answers, {drift.permutations} permutations)")
    return "\n".join(lines)


def check_profile_file(profile: str, run: str, *, model: str = "np_dpo", threshold: float = ALERT_THRESHOLD,
                       implausible_below: float = 0.2, permutations: int = 99, window: int = 24, min_segment: int = 3,
                       json_path: str | None = None, echo=print) -> None:
    """`nps profile check`: every check of the profile at ``profile`` (its answers; skips left out) by the
    run at ``run`` (steering or hh-dpo): a conditioned policy (``model="np_dpo"``, ``"vpl_dpo"``) or a reward
    scorer that `nps ab --scorer KIND` trained (``"np_btl_reward"``, ``"vpl_reward"``, ...). Echoes the
    report; ``json_path``: also writes it there, with the hashes of its inputs."""
    for name, value in (("threshold", threshold), ("implausible_below", implausible_below)):
        if not 0 < value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be between 0 and 1")
    for name, value in (("permutations", permutations), ("window", window), ("min_segment", min_segment)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be at least 1")
    records = [r for r in read_profile(profile) if r.get("choice") != "skip"]
    if not records:
        raise ConfigError(f"{profile}: the profile has no answered pairs; nothing to check")
    pairs = [{field: r[field] for field in PAIR_FIELDS} for r in records]
    scorer = scorer_of_checkpoint(model)
    loaded = SteeringRun.load(run, "np_dpo" if scorer else model)
    if scorer:
        checked, trained_context = load_reward_scorer(loaded, scorer), SCORER_EPISODES.max_context
    elif loaded.conditioned:
        checked, trained_context = loaded.policy, loaded.episodes.max_context
    else:
        raise ConfigError(f"--model {model} takes no user; check with np_dpo or np_btl_reward")
    try:  # the model's options of each answer: features for a reward scorer, token rows for the policy
        if scorer:
            prompts = [p["prompt"] for p in pairs]
            chosen = loaded.option_features(prompts, [p["chosen"] for p in pairs])
            rejected = loaded.option_features(prompts, [p["rejected"] for p in pairs])
        else:
            chosen, rejected = loaded.pair_options(pairs)
    except ConfigError as error:
        raise ConfigError(f"{profile}: {error}") from None
    report = check_profile(checked, pairs, chosen, rejected, [r.get("position") for r in records],
                           trained_context=trained_context, implausible_below=implausible_below, threshold=threshold,
                           permutations=permutations, window=window, min_segment=min_segment)
    echo(format_report(report, profile))
    if json_path:
        inputs = {"profile": str(Path(profile).absolute()), "profile_sha256": file_sha256(profile),
                  "run": str(Path(run).absolute()), "model": model, "run_fingerprint": loaded.fingerprint}
        atomic_write_json(json_path, inputs | report.to_json())
