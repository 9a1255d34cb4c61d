"""End to end through the real launcher: Flower simulations, baselines, overrides, sweeps, bring-your-own data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY, TINY_REVIEWS, assert_replies_carry_no_data, run_cli
from tests.test_data import rows, write_csv


def only_run_dir(root: Path) -> Path:
    found = [p.parent for p in root.glob("outputs/*/*/results.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def fed_run(tmp_path_factory) -> tuple[Path, str]:
    """One 2-round federated simulation of 3 tiny-model merchants on the review data."""
    cwd = tmp_path_factory.mktemp("fed")
    proc = run_cli("simulation", [*TINY_REVIEWS, "simulation.num_merchants=3", "strategy.num_rounds=2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return only_run_dir(cwd), proc.stdout + proc.stderr


def test_federated_simulation_learns_and_writes_run_directory(fed_run):
    run_dir, output = fed_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    from common.run.config import compose
    from common.tasks import data as D

    fd = D.prepare(compose(["task=relevance", *TINY_REVIEWS, "simulation.num_merchants=3"]))
    majority = np.bincount(fd.test["label"]).max() / len(fd.test)
    assert results["final"]["accuracy"] > majority + 0.05, (results["final"], majority)
    for r in rounds[1:]:
        assert len(r["sampled"]) == 3 and len(r["replied"]) == 3 and r["dropped"] == []
        assert sorted(x["merchant"] for x in r["replied"]) == fd.names
        assert sorted(x["merchant"] for x in r["sampled"]) == fd.names
        assert {x["num_examples"] for x in r["replied"]} == {len(t) for t in fd.train}
        assert all(x["bytes_up"] > 100_000 and abs(x["bytes_down"] - x["bytes_up"]) < 1000 for x in r["replied"])
        assert {"loss", "accuracy", "macro_f1"} <= set(r["evaluate"])
        assert r["seconds"] > 0
        # Each merchant counts its rounds in its own Context.state: written in round 1, read back in round 2.
        assert {x["rounds_trained"] for x in r["replied"]} == {r["round"]}
    # one concise line per round on the console
    assert sum("| acc " in line for line in output.splitlines()) == 3
    # checkpoint.keep_last=2: round 0's checkpoint went once round 2's was written
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_1.pt", "round_2.pt"]
    for name in ("metrics.png", "confusion.png", "model/config.json",
                 "model/fedshop_labels.json", ".hydra/config.yaml", "resolved_config.yaml"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "flwr").is_dir()


def test_a_federated_relevance_run_scores_the_judged_catalog_each_round_and_everything_at_the_end(tmp_path):
    """The built-in marketplace's evaluation end to end: each round a fixed subset of the judged test queries, the
    last round all of them with the hard queries; per-class recall, the confusion matrix and its picture, and
    the catalog re-ranking beside retrieval alone and keyword in results.json."""
    args = [*TINY, "simulation.num_merchants=3", "strategy.num_rounds=2", "data.synthetic.num_queries=40",
            "data.synthetic.test_queries=30", "data.synthetic.hard_queries=10", "eval.round_queries=8",
            "eval.catalog_top_n=10"]
    proc = run_cli("simulation", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    described = results["evaluation"]
    assert described["test_queries"] == 30 and described["round_queries"] == 8
    assert described["catalog_products"] == described["test_examples"] == results["test_examples"]
    assert [r["server"]["eval"] for r in results["rounds"]] == ["subset", "subset", "full"]
    assert [r["server"]["num-examples"] for r in results["rounds"]] == [described["round_examples"]] * 2 + [
        described["test_examples"]]
    final = results["final"]
    assert set(final["recall"]) == set(results["labels"])
    assert sum(map(sum, final["confusion"])) == results["test_examples"]
    for key in ("catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first"):
        assert 0.0 <= final[key] <= 1.0
        assert key in results["baselines"]["retrieval"] and key in results["baselines"]["keyword"]
    assert set(final["hard_first_by_kind"]) == {"colour", "size", "brand", "sibling", "accessory"}
    assert (run_dir / "confusion.png").stat().st_size > 10_000
    assert "catalog nDCG@10" in proc.stdout and "recall exact" in proc.stdout


def test_merchant_replies_carry_only_model_arrays_and_scalar_metrics(fed_run):
    """... and no node is asked who it is: the launcher's roster already says (K messages fewer per run)."""
    run_dir, _ = fed_run
    counts = assert_replies_carry_no_data(run_dir)
    assert counts["train"] == 6 and counts.get("query", 0) == 0 and counts.get("evaluate", 0) == 3


