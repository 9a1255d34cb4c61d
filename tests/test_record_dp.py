"""Record-level DP (privacy=example): per-example clipping, DP-SGD against ordinary training, Opacus's
accountant against a published figure, the merchant's budget (planning, declining, persistence), the wire's
decline, the combinations refused, and a merchant's budget stop in a real simulation."""

from __future__ import annotations

import json
import math
from functools import cache

import datasets
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from transformers import PreTrainedTokenizerBase

from common.protocol import wire
from common.protocol.merchant_state import RecordBudget
from common.run.config import FedshopConfig, compose
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks import dp
from common.tasks import model as M
from common.tasks import train as T
from server.report import record_privacy
from server.strategy import build_strategy
from tests.conftest import TINY, TINY_REVIEWS, run_cli
from tests.test_strategy import aggregator, sent

LORA_REVIEWS = ["finetune=lora" if a == "finetune=full" else a for a in TINY_REVIEWS]
IID = [*LORA_REVIEWS, "partition=iid"]  # merchants of one size: one target sits between rounds 1 and 2 for all


@cache
def tiny(finetune: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, FedshopConfig]:
    """The tiny model (LoRA or full) and its tokenizer, and the config they come from."""
    cfg = compose(["task=relevance", *TINY, f"finetune={finetune}", "train.progress=false"])
    return M.build_model(cfg.model, ["a", "b", "c"], 0, cfg.finetune), M.load_tokenizer(cfg.model), cfg


