"""The exchanged state, Flower ArrayRecord round trip, atomic checkpoints and their refusal rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.protocol import wire
from common.run import checkpoint as C
from common.run.config import compose, to_json
from common.run.errors import FedshopError
from common.tasks import exchange
from common.tasks import model as M


@pytest.fixture(scope="module")
def tiny():
    cfg = compose(["task=relevance", "model=tiny", "finetune=full"])
    return cfg, M.build_model(cfg.model, ["a", "b", "c"], seed=1, finetune=cfg.finetune)


def test_weights_round_trip_through_arrayrecord(tiny):
    cfg, model = tiny
    weights = exchange.extract(model)
    back = wire.from_arrays(wire.to_arrays(weights))
    assert list(back) == list(weights)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])
    other = M.build_model(cfg.model, ["a", "b", "c"], seed=2, finetune=cfg.finetune)
    assert not np.array_equal(exchange.extract(other)["classifier.weight"], weights["classifier.weight"])
    exchange.load(other, back)
    for k, v in other.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_exchanged_state_is_what_trains(tiny):
    """A plain model exchanges every weight; freezing part of it (as an adapter's base is) leaves it home."""
    cfg, _ = tiny
    model = M.build_model(cfg.model, ["a", "b", "c"], seed=1, finetune=cfg.finetune)
    assert exchange.exchanged_names(model) == list(model.state_dict())
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("classifier.")
    assert exchange.exchanged_names(model) == ["classifier.weight", "classifier.bias"]
    assert wire.spec(exchange.extract(model)) == {"classifier.weight": ((3, 128), "float32"),
                                                      "classifier.bias": ((3,), "float32")}
    with pytest.raises(FedshopError, match="unexpected"):
        exchange.load(model, {**exchange.extract(model), "bert.pooler.dense.bias": np.zeros(128, np.float32)})


def test_set_weights_rejects_wrong_shapes(tiny):
    _, model = tiny
    weights = exchange.extract(model)
    weights["classifier.weight"] = np.zeros((7, 7), dtype=np.float32)
    with pytest.raises(FedshopError, match="classifier.weight has shape"):
        exchange.load(model, weights)


def test_same_seed_same_init():
    cfg = compose(["task=relevance", "model=tiny", "finetune=full"])
    a = exchange.extract(M.build_model(cfg.model, ["x", "y"], seed=5, finetune=cfg.finetune))
    b = exchange.extract(M.build_model(cfg.model, ["x", "y"], seed=5, finetune=cfg.finetune))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_and_rng(tmp_path, tiny):
    cfg, model = tiny
    weights = exchange.extract(model)
    cj = to_json(cfg)
    torch.manual_seed(123)
    C.save(tmp_path / "round_3.pt", server_round=3, weights=weights, config_json=cj,
           strategy_state={"m_t": {"w": torch.ones(2)}}, history=[{"round": 3}], base_fingerprint="f")
    expected_next = torch.rand(3)
    torch.manual_seed(999)
    payload = C.load(tmp_path / "round_3.pt", cj)
    assert payload["round"] == 3 and payload["history"] == [{"round": 3}]
    assert all(np.array_equal(payload["weights"][k], weights[k]) for k in weights)
    C.set_rng_state(payload["rng"])
    assert torch.equal(torch.rand(3), expected_next)
    assert C.latest(tmp_path) == tmp_path / "round_3.pt"
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_refuses_other_config_and_corruption(tmp_path, tiny):
    cfg, model = tiny
    path = tmp_path / "round_1.pt"
    C.save(path, server_round=1, weights=exchange.extract(model), config_json=to_json(cfg), strategy_state={},
           history=[], base_fingerprint="f")
    other = compose(["task=relevance", "model=tiny", "train.lr=0.5"])
    with pytest.raises(FedshopError, match="written for a different config"):
        C.load(path, to_json(other))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FedshopError, match="corrupt or unreadable"):
        C.load(path, to_json(cfg))


def test_latest_orders_rounds_numerically(tmp_path):
    for r in (2, 10, 9):
        (tmp_path / f"round_{r}.pt").write_bytes(b"x")
    assert C.latest(tmp_path) == tmp_path / "round_10.pt"


