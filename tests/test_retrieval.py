"""The dual-encoder task (common/tasks/retrieval.py): its loss, round 0, the saved directory, bad input."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch

from common.run.config import compose
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks.encoder import Encoder
from common.tasks.registry import get_task
from common.tasks.retrieval import Group, batch_targets, groups_of, listwise_loss
from tests.conftest import run_cli

SMALL = ["task=retrieval", "train.progress=false", "simulation.num_merchants=3", "data.synthetic.num_queries=40",
         "data.synthetic.test_queries=30", "data.synthetic.hard_queries=10", "eval.round_queries=8"]


def _loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The listwise loss of a (queries x products) score matrix: q = the unit rows, p = the scores' columns."""
    return listwise_loss(torch.eye(scores.shape[0]), scores.T, targets, 0.05)


def test_the_loss_prefers_the_judged_order_and_one_step_lowers_it():
    """Two queries, four products: query 0 judges products 0 (exact) and 1 (substitute), query 1 products 2 (exact)
    and 3 (complement); the rest of the batch is each query's in-batch negatives."""
    targets = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 1.0, 0.01]])
    judged = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.0, 0.1, 0.9, 0.5]])
    assert float(_loss(judged, targets)) < float(_loss(judged.flip(1), targets))
    scores = judged.flip(1).clone().requires_grad_(True)
    before = _loss(scores, targets)
    (grad,) = torch.autograd.grad(before, scores)
    with torch.no_grad():
        scores -= 0.01 * grad
    assert float(_loss(scores.detach(), targets)) < float(before.detach())


def test_a_batch_shares_products_and_keeps_every_querys_own_gains():
    a, b = Group([1], [[5], [6]], [1.0, 0.1]), Group([2], [[6], [7]], [0.01, 1.0])
    products, targets = batch_targets([a, b])
    assert products == [[5], [6], [7]]
    np.testing.assert_allclose(targets.numpy(), [[1.0, 0.1, 0.0], [0.0, 0.01, 1.0]], rtol=1e-6)


def test_a_query_without_a_positive_product_is_refused_naming_it():
    ds = datasets.Dataset.from_dict({"query_id": ["q1", "q1", "q2"], "q_ids": [[1], [1], [2]],
                                     "p_ids": [[3], [4], [5]], "label": [0, 3, 3]})
    with pytest.raises(FedshopError, match="shard.csv: query 'q2' has no product with a positive gain"):
        groups_of(ds, [1.0, 0.1, 0.01, 0.0], "shard.csv")


@pytest.fixture(scope="module")
def tiny():
    cfg = compose([*SMALL, "model=tiny", "train.lr=1e-3"])
    fd = D.prepare(cfg)
    wb = get_task(cfg).workbench(fd.labels)
    return cfg, fd, wb


def _records(wb, fd, n):
    return groups_of(wb.task.tokenize(fd.train[0], wb), wb.gains)[:n]


def test_removing_one_record_changes_the_clipped_sum_by_at_most_c(tiny):
    """privacy=example's bound: each record's loss is its query against its own products only, so dropping any one
    record moves the sum of clipped gradients by at most C (here C is small enough that every record is clipped)."""
    _, fd, wb = tiny
    records, clip = _records(wb, fd, 6), 0.05
    wb.model.eval()  # dropout off: the two sums are then the same computation but for the dropped record
    params = [p for p in wb.model.parameters() if p.requires_grad]
    args = (clip, 0, torch.device("cpu"), params)
    full, _ = wb.task.clipped_sum(wb.model, records, *args)
    for i in range(len(records)):
        without, _ = wb.task.clipped_sum(wb.model, records[:i] + records[i + 1:], *args)
        moved = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(full, without, strict=True))))
        assert clip * 0.99 < moved <= clip * (1 + 1e-4), (i, moved)


