"""Transport packing (common/protocol/wire.py: pack / unpack): what Flower carries between the server and a merchant."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common.protocol import wire
from server.strategy import check_update


def content(n: int = 12) -> RecordDict:
    """A train message's content: n float32 tensors of mixed shapes, an int64 buffer, a config and metrics."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {f"layer.{i}.weight": rng.normal(size=(i + 1, 3)).astype(np.float32)
                                     for i in range(n)}
    arrays["embeddings.position_ids"] = np.arange(7, dtype=np.int64).reshape(1, 7)
    return RecordDict({wire.ARRAYS: wire.to_arrays(arrays), wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 3}),
                       wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 5})})


def test_unpack_restores_every_array_name_order_dtype_and_value():
    original = content()
    packed = wire.pack(original)
    assert sorted(packed.array_records[wire.ARRAYS]) == [wire.PACKED_PREFIX + "float32", wire.PACKED_PREFIX + "int64"]
    back = wire.unpack(packed)
    assert list(back) == list(original)  # the layout record is gone again
    want, got = original.array_records[wire.ARRAYS], back.array_records[wire.ARRAYS]
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
    assert dict(back.config_records[wire.CONFIG]) == {wire.SERVER_ROUND: 3}
    assert dict(back.metric_records[wire.METRICS]) == {wire.NUM_EXAMPLES: 5}


def test_float16_on_the_wire_packs_and_unpacks_as_float16():
    original = RecordDict({wire.ARRAYS: wire.cast(content().array_records[wire.ARRAYS], "float16")})
    back = wire.unpack(wire.pack(original)).array_records[wire.ARRAYS]
    assert {a.dtype for a in back.values()} == {"float16"}
    np.testing.assert_array_equal(back["layer.3.weight"].numpy(),
                                  original.array_records[wire.ARRAYS]["layer.3.weight"].numpy())


def test_packing_cuts_flowers_objects_per_message():
    """Each Array and chunk is an object Flower moves with a call of its own on every hop."""
    plain = len(get_all_nested_objects(content(24)))
    packed = len(get_all_nested_objects(wire.pack(content(24))))
    assert plain >= 50 and packed <= 10
    assert len(get_all_nested_objects(wire.pack(content(2)))) == packed  # however many tensors there are


def test_content_without_several_arrays_is_left_as_it_is():
    for c in (RecordDict({wire.CONFIG: ConfigRecord({"a": 1})}),
              RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.ones(3, np.float32))})})):
        assert wire.pack(c) is c and wire.unpack(c) is c


def test_a_layout_that_does_not_fit_its_data_is_refused_naming_the_record():
    packed = wire.pack(content())
    layout = json.loads(str(packed.config_records[wire.LAYOUT][wire.ARRAYS]))
    too_much = RecordDict({**packed, wire.LAYOUT: ConfigRecord({wire.ARRAYS: json.dumps(
        [*layout, ["extra.weight", [100], "float32"]])})})
    with pytest.raises(wire.WireError, match="record 'arrays'.*'extra.weight'"):
        wire.unpack(too_much)
    too_little = RecordDict({**packed, wire.LAYOUT: ConfigRecord({wire.ARRAYS: json.dumps(layout[1:])})})
    with pytest.raises(wire.WireError, match="left over"):
        wire.unpack(too_little)
    garbled = RecordDict({**packed, wire.LAYOUT: ConfigRecord({wire.ARRAYS: "not json"})})
    with pytest.raises(wire.WireError, match="not a list of"):
        wire.unpack(garbled)


def test_a_reply_left_packed_is_rejected_by_the_update_check():
    """The server's grid hands on a reply that does not unpack as it is; validation then refuses its arrays."""
    original = content().array_records[wire.ARRAYS]
    still_packed = wire.pack(RecordDict({wire.ARRAYS: original})).array_records[wire.ARRAYS]
    expected = wire.spec({k: a.numpy() for k, a in original.items()})
    assert check_update(original, expected) is None
    assert check_update(still_packed, expected) is not None
