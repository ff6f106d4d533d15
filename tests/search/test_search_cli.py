"""`python -m jaxreason search`: the comparison table and its JSON; the methods that score are not run without a
trained verifier, and all run with one (a saved value model, found through a run folder), MCTS split over the test
mesh's devices."""

import json
from pathlib import Path

import jax
import pytest
import yaml
from flax import nnx

from jaxreason.cli import main
from jaxreason.models import ModelConfig, ValueModel, save_value_model
from jaxreason.models.char_tokenizer import build_char_tokenizer
from jaxreason.models.pretrained import VALUE_HEAD_FILE
from jaxreason.search.command import value_model_folder
from jaxreason.search.methods import method_names, needs_verifier

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "search" / "tiny_arith.yaml"
HEADER = ["method", "accuracy", "gen.", "tokens", "verifier", "tok.", "wall", "s"]
METHODS = yaml.safe_load(CONFIG.read_text())["methods"]


def _run(output: Path, capsys, *overrides) -> tuple[list[str], list[dict]]:
    main(["search", "--config", str(CONFIG), f"output={output}", *overrides])
    return capsys.readouterr().out.splitlines(), json.loads(output.read_text())


def test_without_a_verifier_the_scoring_methods_are_not_run(tmp_path, capsys):
    assert sorted(METHODS) == sorted(method_names())  # the config lists every method
    printed, rows = _run(tmp_path / "table.json", capsys)
    assert printed[0].split() == HEADER
    # The methods that run first, in the config's order, then those not run.
    assert [r["method"] for r in rows] == ([m for m in METHODS if not needs_verifier(m)] +
                                           [m for m in METHODS if needs_verifier(m)])
    assert [r["method"] for r in rows if "skipped" not in r] == ["greedy", "self_consistency", "rstar"]
    for line, row in zip(printed[1:], rows):
        assert line.split()[0] == row["method"] and row["problems"] == 4
        if "skipped" in row:
            assert needs_verifier(row["method"]) and "verifier.path" in row["skipped"]
            assert line.split()[1:3] == ["not", "run:"]
        else:
            assert 0 <= row["accuracy"] <= 1 and row["generated_tokens"] > 0 and row["seconds"] >= 0
            assert row["verifier_tokens"] == 0
            assert [int(x) for x in line.split()[2:4]] == [row["generated_tokens"], row["verifier_tokens"]]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A training run's folder whose newest exported PRM (models/prm_12: 12 > 3, numerically) is a tiny random
    value model on the scratch policy's tokenizer; models/prm_3 holds no model, so taking it would fail."""
    tokenizer = build_char_tokenizer()
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = ValueModel(config, rngs=nnx.Rngs(1))
    model.head[...] = jax.random.normal(jax.random.key(2), model.head.shape)
    run = tmp_path_factory.mktemp("train_run")
    save_value_model(model, run / "models" / "prm_12", tokenizer)
    (run / "models" / "prm_3").mkdir()
    (run / "models" / "prm_3" / VALUE_HEAD_FILE).write_text("not a model")
    return run


def test_value_model_folder(run_folder, tmp_path):
    assert value_model_folder(run_folder) == run_folder / "models" / "prm_12"
    assert value_model_folder(run_folder / "models" / "prm_3") == run_folder / "models" / "prm_3"
    with pytest.raises(FileNotFoundError, match="neither a value-model folder"):
        value_model_folder(tmp_path)


def test_with_a_trained_verifier_every_method_runs(run_folder, tmp_path, capsys):
    # 8 fake devices: MCTS's 4 problems padded to 8
    printed, rows = _run(tmp_path / "table.json", capsys, f"verifier.path={run_folder}")
    assert [r["method"] for r in rows] == METHODS
    assert printed[0].split() == HEADER
    for line, row in zip(printed[1:], rows):
        assert "skipped" not in row and row["problems"] == 4
        assert line.split()[0] == row["method"]
        assert 0 <= row["accuracy"] <= 1 and row["generated_tokens"] > 0 and row["seconds"] >= 0
        assert (row["verifier_tokens"] > 0) == needs_verifier(row["method"]), row
        assert [int(x) for x in line.split()[2:4]] == [row["generated_tokens"], row["verifier_tokens"]]


def test_search_command_names_a_bad_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["search", "--config", str(CONFIG), "budget.mcts.simulations=4"])
    assert "simulations" in capsys.readouterr().err
