"""`experiments.sweep.ResultsFile`: resume, atomic writes, refusal of foreign workdirs."""

import json

import pytest

from experiments.sweep import RESULTS, ResultsFile


def test_add_then_reopen_skips_done_cells(tmp_path):
    s = ResultsFile(tmp_path, "toy", fixed={"steps": 3, "grid": (1, 2)})
    s.add({"seed": 0, "acc": 0.5}, summary={"mean": 0.5})
    s.add({"seed": 1, "acc": 0.7})
    again = ResultsFile(tmp_path, "toy", fixed={"steps": 3, "grid": [1, 2]})
    assert again.done(["seed"]) == {(0,), (1,)}
    assert again.summary == {"mean": 0.5}
    assert not (tmp_path / (RESULTS.removesuffix(".json") + ".json.tmp")).exists()
    assert json.loads((tmp_path / RESULTS).read_text())["experiment"] == "toy"


def test_refuses_other_experiment_other_settings_and_foreign_dirs(tmp_path):
    ResultsFile(tmp_path / "a", "toy", fixed={"steps": 3}).write()
    with pytest.raises(ValueError, match="experiment 'toy', not 'mqar'"):
        ResultsFile(tmp_path / "a", "mqar", fixed={"steps": 3})
    with pytest.raises(ValueError, match=r"steps: 3 != 4"):
        ResultsFile(tmp_path / "a", "toy", fixed={"steps": 4})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="not a toy sweep"):
        ResultsFile(tmp_path / "b", "toy", fixed={})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--workdir=.*is not a directory"):
        ResultsFile(tmp_path / "file", "toy", fixed={})