@pytest.fixture(scope="module")
def lora():
    cfg = compose(["task=relevance", "model=tiny", "finetune=lora", "finetune.dropout=0.0"])
    model = M.build_model(cfg.model, ["a", "b", "c"], seed=3, finetune=cfg.finetune)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero, which would merge to nothing)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def test_lora_exchanges_only_the_adapters_and_the_head(lora):
    cfg, model = lora
    names = exchange.exchanged_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in names)
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in names if "modules_to_save" in n} == {
        "classifier", "pooler"}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n}
    assert adapted == set(cfg.finetune.target_modules)
    sent = sum(a.size for a in exchange.extract(model).values())
    total = sum(v.numel() for v in model.state_dict().values())
    assert sent < 0.1 * total
    # the base never travels, so its fingerprint must match: same seed, same base; other weights, another
    again = M.build_model(cfg.model, ["a", "b", "c"], seed=3, finetune=cfg.finetune)
    assert exchange.fingerprint(again) == exchange.fingerprint(model)  # adapters differ, the base does not
    other = M.build_model(cfg.model, ["a", "b", "c"], seed=4, finetune=cfg.finetune)
    assert exchange.fingerprint(other) != exchange.fingerprint(model)
    rank4 = compose(["task=relevance", "model=tiny", "finetune=lora", "finetune.rank=4"]).finetune
    assert exchange.fingerprint(M.build_model(cfg.model, ["a", "b", "c"], 3, rank4)) != exchange.fingerprint(model)


def test_lora_final_model_is_a_plain_merged_directory_and_a_peft_adapter(lora, tmp_path):
    from peft.peft_model import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg, model = lora
    tokenizer = M.load_tokenizer(cfg.model)
    M.save_final(model, tokenizer, ["a", "b", "c"], tmp_path / "model", tmp_path / "adapter")
    enc = tokenizer(["a grey sofa", "running shoes size 42"], ["grey couch", "trail shoes"], padding=True,
                    return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = M.merged(model)(**enc).logits
        assert torch.allclose(model(**enc).logits, expected, atol=1e-5)  # merging changes nothing
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
        assert not isinstance(plain, PeftModel)
        torch.testing.assert_close(plain(**enc).logits, expected, atol=1e-5, rtol=0)
        full = compose(["task=relevance", "model=tiny", "finetune=full"]).finetune
        base = M.build_model(cfg.model, ["a", "b", "c"], seed=3, finetune=full)
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(**enc).logits, model(**enc).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "model" / "fedshop_labels.json").is_file()
    from serving.ranker import Ranker  # the ranking service takes the merged directory as it is

    ranker = Ranker(tmp_path / "model", gains={"a": 1.0, "b": 0.1, "c": 0.0})
    probs = ranker.probabilities("a grey sofa", ["grey couch"])
    single = tokenizer(["a grey sofa"], ["grey couch"], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(probs[0], torch.softmax(M.merged(model)(**single).logits, -1)[0].numpy(),
                                   atol=1e-5)


def test_training_losses():
    """train.loss: ce is plain cross-entropy; balanced weighs each label by its inverse frequency in the merchant's
    own split (every present label then weighs the same in total); focal with gamma 0 is cross-entropy."""
    from common.tasks.train import criterion

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 0, 1])
    cfg = compose(["task=relevance", "train.loss=ce"]).train
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert criterion(cfg, [0, 0, 0, 1], 3)(logits, y) == pytest.approx(float(ce))
    cfg.loss = "balanced"
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([4 / 6, 4 / 6, 4 / 6, 2.0])  # 3 of label 0, 1 of label 1, none of label 2
    assert criterion(cfg, [0, 0, 0, 1], 3)(logits, y) == pytest.approx(float((w * per).sum() / w.sum()))
    cfg.loss, cfg.focal_gamma = "focal", 0.0
    assert criterion(cfg, [0, 0, 0, 1], 3)(logits, y) == pytest.approx(float(ce))
    cfg.focal_gamma = 2.0
    p = torch.softmax(logits, -1)[torch.arange(4), y]
    assert criterion(cfg, [0, 0, 0, 1], 3)(logits, y) == pytest.approx(float((-(1 - p) ** 2 * p.log()).mean()))


def test_record_level_dp_refuses_a_loss_from_label_counts():
    with pytest.raises(FedshopError, match="train.loss='balanced'.*per-example clipping does not cover"):
        compose(["task=relevance", "privacy=example", "train.loss=balanced"])
