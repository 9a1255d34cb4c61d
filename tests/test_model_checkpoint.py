"""The exchanged state, Flower ArrayRecord round trip, atomic checkpoints and their refusal rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import checkpoint as C
from common import exchange, wire
from common import model as M
from common.config import compose, to_json
from common.errors import FedshopError


@pytest.fixture(scope="module")
def tiny():
    cfg = compose(["model=tiny"])
    return cfg, M.build_model(cfg.model, ["a", "b", "c"], seed=1)


def test_weights_round_trip_through_arrayrecord(tiny):
    cfg, model = tiny
    weights = exchange.extract(model)
    back = wire.from_arrays(wire.to_arrays(weights))
    assert list(back) == list(weights)
    for k in weights:
        np.testing.assert_array_equal(back[k], weights[k])
    other = M.build_model(cfg.model, ["a", "b", "c"], seed=2)
    assert not np.array_equal(exchange.extract(other)["classifier.weight"], weights["classifier.weight"])
    exchange.load(other, back)
    for k, v in other.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_exchanged_state_is_what_trains(tiny):
    """A plain model exchanges every weight; freezing part of it (as an adapter's base is) leaves it home."""
    cfg, _ = tiny
    model = M.build_model(cfg.model, ["a", "b", "c"], seed=1)
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
    cfg = compose(["model=tiny"])
    a = exchange.extract(M.build_model(cfg.model, ["x", "y"], seed=5))
    b = exchange.extract(M.build_model(cfg.model, ["x", "y"], seed=5))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_and_rng(tmp_path, tiny):
    cfg, model = tiny
    weights = exchange.extract(model)
    cj = to_json(cfg)
    torch.manual_seed(123)
    C.save(tmp_path / "round_3.pt", server_round=3, weights=weights, config_json=cj,
           strategy_state={"m_t": {"w": torch.ones(2)}}, history=[{"round": 3}])
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
           history=[])
    other = compose(["model=tiny", "train.lr=0.5"])
    with pytest.raises(FedshopError, match="written for a different config"):
        C.load(path, to_json(other))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FedshopError, match="corrupt or unreadable"):
        C.load(path, to_json(cfg))


def test_latest_orders_rounds_numerically(tmp_path):
    for r in (2, 10, 9):
        (tmp_path / f"round_{r}.pt").write_bytes(b"x")
    assert C.latest(tmp_path) == tmp_path / "round_10.pt"
