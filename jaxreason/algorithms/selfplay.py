"""Generator-verifier self-play: a generator trained by RL against a generative verifier (GenRM; Zhang et al. 2024,
arXiv 2408.15240) and a Bradley-Terry reward model, which in turn learn from the generator's samples.

    policy_0 <- SFT(base, gold solutions)                                      stage "sft" (as GRPO's)
    D_0      <- k samples of policy_0 per verifier problem                       stage "samples_0"
    GenRM_0  <- policy_0 trained on verification of D_0 (+ lambda SFT on its correct solutions)   stage "genrm_0"
    RM_0     <- a value head from policy_0, Bradley-Terry on D_0's (correct, incorrect) pairs     stage "reward_model_0"
    for round t = 1 .. T:
        `steps_per_round` RL steps of the generator (from policy_0, live weights): G samples of N training
        problems each, rewarded by GenRM_{t-1}'s P(Yes) (or RM_{t-1}'s score: `reward`), group advantages (or
        actor-critic: `advantage: gae`), the clipped update with a KL to policy_0; the samples are D_t
        RM_t    <- RM_{t-1} trained on the pairs of D_0 .. D_t                       stage "reward_model_t"
        GenRM_t <- GenRM_{t-1} trained on D_0 .. D_t                                 stage "genrm_t"
        held-out greedy accuracy of the generator
    baseline: GRPO with the gold reward from policy_0, the same steps, problems and samples
    comparison: the final generator's held-out samples scored by GenRM (direct and CoT), an ORM, the BT RM, a DPO
    verifier and the base model as a judge (LLM-as-judge): AUC and best-of-N

The gold answers label the verifiers' training data (D_t's correctness) and score the evaluation; the generator's
reward never reads them. Samples go to the trace store `run_dir/traces` (iteration = the RL step that drew them, 0
for D_0), models to orbax checkpoints; `--resume` continues from the last checkpoint of each part. A multi-process
job runs the same loop on every process, on one shared run folder that process 0 alone writes (`StoreRun`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from jaxreason import sharding
from jaxreason.algorithms.gold_sft import gold_traces
from jaxreason.algorithms.model_states import (
    copy_of,
    dpo_verifier_from,
    lm_copy,
    lm_parameters,
    snapshot,
    value_model_from,
    value_parameters,
)
from jaxreason.algorithms.preference_pairs import pair_batch, preference_pairs, with_reference
from jaxreason.algorithms.registry import register_algorithm
from jaxreason.algorithms.rl_steps import (
    StepHistory,
    finish_rl_run,
    group_step,
    make_critic,
    restore_rl_state,
    run_rl_steps,
)
from jaxreason.algorithms.selfplay_report import write_selfplay_report
from jaxreason.algorithms.stages import export_models
from jaxreason.algorithms.store_run import StoreRun, run_with_store
from jaxreason.config import to_dict
from jaxreason.data.batching import shuffled_batches
from jaxreason.data.trace_batches import sft_batch, value_batch
from jaxreason.data.trace_store import FLAG_CORRECT, Trace, unique_traces
from jaxreason.distributed import is_main_process
from jaxreason.models.spec import ModelSpec
from jaxreason.models.value_head import ValueModel
from jaxreason.rl.actor_critic import CriticConfig, check_advantage
from jaxreason.rl.rewards import (
    TRUNCATION_RULES,
    RewardFn,
    checked_rewards,
    task_reward,
    verifier_reward,
)
from jaxreason.rl.trainer import PolicyGradientConfig, PolicyTrainer
from jaxreason.sampling.generate import SamplingConfig
from jaxreason.sampling.prompts import eos_ids, prompt_ids
from jaxreason.search.baselines import draw_solutions
from jaxreason.search.config import BaselineConfig, Budget
from jaxreason.search.methods import run as run_method
from jaxreason.tasks.base import TaskSpec
from jaxreason.train.fit import FitConfig
from jaxreason.train.objectives import (
    bradley_terry_objective,
    dpo_objective,
    generative_verifier_objective,
    sft_objective,
    value_objective,
)
from jaxreason.train.sft import LoRAConfig
from jaxreason.verifiers.base import Verifier
from jaxreason.verifiers.batch import score_solutions
from jaxreason.verifiers.best_of_k import best_of_k_curves
from jaxreason.verifiers.evaluation import draw_checked
from jaxreason.verifiers.generative import CoTGenerativeVerifier, GenerativeVerifier
from jaxreason.verifiers.generative_data import (
    VerdictFormat,
    reference_rationales,
    solution_examples,
    verdict_ids,
    verification_batch,
    verification_examples,
)
from jaxreason.verifiers.metrics import roc_auc, within_problem_auc
from jaxreason.verifiers.positions import StepSplitter
from jaxreason.verifiers.value import ValueVerifier

log = logging.getLogger(__name__)
REWARDS = ("genrm", "reward_model")


@dataclasses.dataclass(frozen=True)
class SelfPlayProblems:
    """The task's train split: `gold` problems for policy_0's SFT (GRPO's gold slice with the same seed), the next
    `verifier` for D_0, the next `train` for RL; and `test` held-out problems."""

    task: TaskSpec = TaskSpec()
    gold: int = 256
    verifier: int = 256
    train: int = 1024
    test: int = 128


@dataclasses.dataclass(frozen=True)
class GenRMConfig:
    """The generative verifier: its prompt, the weight lambda of SFT on correct solutions, D_0's samples per
    problem, and its training per round (`train.max_len` must hold a solution, the question and the verdict)."""

    format: VerdictFormat = VerdictFormat()
    sft_weight: float = 1.0
    samples_per_problem: int = 4
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    train: FitConfig = FitConfig()


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """The verifier comparison on the final generator's samples of the first `problems` held-out problems.

    GenRM-CoT, the ORM and the DPO verifier start from policy_0 and train `train` on all the labelled samples of
    the run (D_0 .. D_T), the BT RM and GenRM are the loop's last; the judge is policy_0 asked the question."""

    problems: int = 128
    num_samples: int = 16
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    cot_rationales: int = 2  # r: rationales per solution, their P(Yes) averaged
    cot_sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    train: FitConfig = FitConfig()
    dpo_beta: float = 1.0
    pairs_per_problem: int = 4
    verifiers: tuple[str, ...] = ("genrm", "genrm_cot", "orm", "reward_model", "dpo", "judge")

    def __post_init__(self):
        unknown = set(self.verifiers) - {"genrm", "genrm_cot", "orm", "reward_model", "dpo", "judge"}
        if unknown:
            raise ValueError(f"comparison.verifiers: unknown {sorted(unknown)}; known: genrm, genrm_cot, orm, "
                             "reward_model, dpo, judge")
        if self.problems < 1 or self.num_samples < 1 or self.cot_rationales < 1:
            raise ValueError("comparison.problems, num_samples and cot_rationales must be >= 1")


@dataclasses.dataclass(frozen=True)
class SelfPlayConfig:
    policy: ModelSpec
    problems: SelfPlayProblems = SelfPlayProblems()
    run_dir: str = "runs/selfplay"
    seed: int = 0
    chat: bool = False
    sft: FitConfig | None = FitConfig()  # policy_0 from the base model; null: the base model is policy_0
    rounds: int = 2  # T
    steps_per_round: int = 25
    prompts_per_step: int = 16  # N
    group_size: int = 8  # G
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=0.7)
    reward: str = "genrm"  # what rewards the generator: genrm (P(Yes)) | reward_model (the BT RM's score)
    advantage: str = "grpo"  # grpo | rloo | dr_grpo (group estimators), or gae: actor-critic with `critic`
    critic: CriticConfig = CriticConfig()  # read with advantage gae only
    truncation: str = "zero"
    update: PolicyGradientConfig = PolicyGradientConfig()
    genrm: GenRMConfig = GenRMConfig()
    reward_model: FitConfig = FitConfig()  # the BT RM's training per round
    pairs_per_problem: int = 4
    gold_baseline: bool = True  # GRPO with the gold reward, the same steps and samples
    evaluation: BaselineConfig = BaselineConfig()  # held-out greedy decoding reads its max_new_tokens
    comparison: ComparisonConfig = ComparisonConfig()
    # adapters on every verifier the run trains (GenRM, GenRM-CoT, the BT RM, the ORM, the DPO verifier, whose
    # reference is then itself with them off), the only weights they train besides value heads; null: all weights
    verifier_lora: LoRAConfig | None = None
    checkpoint_every: int = 10
    mesh: sharding.MeshConfig = sharding.MeshConfig()

    def __post_init__(self):
        if self.rounds < 1 or self.steps_per_round < 1 or self.prompts_per_step < 1:
            raise ValueError("rounds, steps_per_round and prompts_per_step must be >= 1")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of a group), got {self.group_size}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.truncation not in TRUNCATION_RULES:
            raise ValueError(f"truncation must be one of {TRUNCATION_RULES}, got {self.truncation!r}")
        if self.comparison.problems > self.problems.test:
            raise ValueError(f"comparison.problems ({self.comparison.problems}) exceeds problems.test "
                             f"({self.problems.test})")
        check_advantage(self.advantage)

    @property
    def num_steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def updates_per_step(self) -> int:
        rows = self.prompts_per_step * self.group_size
        return self.update.epochs * (rows // (self.update.minibatch_rows or rows))


class _Run(StoreRun):
    """Self-play's run (`StoreRun`): its pool is the gold, then the verifier, then the RL problems."""

    def slice(self, name: str):
        p = self.config.problems
        start = {"gold": 0, "verifier": p.gold, "train": p.gold + p.verifier}[name]
        size = {"gold": p.gold, "verifier": p.verifier, "train": p.train}[name]
        return self.pool[start:start + size], list(range(start, start + size))

    def labelled(self, last_step: int) -> list[Trace]:
        """D_0 and the RL samples of steps 1 .. last_step, without repeats."""
        rows = [self.store.select(iteration=i) for i in range(last_step + 1)]
        return unique_traces(self.store.read(np.concatenate(rows)))


class _Player:
    """A generator's RL steps (the self-play generator, or the gold-reward baseline), and its critic in
    actor-critic, resumable from its own checkpoints under `run_dir/<name>`."""

    def __init__(self, r: _Run, name: str, policy, keep_samples: bool):
        c = r.config
        self.r, self.name, self.keep_samples = r, name, keep_samples
        self.critic = make_critic(c, policy, r.mesh)  # before the policy trains: it starts from policy_0
        self.trainer = PolicyTrainer(policy, c.update, mesh=r.mesh, num_updates=c.num_steps * c.updates_per_step,
                                     seed=c.seed)
        checkpointer = self.trainer.checkpointer(r.run_dir / name / "checkpoints")
        meta = restore_rl_state(checkpointer, self.trainer, self.critic)
        checkpointer.close()
        self.done = 0 if meta is None else int(meta["step"])
        self.history = StepHistory(r.run_dir / name / "history.json")
        self.history.truncate(self.done)
        self.problems, ids = r.slice("train")
        self.ids = np.asarray(ids)
        self.prompts = [prompt_ids(r.tokenizer, r.task.prompt(p), chat=c.chat) for p in self.problems]
        # each step's problems: slices of a per-epoch permutation, the same for both players
        self.rows = shuffled_batches(np.asarray, len(self.problems), c.prompts_per_step, c.seed)(self.done)
        self.gold = task_reward(r.task, r.tokenizer)

    def play(self, until: int, reward_fn: RewardFn) -> None:
        """RL steps up to step `until` with rewards from `reward_fn`."""
        if self.done >= until:
            return
        c, r = self.r.config, self.r
        stop = eos_ids(r.tokenizer, self.trainer.policy.config)
        key = r.key_for(self.name)

        def take_step(step: int) -> dict:
            began = time.perf_counter()
            done = group_step(self.trainer, self.problems, self.prompts, next(self.rows), step, key,
                              sampling=c.sampling, group_size=c.group_size, advantage=c.advantage,
                              truncation=c.truncation, reward_fn=reward_fn, eos_ids=stop, pad_id=r.pad_id, mesh=r.mesh,
                              critic=self.critic)
            episodes, owners, rewards, groups, metrics = (done.episodes, done.owners, done.rewards, done.groups,
                                                          done.metrics)
            problems, prompts = [self.problems[i] for i in owners], [self.prompts[i] for i in owners]
            completions = episodes.attempt(0)
            gold = checked_rewards(self.gold, problems, prompts, completions)  # labels and the report only
            if self.keep_samples and not len(r.store.select(iteration=step + 1)):  # a redone step wrote them
                r.append(_traces(self.ids[owners], step + 1, prompts, completions, gold))
            lengths = np.asarray(episodes.turn_lengths[:, 0])
            row = {"step": step + 1, "reward": float(rewards.mean()), "gold_accuracy": float(gold.mean()),
                   "reward_auc": roc_auc(rewards, gold > 0),
                   # what the group advantages read: the reward's ranking among the samples of one problem
                   "reward_auc_within": within_problem_auc(groups, gold.reshape(groups.shape) > 0),
                   "kl": metrics["kl"], "loss": metrics["loss"],
                   "response_length": float(lengths.mean()),
                   "generated_tokens": self.history.generated_tokens() + int(lengths.sum()),
                   "seconds": time.perf_counter() - began}
            row |= {k: metrics[k] for k in ("critic_loss", "value_mae") if k in metrics}
            if (step + 1) % c.steps_per_round == 0:
                row["eval"] = self.evaluate()
            return row

        run_rl_steps(self.name, r.run_dir, self.trainer, self.trainer.checkpointer(r.run_dir / self.name /
                                                                                  "checkpoints"),
                     self.history, start=self.done, num_steps=until, checkpoint_every=c.checkpoint_every, seed=c.seed,
                     first_row=lambda: {"step": 0, "generated_tokens": 0, "eval": self.evaluate()},
                     take_step=take_step, postfix=lambda row: {"reward": f"{row['reward']:.3f}",
                                                               "gold": f"{row['gold_accuracy']:.3f}"},
                     critic=self.critic)
        self.done = until
        if until == c.num_steps:  # the last round: the weights stay, the optimizer state goes
            finish_rl_run(r.run_dir / self.name, self.trainer, self.critic, step=until, seed=c.seed)

    def evaluate(self) -> dict[str, float]:
        r = self.r
        result = run_method("greedy", r.test, policy=self.trainer.policy, tokenizer=r.tokenizer, task=r.task,
                            budget=Budget(baseline=r.config.evaluation), key=r.key_for("greedy"), chat=r.config.chat,
                            mesh=r.mesh)
        log.info("%s: held-out greedy accuracy %.3f", self.name, result.accuracy)
        return {"greedy": result.accuracy}


def run_selfplay(config: SelfPlayConfig, resume: bool = False) -> dict:
    """Runs (or resumes) self-play; returns the metrics also written to run_dir/metrics.json."""
    return run_with_store(config, _setup, _loop, resume)


def _loop(r: _Run, policy) -> None:
    c = r.config
    eos = r.tokenizer.eos_token_id
    if c.sft is not None:
        gold = gold_traces(r.task, r.tokenizer, *r.slice("gold"), chat=c.chat)
        r.train_model("sft", policy, sft_objective, gold, c.sft, lambda t: sft_batch(t, c.sft.max_len, r.pad_id, eos))
    base = snapshot(policy)
    ids = verdict_ids(r.tokenizer, c.genrm.format)
    genrm = lm_copy(policy, base, c.seed, c.verifier_lora)
    reward_model = value_model_from(policy, c.seed, base, lora=c.verifier_lora)

    r.stages.run("samples_0", lambda: _samples_0(r, policy))
    _train_verifiers(r, genrm, reward_model, ids, 0)
    player = _Player(r, "selfplay", copy_of(policy, base), keep_samples=True)
    for t in range(1, c.rounds + 1):
        verifier = GenerativeVerifier(genrm, ids.question, ids.yes, ids.no) if c.reward == "genrm" \
            else ValueVerifier(reward_model)
        player.play(t * c.steps_per_round,
                    verifier_reward(verifier, r.tokenizer, r.task, pad_id=r.pad_id, mesh=r.mesh))
        _train_verifiers(r, genrm, reward_model, ids, t)
    models = {"generator": player.trainer.policy, "genrm": genrm}
    if c.gold_baseline:
        baseline = _Player(r, "grpo_gold", copy_of(policy, base), keep_samples=False)
        baseline.play(c.num_steps, baseline.gold)
        models["grpo_gold"] = baseline.trainer.policy
    judge = GenerativeVerifier(copy_of(policy, base), ids.question, ids.yes, ids.no)
    verifiers = _comparison_verifiers(r, policy, base, ids, genrm, reward_model, judge)
    r.stages.run("comparison", lambda: _compare(r, player.trainer.policy, verifiers))
    _export(r, models, verifiers, reward_model)
    if is_main_process():  # the others read metrics.json back (`run_with_store`)
        write_selfplay_report(r.run_dir, to_dict(c), r.stages.results, {
            "selfplay": player.history.rows, "grpo_gold": baseline.history.rows if c.gold_baseline else []})


# ---------------------------------------------------------------- stages


def _samples_0(r: _Run, policy) -> dict:
    """D_0: `genrm.samples_per_problem` samples of policy_0 per verifier problem, labelled by the gold answers."""
    g = r.config.genrm
    problems, ids = r.slice("verifier")
    prompts = [prompt_ids(r.tokenizer, r.task.prompt(p), chat=r.config.chat) for p in problems]
    drawn = draw_solutions(policy, r.tokenizer, prompts, g.sampling, r.key_for("samples_0"), g.samples_per_problem,
                           r.mesh)
    rows = [(i, s) for i, row in enumerate(drawn) for s in row]
    correct = np.asarray(r.task.check_many([problems[i] for i, _ in rows],
                                           [r.tokenizer.decode(s.tolist(), skip_special_tokens=True)
                                            for _, s in rows]), np.float32)
    if not len(r.store.select(iteration=0)):
        r.append(_traces(np.asarray(ids)[[i for i, _ in rows]], 0, [prompts[i] for i, _ in rows],
                         [s for _, s in rows], correct))
    return {"samples": len(rows), "accuracy": float(correct.mean()),
            "generated_tokens": int(sum(len(s) for _, s in rows))}


def _train_verifiers(r: _Run, genrm, reward_model: ValueModel, ids, t: int) -> None:
    """RM_t and GenRM_t, each continuing from round t - 1's, on D_0 .. D_t (t's RL samples end at step t * S)."""
    c = r.config
    data = r.labelled(t * c.steps_per_round)
    pairs, counts = preference_pairs(data, c.pairs_per_problem, c.seed + t)
    r.stages.run(f"data_{t}", lambda: {"samples": len(data), "correct": sum(bool(d.flags & FLAG_CORRECT)
                                                                               for d in data)} | counts)
    lora = c.verifier_lora is not None
    r.train_model(f"reward_model_{t}", reward_model, bradley_terry_objective, pairs, c.reward_model,
                  lambda batch: pair_batch(batch, c.reward_model.max_len, r.pad_id), value_parameters(lora=lora))
    train = c.genrm.train
    rows = verification_examples(data, ids) + solution_examples(data)
    r.train_model(f"genrm_{t}", genrm, generative_verifier_objective(ids.yes, ids.no, c.genrm.sft_weight), rows,
                  train, lambda batch: verification_batch(batch, train.max_len, r.pad_id), lm_parameters(lora))


def _comparison_verifiers(r: _Run, policy, base, ids, genrm, reward_model, judge) -> dict[str, Verifier]:
    """The verifiers `comparison.verifiers` names, the ones not trained by the loop trained on D_0 .. D_T."""
    c, cmp = r.config, r.config.comparison
    data = r.labelled(c.num_steps)
    lora = c.verifier_lora
    trains = lm_parameters(lora is not None)
    out = {}
    for name in cmp.verifiers:
        if name == "genrm":
            out[name] = GenerativeVerifier(genrm, ids.question, ids.yes, ids.no)
        elif name == "reward_model":
            out[name] = ValueVerifier(reward_model)
        elif name == "judge":
            out[name] = judge
        elif name == "genrm_cot":
            model = lm_copy(policy, base, c.seed, lora)
            problems = {i: p for i, p in enumerate(r.pool)}
            rationales = reference_rationales(r.task, r.tokenizer, [problems[d.problem_id] for d in data])
            rows = verification_examples(data, ids, rationales=rationales, eos_id=r.tokenizer.eos_token_id) + \
                solution_examples(data)
            r.train_model("genrm_cot", model, generative_verifier_objective(ids.yes, ids.no, c.genrm.sft_weight),
                          rows, cmp.train, lambda batch: verification_batch(batch, cmp.train.max_len, r.pad_id),
                          trains)
            out[name] = CoTGenerativeVerifier(model, ids.question, ids.yes, ids.no, intro_ids=ids.intro,
                                              num_rationales=cmp.cot_rationales, sampling=cmp.cot_sampling,
                                              eos_ids=eos_ids(r.tokenizer, policy.config), pad_id=r.pad_id,
                                              seed=c.seed)
        elif name == "orm":
            orm = value_model_from(policy, c.seed, base, lora=lora)
            labelled = [dataclasses.replace(d, step_ends=np.asarray([len(d.tokens)], np.int32),
                                            step_values=np.asarray([d.reward], np.float32)) for d in data]
            r.train_model("orm", orm, value_objective("bce"), labelled, cmp.train,
                          lambda batch: value_batch(batch, cmp.train.max_len, r.pad_id),
                          value_parameters(lora=lora is not None))
            out[name] = ValueVerifier(orm)
        elif name == "dpo":
            verifier = dpo_verifier_from(policy, base, cmp.dpo_beta, c.seed, lora)
            pairs, _ = preference_pairs(data, cmp.pairs_per_problem, c.seed)
            if "dpo" not in r.stages:  # a finished stage restores its checkpoint and needs no reference
                pairs = with_reference(pairs, verifier.reference_model, cmp.train.max_len, r.pad_id)
            r.train_model("dpo", verifier.model, dpo_objective(cmp.dpo_beta), pairs, cmp.train,
                          lambda batch: pair_batch(batch, cmp.train.max_len, r.pad_id), trains)
            out[name] = verifier
    return out


def _compare(r: _Run, generator, verifiers: dict[str, Verifier]) -> dict:
    """Every verifier's scores of the final generator's `comparison.num_samples` samples of each comparison
    problem: AUC over all samples and within problems, Best-of-k for k = 1 .. N beside majority vote and pass@k,
    and the seconds each verifier took to score them (compilation included)."""
    cmp = r.config.comparison
    problems = r.test[:cmp.problems]
    drawn = draw_checked(generator, r.tokenizer, r.task, problems, sampling=cmp.sampling, num_samples=cmp.num_samples,
                         key=r.key_for("comparison"), chat=r.config.chat, mesh=r.mesh)
    correct, groups = drawn.correct, drawn.groups
    splitter = StepSplitter(r.tokenizer, r.task.step_delimiter)
    scores, seconds = {}, {}
    for name, verifier in verifiers.items():
        began = time.perf_counter()
        scored = score_solutions(verifier, [p for p in drawn.prompts for _ in range(cmp.num_samples)],
                                 [s for row in drawn.samples for s in row], splitter, pad_id=r.pad_id,
                                 width_multiple=16, mesh=r.mesh)
        scores[name] = scored.scores.reshape(correct.shape)
        seconds[name] = round(time.perf_counter() - began, 1)
        log.info("comparison %s: AUC %s", name, roc_auc(scores[name].ravel(), correct.ravel()))
    curves = best_of_k_curves(correct, groups, scores)
    return {"problems": len(problems), "samples": cmp.num_samples, "accuracy": float(correct.mean()),
            "k": sorted(curves["pass"]), "curves": {name: [v for _, v in sorted(c.items())]
                                                    for name, c in curves.items()},
            "auc": {name: roc_auc(s.ravel(), correct.ravel()) for name, s in scores.items()},
            "auc_within_problems": {name: within_problem_auc(s, correct) for name, s in scores.items()},
            "seconds": seconds}


# ---------------------------------------------------------------- helpers


def _traces(problem_ids, iteration: int, prompts, completions, correct) -> list[Trace]:
    """Labelled samples for the store: prompt + completion as generated, FLAG_CORRECT from the gold answers."""
    return [Trace(problem_id=int(pid), iteration=iteration,
                  tokens=np.concatenate([np.asarray(p, np.int32), np.asarray(s, np.int32)]),
                  prompt_len=len(p), step_ends=np.zeros(0, np.int32), step_values=np.zeros(0, np.float32),
                  reward=float(ok), flags=FLAG_CORRECT if ok else 0)
            for pid, p, s, ok in zip(problem_ids, prompts, completions, correct)]


def _export(r: _Run, models: dict, verifiers: dict[str, Verifier], reward_model: ValueModel) -> None:
    """The final models as Hugging Face folders under `models/` (`export_models`: an existing folder stays)."""
    folders = dict(models)
    if "genrm_cot" in verifiers:
        folders["genrm_cot"] = verifiers["genrm_cot"].model
    if "dpo" in verifiers:
        folders["dpo_verifier"] = verifiers["dpo"].model
    values = {"reward_model": reward_model} | ({"orm": verifiers["orm"].model} if "orm" in verifiers else {})
    export_models(r.run_dir, r.tokenizer, folders, values)


def _setup(config: SelfPlayConfig, tokenizer, resume: bool) -> _Run:
    p = config.problems
    return _Run.open(config, tokenizer, resume, p.gold + p.verifier + p.train,
                     "problems.gold + problems.verifier + problems.train")


def _summary(config: SelfPlayConfig, metrics: dict) -> str:
    rounds = metrics["rounds"]
    line = f"selfplay: held-out greedy {rounds[0]['selfplay']:.3f} -> {rounds[-1]['selfplay']:.3f}"
    if rounds[-1].get("grpo_gold") is not None:
        line += f" (GRPO with the gold reward: {rounds[-1]['grpo_gold']:.3f})"
    return line + f"\nreport: {config.run_dir}/report.md"


register_algorithm("selfplay", SelfPlayConfig, run_selfplay, summarize=_summary)
