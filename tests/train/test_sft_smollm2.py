"""`python -m jaxreason sft` on the real SmolLM2-135M-Instruct (shipped GGUF): two short steps end to end, and
the exported Hugging Face folder gives transformers the logits of the trained parameters."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxreason.cli import main
from jaxreason.models import load_pretrained

ROOT = Path(__file__).parents[2]
SHORT = ["num_steps=2", "batch_size=8", "max_len=64", "optimizer.total_steps=2", "optimizer.warmup_steps=1",
         "checkpoint.every=2", "mesh.data=1", "mesh.fsdp=-1"]  # parameters sharded over the 8 fake devices


@pytest.mark.slow
def test_smollm2_sft_runs_and_exports_for_transformers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    main(["sft", "--config", str(ROOT / "configs/sft/smollm2.yaml"), *SHORT, f"run_dir={run_dir}"])
    assert capsys.readouterr().out.startswith("sft: finished at step 2, last loss ")
    logged = [json.loads(line) for line in (run_dir / "sft_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2] and all(np.isfinite(row["loss"]) for row in logged)

    base, tokenizer = load_pretrained("smollm2-135m-instruct")
    ids = tokenizer("Q: What is 3 * 4?\n3 * 4 = 12\nThe answer is 12")["input_ids"]
    before = np.asarray(base(np.asarray([ids], np.int32)))[0]
    del base  # one 135M model in memory at a time
    trained, tokenizer = load_pretrained(run_dir / "model")
    ours = np.asarray(trained(np.asarray([ids], np.int32)))[0]
    assert not np.allclose(ours, before)  # the steps changed the model
    reference = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model", torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    assert transformers.AutoTokenizer.from_pretrained(run_dir / "model")(
        "What is 12 * 7?")["input_ids"] == tokenizer("What is 12 * 7?")["input_ids"]
