"""The shipped SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading (the PyTorch reference)."""

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxreason.models import load_pretrained
from jaxreason.sampling import SamplingConfig, encode_prompts, generate

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many",
    "Solve step by step: 17 * 3 + 4 =",
    "The capital of France is",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(smollm2_path):
    ours, tokenizer = load_pretrained("smollm2-135m-instruct")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32
    ).eval()
    return ours, ref, tokenizer


def test_logits_match_transformers(models):
    ours, ref, tokenizer = models
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        mine = np.asarray(ours(np.asarray([ids], np.int32)))[0]
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_array_equal(mine.argmax(-1), theirs.argmax(-1))
        assert np.abs(mine - theirs).max() / np.abs(theirs).max() < 1e-3


def test_greedy_generate_matches_transformers(models):
    ours, ref, tokenizer = models
    tokens, mask = encode_prompts(tokenizer, PROMPTS)  # left-padded batch of different lengths
    out = generate(ours, tokens, mask, jax.random.key(0), SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0),
                   eos_ids=ours.config.eos_token_ids, pad_id=tokenizer.pad_token_id)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
        theirs = theirs[0, ids.shape[1]:].tolist()
        mine = np.asarray(out.tokens[i, : int(out.lengths[i])]).tolist()
        assert mine == theirs, (prompt, tokenizer.decode(mine), tokenizer.decode(theirs))


def test_chat_template_is_applied(models):
    _, _, tokenizer = models
    tokens, mask = encode_prompts(tokenizer, ["What is 2 + 2?"], chat=True)
    text = tokenizer.decode(np.asarray(tokens[0])[np.asarray(mask[0]) == 1])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
