"""What the preference app does, without the web: ask, record, steer, judge, check, summarise.

``PreferenceService`` holds a trained policy run (``nps.steering_run``: a steering or an hh-dpo run),
a candidate set and a ``Store``. The pages (``nps.serve.app``) call it; tests can call it directly.

- **Questions** are chosen by expected information gain over the run's particles (plausible
  users, ``nps.active``). The particles' choice probabilities for every candidate are computed
  once at start-up (and cached in the store), so choosing the next pair is one small compiled
  call on [P, M] numbers, no model work. Each person's particle weights are kept in memory and
  updated with every answer; they are rebuilt from the profile whenever the file changes.
- **Answers** name their candidate; a second answer to the same candidate is refused (409), so a
  client that retries after a lost reply never records an answer twice. The display order of a
  candidate is seeded by (person, candidate) and the chosen position is recorded. An answer is
  acknowledged only after its line is fsynced.
- **A changed candidate file** (lines added, removed or reordered between restarts) leaves every
  profile readable: an answer given from another candidate set is matched to the current set by
  its prompt and two responses; one whose pair the set no longer holds still counts for z, the
  checks and the export, and is not asked again.
- **z** is inferred from the answered pairs in profile order by the run's context encoder (the
  same call as ``nps generate --context``) and recorded in the store's history with the profile
  hash and the run's fingerprint; the same profile version and run always return the recorded z.
- **Generation** for many people at once is batched (``nps.serve.batching.GenerationBatcher``):
  concurrent Try requests, steered and baseline arms alike, share one compiled decode call, each
  reply sampled with its own seed; a bounded queue refuses more (503) and no request waits longer
  than its timeout. Other model work (z, checks) runs one request at a time (``ModelQueue``): at most
  ``MODEL_QUEUE`` requests wait for it, later ones are told to come back (503), and the Profile
  page's checks read a person's latest ``CHECKED_ANSWERS`` answers, so no request's work or wait
  grows with the number of people or answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from nps.active import (
    log_weights_after,
    next_informative,
    particle_choice_probabilities,
    update_log_weights,
)
from nps.data.profiles import read_candidates
from nps.errors import ConfigError
from nps.files import atomic_write_bytes
from nps.serve.batching import GenerationBatcher, GenerationRequest
from nps.steering_run import SteeringRun, load_baseline
from nps.serve.store import Store, StoreError, profile_hash
from nps.train.evaluate import mean_and_sem
from nps.workflow.consistency import ConsistencyReport, check_profile

CHOICES = ("left", "right", "skip")
VERDICTS = ("first", "second", "tie")
WIN = {"steered": 1.0, "tie": 0.5, "baseline": 0.0}
MAX_OPEN_TRIALS = 8  # blind comparisons a person may have open at once (older ones expire)
MODEL_QUEUE = 16  # requests that may wait for the model at once; more are refused (503) until it frees
CHECKED_ANSWERS = 256  # the Profile page's consistency checks read a person's latest answers, at most this many


@dataclasses.dataclass(frozen=True)
class Question:
    """A candidate as one person sees it: responses in their display order."""

    candidate: int
    prompt: str
    left: str
    right: str
    answered: int
    total: int


@dataclasses.dataclass
class _PersonState:
    signature: tuple[int, int] | None  # (size, mtime) of the profile file when read
    records: list[dict[str, Any]]
    candidates: list[int | None]  # each record's candidate in the current set (None: a pair it no longer holds)
    log_weights: jax.Array  # [1, P] particle weights after the answers

    @property
    def asked(self) -> set[int]:
        return {index for index in self.candidates if index is not None}


@dataclasses.dataclass(frozen=True)
class Trial:
    """An open blind comparison: ``order[i]`` says which arm is shown i-th ("steered"/"baseline")."""

    id: str
    person: str
    prompt: str
    seed: int
    responses: dict[str, str]
    order: tuple[str, str]
    profile_hash: str


def _pair_key(prompt: str, first: str, second: str) -> tuple[str, str, str]:
    """A candidate's identity by content: its prompt and its two responses in either order."""
    return (prompt, *sorted((first, second)))


def read_serving_candidates(path: str | Path, codec) -> tuple[list[dict[str, Any]], str]:
    """A candidate set (``nps.data.profiles.read_candidates``) whose every prompt + response the run's
    text ``codec`` can score (any text for a chat model; words of the language for a steering run)."""
    candidates, digest = read_candidates(path)
    for number, candidate in enumerate(candidates, start=1):
        for response in candidate["responses"]:
            codec.option_ids(candidate["prompt"], response, f"{path}: candidate {number}")
    return candidates, digest


