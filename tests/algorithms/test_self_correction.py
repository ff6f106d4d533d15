"""SCoRe's two-attempt protocol: the instruction's ids (plain and chat), the metrics, the baselines' examples and
the per-stage objective."""

import numpy as np
import pytest

from jaxreason.algorithms.score import Phase, ScoreConfig, _stage_objective
from jaxreason.algorithms.self_correction import (
    CheckedEpisodes,
    correction_metrics,
    correction_pairs,
    instruction_ids,
    star_corrections,
    two_attempt_trace,
)
from jaxreason.data.trace_batches import sft_batch
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.gguf_reader import smollm2_gguf_path
from jaxreason.models.gguf_tokenizer import load_gguf_tokenizer
from jaxreason.models.spec import ModelSpec
from jaxreason.sampling.prompts import prompt_ids

EOS = 2


def test_plain_instruction_is_its_own_line():
    tokenizer = build_char_tokenizer()
    ids = instruction_ids(tokenizer, "Fix it.", chat=False)
    assert tokenizer.decode(ids) == "\nFix it.\n"
    with pytest.raises(ValueError, match="instruction is empty"):
        instruction_ids(tokenizer, " ", chat=False)


def test_chat_instruction_is_a_user_turn_between_the_two_answers():
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path())
    question, answer, instruction = "What is 2+3?", "2+3=5\nThe answer is 5", "Check your answer."
    first = prompt_ids(tokenizer, question, chat=True) + tokenizer.encode(answer, add_special_tokens=False) \
        + [tokenizer.eos_token_id]
    episode = first + instruction_ids(tokenizer, instruction, chat=True)
    # what the chat template writes for the same conversation, up to the second answer
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer},
         {"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(episode) == expected


def test_metrics_split_the_change_into_fixed_and_broken():
    rewards = np.asarray([[0, 1], [0, 1], [1, 0], [1, 1], [0, 0], [1, 1], [0, 0], [0, 0]], np.float32)
    m = correction_metrics(rewards)
    assert m == pytest.approx({"acc_t1": 3 / 8, "acc_t2": 4 / 8, "delta": 1 / 8, "delta_i_to_c": 2 / 8,
                               "delta_c_to_i": 1 / 8})
    assert m["delta"] == pytest.approx(m["delta_i_to_c"] - m["delta_c_to_i"])


def test_a_two_attempt_example_trains_the_second_attempt_only():
    trace = two_attempt_trace([5, 6], [7, 8], [9], [10, 11], EOS, problem_id=3)
    assert trace.tokens.tolist() == [5, 6, 7, 8, EOS, 9, 10, 11]  # attempt 1 closed by its EOS
    batch = sft_batch([trace], 12, 0, EOS)
    assert batch["loss_mask"][0].tolist() == [0] * 6 + [1, 1, 1] + [0] * 3  # attempt 2 and the EOS added
    layout = two_attempt_trace([5, 6], [7, 8], [9], [10, 11], EOS, problem_id=3, train_first=True)
    assert sft_batch([layout], 12, 0, EOS)["loss_mask"][0].tolist() == [0] * 2 + [1] * 7 + [0] * 3


def _episodes(rewards, problem_index):
    n = len(rewards)
    return CheckedEpisodes(prompts=[[100 + p] for p in problem_index], first=[[20 + i, EOS] for i in range(n)],
                           second=[[40 + i, EOS] for i in range(n)], rewards=np.asarray(rewards, np.float32),
                           problem_index=np.asarray(problem_index, np.int32))


def test_star_keeps_the_episodes_that_fixed_a_wrong_first_attempt():
    episodes = _episodes([[0, 1], [1, 1], [1, 0], [0, 0], [0, 1]], [0, 0, 1, 1, 2])
    kept = star_corrections(episodes, [9], EOS)
    assert [t.tokens.tolist() for t in kept] == [[100, 20, EOS, 9, 40, EOS], [102, 24, EOS, 9, 44, EOS]]
    assert [t.problem_id for t in kept] == [0, 2]


def test_pair_sft_pairs_a_wrong_and_a_right_first_attempt_of_one_problem():
    # problem 0: first attempts 0, 1 wrong, 2 right; problem 1: all right (no pair)
    episodes = _episodes([[0, 0], [0, 1], [1, 0], [1, 1], [1, 0]], [0, 0, 0, 1, 1])
    pairs = correction_pairs(episodes, [9], EOS, pairs_per_problem=8, seed=0)
    assert sorted(t.tokens.tolist() for t in pairs) == [[100, 20, EOS, 9, 22, EOS], [100, 21, EOS, 9, 22, EOS]]
    assert len(correction_pairs(episodes, [9], EOS, pairs_per_problem=1, seed=0)) == 1


def _score_config(**kwargs):
    return ScoreConfig(policy=ModelSpec(pretrained="smollm2-135m-instruct"), group_size=2, beta1=0.01, beta2=0.1,
                       alpha=10.0, **kwargs)


def test_stage_one_trains_attempt_two_and_holds_attempt_one_by_the_strong_kl():
    rewards = np.asarray([[0, 1], [0, 0], [1, 1], [1, 1]], np.float32)  # two problems, two episodes each
    advantages, kl = _stage_objective(_score_config(), 1, rewards)
    assert advantages[:, 0].tolist() == [0, 0, 0, 0]
    # r2 - r1 = 1, 0 | 0, 0, then leave-one-out over each problem's episodes
    assert advantages[:, 1].tolist() == [1, -1, 0, 0]
    assert kl.tolist() == pytest.approx([0.1, 0.0])


def test_stage_two_rewards_both_attempts_and_the_fix_on_attempt_two():
    rewards = np.asarray([[0, 1], [1, 1], [1, 0], [1, 1]], np.float32)
    advantages, kl = _stage_objective(_score_config(), 2, rewards)
    # attempt 1: r1 + r2 = 1, 2 | 1, 2; attempt 2: r2 + 10 (r2 - r1) - r1 = 11, 0 | -11, 0
    assert advantages[:, 0].tolist() == [-1, 1, -1, 1]
    assert advantages[:, 1].tolist() == [11, -11, -11, 11]
    assert kl.tolist() == pytest.approx([0.01, 0.01])


def test_the_schedule_gives_each_step_its_stage():
    config = _score_config(schedule=(Phase(1, 2), Phase(2, 3), Phase(1, 1)))
    assert [config.stage_at(s) for s in range(6)] == [1, 1, 2, 2, 2, 1]
    assert config.num_steps == 6 and config.phase_ends == [2, 5, 6]
    with pytest.raises(ValueError, match="stage 1 or 2"):
        Phase(3, 1)