def test_secure_aggregation_simulation_matches_fedavg_and_reveals_no_update(fed_run, tmp_path):
    """secagg=plus in a real Flower simulation: four protocol stages a round, the first round's model equals
    the plain run's within the quantisation error, and what merchants sent is protocol values only."""
    from common.run import checkpoint as C

    plain_dir, _ = fed_run
    proc = run_cli("simulation", [*TINY_REVIEWS, "simulation.num_merchants=3", "strategy.num_rounds=2",
                                  "secagg=plus"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["final"]["accuracy"] > 0.5
    first = results["rounds"][1]
    secure = first["secure_aggregation"]
    assert [s["stage"] for s in secure["stages"]] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    assert secure["survivors"] == 3 and secure["num_shares"] == 3 and secure["clipped_values"] == 0
    sizes = [x["num_examples"] for x in first["replied"]]
    assert secure["max_weight"] == max(sizes)
    # |error| < 2R m / sum(q_i), q_i = round(n_i / max_weight * T) (tests/test_secagg.py has the derivation)
    bound = 2 * 1.0 * 3 / sum(round(n / max(sizes) * 2**22) for n in sizes)
    got = C.load(run_dir / "checkpoints" / "round_1.pt")["weights"]
    want = C.load(plain_dir / "checkpoints" / "round_1.pt")["weights"]
    err = max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in got)
    assert 0 < err <= bound + 2e-7, (err, bound)
    plain = json.loads((plain_dir / "results.json").read_text())["rounds"][1]
    assert first["bytes_up_total"] <= 1.01 * plain["bytes_up_total"]  # masked uint32 vs float32 update
    counts = assert_replies_carry_no_data(run_dir)
    assert counts["train"] == 2 * 4 * 3  # rounds x stages x merchants


def test_final_model_reloads_and_predicts_like_the_global_model(fed_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.run import checkpoint as C
    from common.run.config import compose
    from common.tasks import data as D
    from common.tasks import exchange
    from common.tasks import model as M
    from common.tasks import train as T

    run_dir, _ = fed_run
    cfg = compose(["task=relevance", *TINY_REVIEWS, "simulation.num_merchants=3", "strategy.num_rounds=2"])
    fd = D.prepare(cfg)
    in_memory = M.build_model(cfg.model, fd.labels, cfg.seed, cfg.finetune)
    exchange.load(in_memory, C.load(run_dir / "checkpoints" / "round_2.pt")["weights"])
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert reloaded.config.id2label == dict(enumerate(fd.labels))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    test = M.tokenize(fd.test, tokenizer, cfg.train.max_length)
    p1, _ = T.predict(in_memory, test, tokenizer, cfg.train)
    p2, _ = T.predict(reloaded, test, tokenizer, cfg.train)
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    assert (p1.argmax(1) == p2.argmax(1)).all()
    with torch.no_grad():
        enc = tokenizer(["This sofa broke on the first day."], return_tensors="pt")
        assert reloaded(**enc).logits.shape == (1, len(fd.labels))


def test_sweep_over_modes_scores_the_same_test_file_rows_and_writes_a_summary(tmp_path):
    """A Hydra multirun (one process, one job after another) over federated, centralized and alone on your own
    CSV with data.test_path: all three score the file's rows, no row of the training file is held out for
    testing, and the sweep's summary (CSV and Markdown) has a row per job."""
    train = write_csv(tmp_path / "my shop data.csv", rows(120))
    test = write_csv(tmp_path / "held out.csv", [{**r, "search_term": f"other {r['search_term']}"} for r in rows(48)])
    args = [*TINY, "data=csv", f"data.path='{train}'", f"data.test_path='{test}'", "data.columns.text=search_term",
            "data.columns.text_pair=title", "data.columns.label=grade", "data.columns.merchant=shop",
            "data.columns.query_id=qid", "simulation.num_merchants=2", "strategy.num_rounds=1"]
    proc = run_cli("simulation", ["-m", *args, "mode=federated,centralized,alone"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dirs = list(tmp_path.glob("multirun/*/*"))
    assert len(sweep_dirs) == 1
    summary = list(csv.DictReader((sweep_dirs[0] / "summary.csv").open()))
    assert list(summary[0])[:7] == ["job", "best", "overrides", "status", "accuracy", "macro_f1", "ndcg@10"]
    best = max(summary, key=lambda r: float(r["macro_f1"]))  # the run's objective (conf/config.yaml: macro_f1)
    assert [r["job"] for r in summary if r["best"] == "yes"] == [best["job"]]
    assert [(r["job"], r["overrides"].split()[-1], r["status"]) for r in summary] == [
        ("0", "mode=federated", "completed"), ("1", "mode=centralized", "completed"), ("2", "mode=alone", "completed")]
    assert "| job |" in (sweep_dirs[0] / "summary.md").read_text()
    found = {m: json.loads((sweep_dirs[0] / str(j) / "results.json").read_text())
             for j, m in enumerate(("federated", "centralized", "alone"))}
    for mode in found:
        assert f"{mode}: 2 merchants" in proc.stdout and ", 48 test examples" in proc.stdout, proc.stdout
    assert {r["test_examples"] for r in found.values()} == {48}
    assert len({r["test_digest"] for r in found.values()}) == 1
    from common.run.config import compose
    from common.tasks import data as D

    cfg = compose([a.replace("'", "") for a in args])
    fd = D.prepare(cfg)
    assert D.rows_digest(fd.test) == found["federated"]["test_digest"]
    assert sum(len(t) + len(v) for t, v in zip(fd.train, fd.val, strict=True)) == 120  # nothing carved out
    assert found["federated"]["merchants"] == ["shop_0", "shop_1"]
    assert found["federated"]["labels"] == ["complement", "exact", "irrelevant", "substitute"]
    assert found["centralized"]["train_examples"] == sum(len(t) for t in fd.train)
    assert sorted(found["alone"]["per_merchant"]) == ["shop_0", "shop_1"]


def test_optuna_searches_through_hydra_and_marks_the_best_trial(tmp_path):
    """`+search=optuna` (hydra/sweeper=optuna with fedshop's search space): each trial is a run whose final objective
    Optuna maximises; Optuna's own results and fedshop's summary agree on the best trial."""
    import yaml

    fixed = [a for a in TINY_REVIEWS if not a.startswith("train.lr=")]  # an override fixes a searched key
    args = [*fixed, "simulation.num_merchants=2", "data.synthetic.num_reviews=300", "+search=optuna",
            "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2", "train.local_epochs=1",
            "mode=centralized"]  # the sweeper is the same in every mode; centralized starts no Ray per trial
    proc = run_cli("simulation", ["-m", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next(tmp_path.glob("multirun/*/*"))
    summary = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(summary) == 3 and all(r["status"] == "completed" for r in summary)
    lrs = {float(dict(o.split("=") for o in r["overrides"].split())["train.lr"]) for r in summary}
    assert len(lrs) == 3 and all(3e-4 <= lr <= 6e-3 for lr in lrs)  # drawn from the search space
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = [r for r in summary if r["best"] == "yes"]
    assert len(best) == 1 and float(best[0]["macro_f1"]) == pytest.approx(optuna["best_value"], abs=1e-4)


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    proc = run_cli("simulation", [*TINY, "data=csv", f"data.path={tmp_path}/missing.csv"], tmp_path)
    assert proc.returncode == 2
    assert f"fedshop: error: data file {tmp_path}/missing.csv: not found (data.path)" in proc.stderr
    assert "Traceback" not in proc.stderr