def test_dual_encoder_dp_sgd_trains_on_poisson_batches_and_extends_the_history(tiny):
    from common.tasks.dp import RecordDP, sample_rate, steps_per_round

    cfg, fd, wb = tiny
    ds = wb.task.tokenize(fd.train[0], wb)
    n = wb.task.num_records(ds)
    assert n == len(set(fd.train[0]["query_id"])) < len(ds)  # a record is a query with its judged products
    before = [p.detach().clone() for p in wb.model.parameters()]
    private = RecordDP(noise_multiplier=1.0, clipping_norm=1.0, history=[(2.0, 0.5, 3)])
    out = wb.task.train(wb, ds, 2, 0, dp=private)
    assert private.history == [(2.0, 0.5, 3), (1.0, sample_rate(n, cfg.train.batch_size),
                                               steps_per_round(n, cfg.train.batch_size, 2))]
    after = list(wb.model.parameters())
    assert out["train-loss"] > 0 and any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_record_level_private_dual_encoder_federation_accounts_every_merchant(tmp_path):
    """privacy=example end to end with the dual encoder: every merchant reports its epsilon on its own records,
    within the target."""
    args = ["task=retrieval", "model=tiny", "train.progress=false", *SMALL[2:], "strategy.num_rounds=2",
            "privacy=example", "privacy.target_epsilon=8", "live.port=null", f"hydra.run.dir={tmp_path}/run"]
    proc = run_cli("simulation", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["status"] == "completed"
    eps = [r["record_epsilon"] for r in doc["rounds"][2]["replied"]]
    assert len(eps) == 3 and all(0 < e <= 8.0 + 1e-6 for e in eps), eps
    assert (tmp_path / "run" / "model" / "modules.json").is_file()


@pytest.fixture(scope="module")
def minilm():
    cfg = compose([*SMALL, "model=minilm"])
    fd = D.prepare(cfg)
    wb = get_task(cfg).workbench(fd.labels)
    return cfg, fd, wb, wb.task.evaluation(wb, fd.test)


def test_round_0_is_the_pretrained_bi_encoder(minilm):
    """Before any training the federated encoder ranks the catalog exactly as retrieval alone does."""
    _, _, wb, ev = minilm
    start, alone = ev(wb.model, True), ev.baselines()["retrieval"]
    for key in ("catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first"):
        assert start[key] == pytest.approx(alone[key], abs=1e-9), key


def test_lora_exchanges_only_the_adapters():
    cfg = compose([*SMALL, "model=tiny", "finetune=lora"])
    task = get_task(cfg)
    names = list(task.exchanged(task.build_model(["exact", "substitute", "complement", "irrelevant"], 0)))
    assert names and all("lora_" in n for n in names), names


def test_training_improves_the_judged_ranking_and_the_saved_directory_embeds_the_same(minilm, tmp_path):
    cfg, fd, wb, ev = minilm
    task = wb.task
    before = task.evaluate(wb, task.tokenize(fd.pooled_train, wb))
    task.train(wb, task.tokenize(fd.pooled_train, wb), 1, 0)
    after = task.evaluate(wb, task.tokenize(fd.pooled_train, wb))
    assert after["loss"] < before["loss"], (before, after)
    task.save(wb, tmp_path / "model")
    texts = ["grey sofa", "running shoes size 10", "Acme red kettle 1.7 l"]
    saved = Encoder(tmp_path / "model", cfg.train.max_length).encode(texts)
    ids = [wb.tokenizer(t, truncation=True, max_length=cfg.train.max_length)["input_ids"] for t in texts]
    np.testing.assert_allclose(saved, task.embed_all(wb, ids).numpy(), atol=1e-5)
    assert (tmp_path / "model" / "modules.json").is_file()
    assert (tmp_path / "model" / "1_Pooling" / "config.json").is_file()


def test_a_federated_dual_encoder_simulation_scores_the_catalog_every_round(tmp_path):
    """Two rounds of three tiny-model merchants through Flower: every round retrieves from the whole catalog, the
    console line shows it, and the run ends with a sentence-embedding directory."""
    args = ["task=retrieval", "model=tiny", "train.progress=false", "train.lr=1e-3", *SMALL[2:],
            "strategy.num_rounds=2"]
    proc = run_cli("simulation", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("outputs/*/*/results.json")
    doc = json.loads(results.read_text())
    assert doc["status"] == "completed" and [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    for r in doc["rounds"]:
        assert {"catalog_ndcg@10", "catalog_mrr", "catalog_recall@10", "hard_first", "ndcg@10"} <= set(r["server"])
    assert set(doc["baselines"]) == {"retrieval", "keyword"}
    assert doc["rounds"][1]["train"]["train-loss"] > 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "| catalog nDCG@10 " in line]
    assert len(lines) == 3 and all("| MRR " in line and "| recall@10 " in line for line in lines), lines
    model = results.parent / "model"
    assert (model / "modules.json").is_file()
    assert json.loads((model / "fedshop_labels.json").read_text())["task"] == "retrieval"


def test_the_cross_encoder_ranker_refuses_a_dual_encoder_directory(minilm, tmp_path):
    """The cross-encoder stage (a cross-encoder serving.model_dir, or serving.reranker) refuses a dual-encoder
    directory and says where it belongs."""
    from serving.ranker import Ranker

    _, _, wb, _ = minilm
    wb.task.save(wb, tmp_path / "model")
    with pytest.raises(FedshopError, match="a data.task=retrieval model \\(retriever\\), not a cross-encoder; a dual "
                                           "encoder is served as serving.model_dir=<dir> itself"):
        Ranker(tmp_path / "model")
    assert Encoder(tmp_path / "model").encode(["grey sofa"]).shape == (1, 384)


# central and client in the default suite (about 40 s each with the tiny model); local and SecAgg+ in the slow one.
@pytest.mark.parametrize("more", [["privacy=central"], ["privacy=client"],
                                  pytest.param(["privacy=local", "privacy.local_epsilon=50"], marks=pytest.mark.slow),
                                  pytest.param(["secagg=plus", "privacy=client"], marks=pytest.mark.slow)])
def test_merchant_level_presets_and_secagg_train_the_lora_dual_encoder(more, tmp_path):
    """Merchant-level DP presets (and SecAgg+ under client-side clipping) with the dual encoder and LoRA: the run
    completes, is accounted every round, and ends with a sentence-embedding directory."""
    args = ["task=retrieval", "model=tiny", "finetune=lora", "train.progress=false", *SMALL[2:],
            "strategy.num_rounds=2", "privacy.clipping_norm=0.05", "privacy.noise_multiplier=0.5", *more,
            "live.port=null", f"hydra.run.dir={tmp_path}/run"]
    proc = run_cli("simulation", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["status"] == "completed" and doc["privacy"]["releases"] == 2
    eps = [r["privacy"]["epsilon"] for r in doc["rounds"][1:]]
    assert 0 < eps[0] < eps[1], eps
    if "secagg=plus" in more:
        assert all(r["secure_aggregation"]["survivors"] == 3 for r in doc["rounds"][1:])
    assert all("catalog_ndcg@10" in r["server"] for r in doc["rounds"])
    assert (tmp_path / "run" / "model" / "modules.json").is_file()
