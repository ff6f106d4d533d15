"""`python -m jaxreason search`: the comparison table and its JSON, MCTS split over the test mesh's devices."""

import json
from pathlib import Path

import pytest

from jaxreason.cli import main
from jaxreason.search.run import METHODS

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "search" / "tiny_arith.yaml"


def test_search_command_prints_and_writes_the_table(tmp_path, capsys):
    output = tmp_path / "table.json"
    main(["search", "--config", str(CONFIG), f"output={output}"])  # 8 fake devices: MCTS's 4 problems padded to 8
    printed = capsys.readouterr().out.splitlines()
    rows = json.loads(output.read_text())
    assert sorted(r["method"] for r in rows) == sorted(METHODS)  # the config lists every method
    assert printed[0].split() == ["method", "accuracy", "gen.", "tokens", "wall", "s"]
    for line, row in zip(printed[1:], rows):
        assert line.split()[0] == row["method"] and row["problems"] == 4
        assert 0 <= row["accuracy"] <= 1 and row["generated_tokens"] > 0 and row["seconds"] >= 0
        assert int(line.split()[2]) == row["generated_tokens"]


def test_search_command_names_a_bad_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["search", "--config", str(CONFIG), "budget.mcts.simulations=4"])
    assert "simulations" in capsys.readouterr().err
