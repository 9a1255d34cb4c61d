"""The task seam (common/tasks/base.py, registry.py): tasks by name or import path, a task defined in a test
module run end to end, and no branching on the task's name outside the task modules."""

from __future__ import annotations

import json
import re

import pytest

from common.run.config import compose
from common.run.errors import FedshopError
from common.tasks import registry
from common.tasks.base import Task, train_seed
from tests.conftest import ROOT, TINY, run_cli

TOY = "tests.toy_task:ToyRating"
TOY_ARGS = [*TINY, "data=synthetic_reviews", "data.synthetic.num_reviews=600", f"data.task={TOY}",
            "simulation.num_merchants=3", "strategy.num_rounds=2"]


def test_built_in_tasks_are_found_by_name_and_a_users_by_import_path():
    assert registry.task_class("relevance").pair and not registry.task_class("sentiment").pair
    toy = registry.task_class(TOY)
    assert issubclass(toy, Task) and toy is registry.task_class("tests.toy_task.ToyRating")


@pytest.mark.parametrize("name,message", [
    ("ranking", r"data.task=ranking: unknown task; expected one of \[.*'relevance', 'retrieval', 'sentiment'"),
    ("tests.toy_task:Nope", r"data.task=tests.toy_task:Nope: cannot import it"),
    ("common.run.config:FedshopConfig", r"is not a subclass of common.tasks.base.Task"),
])
def test_an_unknown_task_is_refused_naming_the_field(name, message):
    with pytest.raises(FedshopError, match=message):
        registry.get_task(compose(["task=relevance", f"data.task={name}"]))


def test_a_pair_task_without_a_second_text_column_is_refused():
    with pytest.raises(FedshopError, match="data.columns.text_pair: a column name is needed for data.task=relevance"):
        registry.get_task(compose(["task=relevance", "data.columns.text_pair=null"]))


def test_two_tasks_under_one_name_are_refused():
    class Other(Task):
        pass

    with pytest.raises(FedshopError, match="two tasks are registered as 'relevance'"):
        registry.register_task("relevance")(Other)


def test_the_seed_of_a_round_is_derived_in_one_place():
    assert train_seed(42, 3, 7) == 42 * 1_000_003 + 3 * 1009 + 7 and train_seed(42, 3) == 42 * 1_000_003 + 3


def test_nothing_outside_the_task_modules_branches_on_the_task_name():
    pattern = re.compile(r"task\s*[!=]=\s*[\"']|[\"'](relevance|sentiment)[\"']\s*[!=]=\s*\S*task")
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "outputs", "multirun"} or rel.parts[:2] == ("common", "tasks"):
            continue
        found += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_a_task_from_a_test_module_trains_federated_and_centralized(tmp_path):
    """The toy regression task, named by import path only, through a 2-round Flower simulation and the centralized
    baseline: both learn (test MSE below the untrained model's) and write their run directories."""
    finals = {}
    for mode in ("federated", "centralized"):
        cwd = tmp_path / mode
        cwd.mkdir()
        proc = run_cli("simulation", [*TOY_ARGS, f"mode={mode}"], cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (results,) = cwd.glob("outputs/*/*/results.json")
        doc = json.loads(results.read_text())
        rounds = [r["server"]["loss"] for r in doc["rounds"]]
        assert doc["status"] == "completed" and len(rounds) == 3, doc
        assert rounds[-1] < rounds[0], rounds
        assert {"mae", "loss"} <= set(doc["final"])
        assert (results.parent / "model" / "config.json").is_file()
        finals[mode] = doc["final"]
    assert json.loads((next(tmp_path.glob("federated/outputs/*/*/model/fedshop_labels.json"))).read_text())[
        "task"] == TOY