def examples(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int],
             cfg: FedshopConfig) -> datasets.Dataset:
    """Tokenised (query, product) pairs with these labels."""
    ds = datasets.Dataset.from_dict({"text": texts, "text_pair": [t[::-1] for t in texts], "label": labels,
                                     "query_id": list(range(len(texts)))})
    return M.tokenize(ds, tokenizer, 16)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DP-SGD clips and noises."""
    return [p for p in model.parameters() if p.requires_grad]


def norm(grads: list[torch.Tensor | None]) -> float:
    """The L2 norm of these gradients taken together (in float64)."""
    assert all(g is not None for g in grads)
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def clipped_gradient(finetune: str, mode: str, text: str, label: int, clip: float) -> tuple[float, float]:
    """(the norm of one example's clipped gradient as DP-SGD sums it, the unclipped norm) with no noise."""
    model, tokenizer, cfg = tiny(finetune)
    ds = examples(tokenizer, [text], [label], cfg)
    loader = T._loader(ds, tokenizer, 1, shuffle=False, seed=0)
    model.zero_grad(set_to_none=True)
    batch = next(T._batches(loader, torch.device("cpu")))
    model.train()
    torch.manual_seed(0)  # the same dropout masks in both passes
    model(**batch).loss.backward()
    raw = norm([p.grad for p in trainable(model)])
    model.zero_grad(set_to_none=True)
    record = dp.RecordDP(0.0, clip, mode=mode, poisson=False)
    opt, loader = record.attach(model, torch.optim.SGD(trainable(model), lr=0.0), loader)
    try:
        batch = dp.RecordDP.per_example_inputs(model, next(T._batches(loader, torch.device("cpu"))))
        opt.zero_grad()
        torch.manual_seed(0)
        record.loss(model(**batch), batch["labels"]).backward()
        if mode == "hooks":
            opt.clip_and_accumulate()  # type: ignore[attr-defined]
            grads = [getattr(p, "summed_grad") for p in trainable(model)]  # noqa: B009 (Opacus adds it)
        else:  # ghost clipping's second backward pass leaves the clipped gradient in .grad
            grads = [p.grad for p in trainable(model)]
        return norm(grads), raw
    finally:
        record.detach()


@settings(max_examples=15, deadline=None)
@given(text=st.text(alphabet="abcdefgh xyz", min_size=1, max_size=40), label=st.integers(0, 2),
       clip=st.floats(1e-4, 10.0), setting=st.sampled_from([("lora", "hooks"), ("full", "ghost"), ("full", "hooks")]))
def test_every_per_example_gradient_is_clipped_to_at_most_c(text, label, clip, setting):
    finetune, mode = setting
    clipped, raw = clipped_gradient(finetune, mode, text, label, clip)
    assert clipped <= clip * (1 + 1e-4)
    assert clipped == pytest.approx(min(raw, clip), rel=1e-3)  # scaled onto the ball, not distorted


@pytest.mark.parametrize("finetune,mode", [("lora", "hooks"), ("full", "ghost")])
def test_dp_sgd_without_noise_or_clipping_is_ordinary_training(finetune, mode):
    """z = 0 and C far above every gradient, fixed batches: the same weights as ordinary training."""
    _, tokenizer, cfg = tiny(finetune)
    train_cfg = cfg.train.__class__(**{**cfg.train.__dict__, "grad_clip": 0.0, "batch_size": 4,
                                       "warmup_ratio": 0.0})
    texts = [f"red sofa {i} grey" * (1 + i % 3) for i in range(12)]
    ds = examples(tokenizer, texts, [i % 3 for i in range(12)], cfg)
    weights = []
    for private in (None, dp.RecordDP(0.0, 1e6, mode=mode, poisson=False)):
        model = M.build_model(cfg.model, ["a", "b", "c"], 0, cfg.finetune)
        if private is None:  # ordinary training shuffles; DP-SGD without Poisson sampling takes the same order
            T.train(model, ds, tokenizer, train_cfg, 2, seed=3)
        else:
            T.train(model, ds, tokenizer, train_cfg, 2, seed=3, dp=private)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_opacus_accountant_reproduces_the_published_mnist_figure():
    """Opacus's compute_dp_sgd_privacy docs: N=60000, batch 256, z=1.12, 60 epochs, RDP orders (10, 20, 100),
    delta=1e-5 -> epsilon 2.95 with the classic conversion; Opacus's accountant converts more tightly."""
    q, steps = 256 / 60000, math.ceil(60 / (256 / 60000))
    rdp = compute_rdp(q=q, noise_multiplier=1.12, steps=steps, orders=[10, 20, 100])
    classic = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip([10, 20, 100], rdp, strict=True))
    assert classic == pytest.approx(2.95, abs=0.01)
    accountant = RDPAccountant()
    accountant.history = [(1.12, q, steps)]
    assert dp.epsilon([(1.12, q, steps)], 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert 2.0 < dp.epsilon([(1.12, q, steps)], 1e-5) <= classic


def test_the_derived_noise_spends_exactly_the_budget_over_the_planned_rounds():
    p = compose(["task=relevance", "privacy=example", "privacy.target_epsilon=4"]).privacy
    history: list[dp.Step] = []
    spent = []
    for rnd in range(1, 4):
        plan = dp.plan_round(p, 16, 2, 700, history, rounds_left=4 - rnd)
        assert plan.epsilon_after <= 4.0
        history.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        spent.append(dp.epsilon(history, p.delta))
    assert spent[0] < spent[1] < spent[2] == pytest.approx(4.0, abs=0.02)
    z = history[0][0]
    fixed = compose(["task=relevance",
                     "privacy=example", f"privacy.noise_multiplier={z}", "privacy.target_epsilon=4"]).privacy
    assert dp.plan_round(fixed, 16, 2, 700, history, rounds_left=1).epsilon_after > 4.0  # one more: over budget
    assert dp.plan_round(fixed, 16, 2, 700, [], rounds_left=3).noise_multiplier == z


def test_a_budget_outlives_the_node_in_the_merchant_run_directory(tmp_path):
    path = tmp_path / "privacy" / "merchant_01.json"
    state = RecordDict()
    RecordBudget([(1.0, 0.02, 100)], [{"round": 1, "epsilon": 2.0}]).save(state, path)
    RecordBudget([(1.0, 0.02, 100), (1.0, 0.02, 100)], [{"round": 1, "epsilon": 2.0},
                                                          {"round": 2, "epsilon": 3.0}]).save(RecordDict(), path)
    assert RecordBudget.load(state, path).rounds[-1]["round"] == 2  # the file is longer than this node's state
    assert RecordBudget.load(RecordDict(), None).history == []
    path.write_text("{not json")
    with pytest.raises(FedshopError, match="merchant_01.json"):
        RecordBudget.load(RecordDict(), path)


def test_a_decline_is_recorded_with_what_the_merchant_spent(task_identity):
    ask = Message(content=RecordDict(), dst_node_id=7, message_type=wire.TRAIN)
    declined = Message(content=wire.Declined(2, "merchant_02: over budget", 3.5).to_content(), reply_to=ask)
    declined.metadata.__dict__["_src_node_id"] = 7
    assert wire.Declined.from_content(declined.content) == wire.Declined(2, "merchant_02: over budget", 3.5)
    chain = aggregator(build_strategy(compose(["task=relevance", *TINY]).strategy), {"w": ((2,), "float32")})
    result = chain.aggregate_train(sent([7], {"w": np.zeros(2, np.float32)}), [declined])
    assert result.arrays is None and result.report.too_few_replies and not result.report.replied
    (drop,) = result.report.dropped
    assert drop.declined and drop.record_epsilon == 3.5 and "over budget" in drop.reason
    summary = record_privacy(result.report, {7: "merchant_02"}, {"merchant_00": 1.0}, 1e-5)
    assert summary["merchants"] == {"merchant_00": 1.0, "merchant_02": 3.5}
    assert summary["declined"] == ["merchant_02"] and summary["epsilon_max"] == 3.5
    broken = RecordDict({wire.METRICS: MetricRecord({wire.MERCHANT_INDEX: 1, wire.DECLINED: 1}),
                         wire.INFO: ConfigRecord({wire.REASON: "x"})})
    with pytest.raises(wire.WireError, match=wire.RECORD_EPSILON):
        wire.Declined.from_content(broken)


@pytest.mark.parametrize("overrides,field", [
    (["strategy=fedprox"], "strategy.name"),
    (["mode=centralized"], "mode"),
    (["privacy.target_epsilon=null"], "privacy.noise_multiplier"),
    (["privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy.grad_sample_mode=functorch"], "privacy.grad_sample_mode"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(overrides, field):
    with pytest.raises(FedshopError, match=field.replace(".", r"\.")):
        compose(["task=relevance", "privacy=example", *overrides])


@pytest.mark.parametrize("overrides", [["secagg=plus", "simulation.num_merchants=3"], ["strategy=fedmedian"],
                                       ["strategy=fedadam"], ["finetune=full"], ["strategy.wire_dtype=float16"]])
def test_what_privacy_example_combines_with(overrides):
    cfg = compose(["task=relevance", "privacy=example", *overrides])
    assert cfg.privacy.record_level and not cfg.privacy.merchant_level


def test_a_merchant_past_its_budget_declines_and_the_run_stops_when_all_have(tmp_path):
    """Fixed noise, a target between the epsilon after one round and after two for every merchant: each trains
    round 1, declines round 2 (the round goes on without it), and the run stops before round 3. LoRA: the
    per-sample gradients come from Opacus's hooks (tests/test_deploy.py runs full fine-tuning, ghost clipping)."""
    z = 2.0
    sizes = [len(t) for t in D.prepare(compose(["task=relevance", *IID, "simulation.num_merchants=3"])).train]
    cfg = compose(["task=relevance", *IID, "simulation.num_merchants=3", "privacy=example"]).train
    after = [[dp.epsilon([(z, dp.sample_rate(n, cfg.batch_size),
                           k * dp.steps_per_round(n, cfg.batch_size, cfg.local_epochs))], 1e-5) for k in (1, 2)]
             for n in sizes]
    target = (max(a[0] for a in after) + min(a[1] for a in after)) / 2
    assert max(a[0] for a in after) < target < min(a[1] for a in after)
    proc = run_cli("simulation", [*IID, "simulation.num_merchants=3", "strategy.num_rounds=4",
                                  "privacy=example", f"privacy.noise_multiplier={z}",
                                  f"privacy.target_epsilon={target}", "live.port=null",
                                  f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "stopped_privacy_budget", results.get("stopped")
    assert results["stopped"]["before_round"] == 3
    first, second = results["rounds"][1], results["rounds"][2]
    assert sorted(r["record_epsilon"] for r in first["replied"]) == pytest.approx(sorted(a[0] for a in after))
    assert not second["replied"] and len(second["dropped"]) == 3
    assert all(d["reason"].startswith("declined: ") and d["record_epsilon"] <= target for d in second["dropped"])
    assert second["record_privacy"]["declined"] == ["merchant_00", "merchant_01", "merchant_02"]
    assert results["privacy"]["epsilon_max"] == pytest.approx(max(a[0] for a in after))
    for name, eps in results["privacy"]["merchants"].items():
        budget = json.loads((run / "privacy" / f"{name}.json").read_text())
        assert [r["round"] for r in budget["rounds"]] == [1] and budget["rounds"][0]["epsilon"] == eps
    assert (run / "model" / "config.json").is_file()
    assert "record epsilon max" in proc.stderr + proc.stdout
    assert "declined" in (run / "merchants.log").read_text()