class ModelQueue:
    """Work on the model, one request at a time; a request that would be the ``limit``-th to hold or
    wait for it is refused at once (503) rather than queued without bound."""

    def __init__(self, limit: int):
        self.limit, self.waiting = limit, 0
        self._model, self._count = threading.Lock(), threading.Lock()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._count:
            if self.waiting >= self.limit:
                raise StoreError(f"the model is busy with {self.waiting} other requests; try again in a moment", 503)
            self.waiting += 1
        try:
            with self._model:
                yield
        finally:
            with self._count:
                self.waiting -= 1


class PreferenceService:
    def __init__(self, run: SteeringRun, candidates_path: str | Path, store: Store, *, baseline: str = "base",
                 num_particles: int = 256):
        if not run.conditioned:
            raise ConfigError(f"model {run.model_name!r} takes no user; serve a conditioned policy (np_dpo)")
        self.run, self.store = run, store
        self.candidates, self.digest = read_serving_candidates(candidates_path, run.codec)
        self._by_content = {_pair_key(c["prompt"], *c["responses"]): i for i, c in enumerate(self.candidates)}
        self.baseline_name, self.baseline_run = load_baseline(baseline)
        self.model_turn = ModelQueue(MODEL_QUEUE).turn
        self.generations = GenerationBatcher(run)
        self._candidate_options: tuple[Any, Any] | None = None
        self.particles, self.probabilities = self._particles(num_particles)  # [P, d], [P, M]
        self._people: dict[str, _PersonState] = {}
        self._trials: dict[str, Trial] = {}
        self._trials_guard = threading.Lock()
        self._reports: dict[str, tuple[str, ConsistencyReport]] = {}  # each person's latest (profile hash, report)

    # -- start-up ------------------------------------------------------------------------------------
    @property
    def candidate_options(self) -> tuple[Any, Any]:
        """The policy's options of every candidate's first and second response (built on first use)."""
        if self._candidate_options is None:
            self._candidate_options = self.run.candidate_options(self.candidates)
        return self._candidate_options

    def _particles(self, count: int) -> tuple[jax.Array, jax.Array]:
        """The particles z [P, d] and their choice probabilities on every candidate [P, M]: computed
        once per run and candidate set, then read from the store's cache (a restart skips the model work)."""
        cache = self.store.directory / "cache" / f"particles-{self.run.fingerprint[:16]}-{self.digest[:16]}-{count}.npz"
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as stored:
                    particles, probabilities = stored["particles"], stored["probabilities"]
                if probabilities.shape == (count, len(self.candidates)) and particles.shape[0] == count:
                    return jnp.asarray(particles), jnp.asarray(probabilities)
            except (OSError, ValueError, KeyError):
                pass  # an unreadable cache is recomputed below
        particles = self.run.particles(count)
        probabilities = particle_choice_probabilities(self.run.policy, particles, *self.candidate_options)
        cache.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, particles=np.asarray(particles), probabilities=np.asarray(probabilities))
        atomic_write_bytes(cache, buffer.getvalue())
        return particles, probabilities

    def warm_up(self) -> None:
        """Compile what the first requests need (the chooser, z, two-word generation); the server runs
        this in the background once it listens."""
        self._next_index(_PersonState(None, [], [], jnp.zeros((1, self.probabilities.shape[0]))), "warm-up")
        with self.model_turn():
            z = np.asarray(self.run.encode_user([]))
        prompt = self.candidates[0]["prompt"]
        requests = [GenerationRequest(prompt, z, 0)]
        if self.baseline_run is None:
            requests.append(GenerationRequest(prompt, None, 0, base=True))
        self._generate(requests)

    # -- a person's answers --------------------------------------------------------------------------
    def _state(self, name: str) -> _PersonState:
        """The person's records and particle weights; re-read when the profile file changed on disk
        (the caller holds the person's lock)."""
        path = self.store.profile_path(name)
        try:
            stat = path.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        state = self._people.get(name)
        if state is not None and state.signature == signature:
            return state
        records = self.store.profile(name)
        candidates = [self._current_candidate(path, number, record) for number, record in enumerate(records, start=1)]
        log_weights = log_weights_after(self.probabilities, [
            (index, r["chosen"] == self.candidates[index]["responses"][0])
            for r, index in zip(records, candidates) if index is not None and r.get("choice") != "skip"])
        state = _PersonState(signature, records, candidates, log_weights)
        self._people[name] = state
        return state

    def _current_candidate(self, path: Path, number: int, record: dict[str, Any]) -> int | None:
        """The index in the current candidate set of the pair a profile record answers (or skips); None for
        a pair the set no longer holds (and for a skip from another set: it is asked again)."""
        if record.get("candidates") != self.digest:  # answered from another version of the candidate file
            skipped = record.get("choice") == "skip"
            return None if skipped else self._by_content.get(_pair_key(record["prompt"], record["chosen"],
                                                                       record["rejected"]))
        index = record.get("candidate")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self.candidates):
            raise StoreError(f"{path}: record {number} names candidate {index!r}, not one of 0..."
                             f"{len(self.candidates) - 1}; fix or delete that line", 409)
        answer = {record.get("chosen"), record.get("rejected")}
        if record.get("choice") != "skip" and answer != set(self.candidates[index]["responses"]):
            raise StoreError(f"{path}: record {number} does not answer candidate {index} (its chosen and "
                             "rejected are not that candidate's two responses); fix or delete that line", 409)
        return index

    def _display_order(self, name: str, index: int) -> tuple[str, str]:
        """The candidate's two responses as this person sees them, left first (seeded per person and candidate)."""
        responses = self.candidates[index]["responses"]
        return tuple(responses[::-1]) if random.Random(f"{name}:{index}").random() < 0.5 else tuple(responses)

    def _next_index(self, state: _PersonState, name: str) -> int | None:
        # Once no pair is informative, the person's own random order (seeded by name) decides.
        order = random.Random(f"order:{name}").sample(range(len(self.candidates)), len(self.candidates))
        return next_informative(state.log_weights, self.probabilities, state.asked, order)

    def next_question(self, name: str) -> Question | None:
        """The most informative unanswered candidate for this person, or None when all are answered."""
        with self.store.person_lock(name):
            state = self._state(name)
            index = self._next_index(state, name)
            answered = sum(r.get("choice") != "skip" for r, i in zip(state.records, state.candidates) if i is not None)
        if index is None:
            return None
        left, right = self._display_order(name, index)
        return Question(index, self.candidates[index]["prompt"], left, right, answered, len(self.candidates))

    def answer(self, name: str, candidate: int, choice: str) -> dict[str, Any]:
        """Record the person's choice on a candidate ("left", "right" as displayed, or "skip"); the
        record is fsynced before this returns. A candidate already answered or skipped is refused (409)."""
        if choice not in CHOICES:
            raise StoreError(f"choice {choice[:20]!r}: answer one of {', '.join(CHOICES)}")
        if not 0 <= candidate < len(self.candidates):
            raise StoreError(f"pair {candidate} does not exist; pairs are numbered 0...{len(self.candidates) - 1}", 404)
        with self.store.person_lock(name):
            state = self._state(name)
            if candidate in state.asked:
                raise StoreError(f"pair {candidate} is already answered; nothing was recorded twice", 409)
            left, right = self._display_order(name, candidate)
            record: dict[str, Any] = {"prompt": self.candidates[candidate]["prompt"]}
            if choice == "skip":
                record["choice"] = "skip"
            else:
                chosen, rejected = (left, right) if choice == "left" else (right, left)
                record |= {"chosen": chosen, "rejected": rejected,
                           "position": "first" if choice == "left" else "second"}
            record |= {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "candidates": self.digest, "candidate": candidate}
            self.store.append_answer(name, record)
            stat = self.store.profile_path(name).stat()
            state.signature = (stat.st_size, stat.st_mtime_ns)
            state.records.append(record)
            state.candidates.append(candidate)
            if choice != "skip":
                first = record["chosen"] == self.candidates[candidate]["responses"][0]
                state.log_weights = update_log_weights(state.log_weights, self.probabilities,
                                                       np.array([candidate]), np.array([first]))
            return record

    def answered_pairs(self, name: str) -> list[dict[str, Any]]:
        """The person's answer records (no skips), in profile order."""
        with self.store.person_lock(name):
            return [r for r in self._state(name).records if r.get("choice") != "skip"]

    def skipped(self, name: str) -> int:
        with self.store.person_lock(name):
            return sum(r.get("choice") == "skip" for r in self._state(name).records)

    # -- z and its history ---------------------------------------------------------------------------
    def latent(self, name: str) -> tuple[np.ndarray, str, int]:
        """The person's z [d], the profile hash it belongs to and the number of answers it read:
        recorded in the history on first use, then returned as recorded."""
        pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in self.answered_pairs(name)]
        version = profile_hash(pairs)
        z = self.store.recorded_latent(name, version, self.run.fingerprint)
        if z is None:
            with self.model_turn():
                z = np.asarray(self.run.encode_user(pairs), np.float32)
            z = self.store.record_latent(name, version, self.run.fingerprint, z, len(pairs))
        return z, version, len(pairs)

    # -- Try: steered responses and blind comparisons ------------------------------------------------
    def example_prompts(self) -> list[str]:
        """What the Try page offers as examples: a steering run's topics, a chat model's candidate prompts."""
        return self.run.codec.example_prompts(self.candidates)

    @property
    def free_text(self) -> bool:
        """Whether a prompt is any text (a chat model) or words of the run's language."""
        return self.run.codec.free_text

    def check_prompt(self, prompt: str) -> str:
        try:
            return self.run.codec.check_prompt(prompt, "prompt")
        except ConfigError as error:
            raise StoreError(str(error)) from None

    def _generate(self, requests: list[GenerationRequest]) -> list[str]:
        try:
            return self.generations.generate(requests)
        except ConfigError as error:
            raise StoreError(str(error)) from None

    def respond(self, name: str, prompt: str, seed: int | None = None) -> str:
        """A response to ``prompt`` steered by the person's z."""
        prompt = self.check_prompt(prompt)
        z, _, _ = self.latent(name)
        seed = secrets.randbelow(2**31) if seed is None else seed
        return self._generate([GenerationRequest(prompt, z, seed)])[0]

    def open_trial(self, name: str, prompt: str) -> Trial:
        """A blind comparison: the steered and the baseline response (same seed), in random order."""
        prompt = self.check_prompt(prompt)
        z, version, _ = self.latent(name)
        seed = secrets.randbelow(2**31)
        if self.baseline_run is None:  # both arms in one queue visit (the same seed)
            steered, baseline = self._generate([GenerationRequest(prompt, z, seed),
                                                GenerationRequest(prompt, None, seed, base=True)])
        else:
            steered, = self._generate([GenerationRequest(prompt, z, seed)])
            pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in self.answered_pairs(name)]
            with self.model_turn():
                baseline = self.baseline_run.generate([prompt], self.baseline_run.encode_user(pairs), seed=seed)[0]
        order = ("steered", "baseline") if secrets.randbelow(2) else ("baseline", "steered")
        trial = Trial(secrets.token_urlsafe(12), name, prompt, seed, {"steered": steered, "baseline": baseline},
                      order, version)
        with self._trials_guard:
            mine = [t for t in self._trials.values() if t.person == name]
            for old in mine[: max(0, len(mine) - MAX_OPEN_TRIALS + 1)]:
                del self._trials[old.id]
            self._trials[trial.id] = trial
        return trial

    def judge(self, name: str, trial_id: str, verdict: str) -> dict[str, Any]:
        """Record the person's verdict on an open comparison: "first", "second" (as shown) or "tie"."""
        if verdict not in VERDICTS:
            raise StoreError(f"verdict {verdict[:20]!r}: answer first, second or tie")
        with self._trials_guard:
            trial = self._trials.get(trial_id)
            if trial is None or trial.person != name:
                raise StoreError("this comparison is not open (already judged, expired or unknown); "
                                 "start a new one on the Try page", 404)
            del self._trials[trial_id]
        preferred = "tie" if verdict == "tie" else trial.order[0 if verdict == "first" else 1]
        record = {"trial": trial.id, "prompt": trial.prompt, "seed": trial.seed, "steered": trial.responses["steered"],
                  "baseline": trial.responses["baseline"], "baseline_name": self.baseline_name,
                  "shown_first": trial.order[0], "verdict": verdict, "preferred": preferred,
                  "profile_hash": trial.profile_hash, "run_fingerprint": self.run.fingerprint,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self.store.person_lock(name):
            self.store.append_judgement(name, record)
        return record

    # -- Profile -----------------------------------------------------------------------------------------
    def consistency(self, name: str) -> tuple[ConsistencyReport, int]:
        """The consistency and drift checks of the person's latest ``CHECKED_ANSWERS`` answers, and how
        many earlier answers they leave out (computed once per profile version; the latest one kept)."""
        records = self.answered_pairs(name)
        unchecked = max(0, len(records) - CHECKED_ANSWERS)
        records = records[unchecked:]
        pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
        version = profile_hash(pairs)
        with self.model_turn():
            if self._reports.get(name, (None,))[0] != version:  # checked again under the lock: once per version
                chosen, rejected = self.run.pair_options(pairs) if pairs else (None, None)
                self._reports[name] = version, check_profile(
                    self.run.policy, pairs, chosen, rejected, [r.get("position") for r in records],
                    trained_context=self.run.episodes.max_context)
            return self._reports[name][1], unchecked

    def confidence(self, name: str) -> float | None:
        """How sure the model is of the person's choices on the pairs they have not answered: the mean
        over those of max(p, 1 − p), p = p(first ≻ second | z). None when every pair is answered."""
        z, _, _ = self.latent(name)
        with self.store.person_lock(name):
            asked = self._state(name).asked
        open_pairs = [i for i in range(len(self.candidates)) if i not in asked]
        if not open_pairs:
            return None
        with self.model_turn():
            p = np.asarray(particle_choice_probabilities(self.run.policy, jnp.asarray(z)[None],
                                                         *self.candidate_options))[0]
        return float(np.mean(np.maximum(p, 1 - p)[open_pairs]))

    def latent_map(self, name: str) -> bytes:
        """A PNG: the person's z among other people's latest z and the run's particles, on the
        particles' first two principal components (so positions are comparable across visits)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mine, _, _ = self.latent(name)
        particles = np.asarray(self.particles)
        others = {}
        for record in self.store.history():
            if record["run_fingerprint"] == self.run.fingerprint and record["person"] != name and \
                    len(record["z"]) == particles.shape[1]:
                others[record["person"]] = np.asarray(record["z"], np.float32)
        center = particles.mean(0)
        _, _, axes = np.linalg.svd(particles - center, full_matrices=False)
        project = lambda z: (np.atleast_2d(z) - center) @ axes[:2].T  # noqa: E731
        with self.model_turn():  # matplotlib's state is not thread-safe
            fig, ax = plt.subplots(figsize=(5.2, 4.0))
            cloud = project(particles)
            ax.scatter(cloud[:, 0], cloud[:, 1], s=8, c="#c8ccd2", label="users the model learnt")
            if others:
                points = project(np.stack(list(others.values())))
                ax.scatter(points[:, 0], points[:, 1], s=30, c="#4a78b5", label="other people")
            me = project(mine)
            ax.scatter(me[:, 0], me[:, 1], s=160, marker="*", c="#d1495b", edgecolors="black", label="you")
            ax.set_xlabel("first principal component of z")
            ax.set_ylabel("second principal component")
            ax.legend(fontsize=8, loc="best")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=110)
            plt.close(fig)
        return buffer.getvalue()

    # -- summaries ------------------------------------------------------------------------------------
    def ab_summary(self, names: list[str]) -> dict[str, Any]:
        """Win rate of the steered response (tie ½) ± s.e. over the judgements of ``names``."""
        wins = []
        for name in names:
            try:
                wins += [WIN[r["preferred"]] for r in self.store.judgements(name) if r.get("preferred") in WIN]
            except StoreError:
                continue
        if not wins:
            return {"judgements": 0, "win_rate": None, "sem": None}
        summary = mean_and_sem(np.asarray(wins))
        return {"judgements": len(wins), "win_rate": summary["mean"],
                "sem": None if np.isnan(summary["sem"]) else summary["sem"]}

    def admin_summary(self) -> dict[str, Any]:
        """Everyone's counts and A/B results, per person and per group."""
        rows, groups = [], {}
        for name in self.store.people():
            row: dict[str, Any] = {"name": name, "group": "", "answered": None, "skipped": None, "last": None,
                                   "problem": None}
            try:
                row["group"] = (self.store.person(name) or {}).get("group", "")
                with self.store.person_lock(name):
                    records = list(self._state(name).records)
                row["answered"] = sum(r.get("choice") != "skip" for r in records)
                row["skipped"] = len(records) - row["answered"]
                row["last"] = records[-1].get("time") if records else None
                self.store.judgements(name)  # an unreadable file of judgements is named here, not left out silently
            except StoreError as error:
                row["problem"] = str(error)
            row["ab"] = self.ab_summary([name])
            groups.setdefault(row["group"], []).append(name)
            rows.append(row)
        return {"people": rows, "groups": {group: self.ab_summary(names) | {"people": len(names)}
                                           for group, names in sorted(groups.items())},
                "all": self.ab_summary([row["name"] for row in rows])}


