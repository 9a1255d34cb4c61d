"""Data loading, validation (every bad input names file, column, row, value), splitting and partitioning."""

from __future__ import annotations

import collections
import csv
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest

from common.run.config import compose
from common.run.errors import FedshopError
from common.tasks import data as D
from common.tasks import synthetic


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(n: int = 40) -> list[dict[str, object]]:
    labels = ["exact", "substitute", "complement", "irrelevant"]
    return [{"search_term": f"query {i // 4}", "title": f"product {i}", "grade": labels[i % 4],
             "shop": f"shop_{i % 2}", "qid": f"q{i // 4}"} for i in range(n)]


def csv_cfg(path: Path, *extra: str):
    return compose(["task=relevance",
                    "data=csv", f"data.path={path}", "data.columns.text=search_term", "data.columns.text_pair=title",
                    "data.columns.label=grade", "data.columns.merchant=shop", "data.columns.query_id=qid",
                    "simulation.num_merchants=2", "data.test_fraction=0.25", *extra])


def test_synthetic_is_deterministic_and_long_tailed():
    a = synthetic.generate_relevance(8, 200, seed=3)
    b = synthetic.generate_relevance(8, 200, seed=3)
    c = synthetic.generate_relevance(8, 200, seed=4)
    assert a == b
    assert a != c
    sizes = collections.Counter(r["merchant"] for r in a)
    assert len(sizes) == 8
    assert max(sizes.values()) >= 3 * min(sizes.values())
    labels = collections.Counter(r["esci_label"] for r in a)
    assert set(labels) == set(synthetic.ESCI_LABELS)


def test_merchants_differ_in_category_mix():
    rows_ = synthetic.generate_relevance(6, 400, seed=0)
    mixes = []
    for m in sorted({str(r["merchant"]) for r in rows_}):
        cats = collections.Counter(r["category"] for r in rows_ if r["merchant"] == m)
        total = sum(cats.values())
        mixes.append(np.array([cats[c] / total for c in synthetic.CATEGORIES]))
    # total variation distance between merchants' category mixes: clearly non-IID
    tvd = [0.5 * np.abs(a - b).sum() for i, a in enumerate(mixes) for b in mixes[i + 1:]]
    assert np.mean(tvd) > 0.4


def test_csv_with_custom_columns_loads(tmp_path):
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", rows()))
    fd = D.prepare(cfg)
    assert fd.labels == ["complement", "exact", "irrelevant", "substitute"]  # read from the data, sorted
    assert fd.names == ["shop_0", "shop_1"]
    assert sum(len(t) + len(v) for t, v in zip(fd.train, fd.val, strict=True)) + len(fd.test) == 40
    assert set(fd.train[0]["merchant"]) == {"shop_0"}
    test_q = set(fd.test["query_id"])
    assert not test_q & {q for t in fd.train for q in t["query_id"]}  # query groups never straddle splits


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_load(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / f"shop.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows()), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows()), path)
    assert len(D.prepare(csv_cfg(path)).names) == 2


def test_missing_file(tmp_path):
    with pytest.raises(FedshopError, match=r"data file .*nope.csv: not found \(data.path\)"):
        D.prepare(csv_cfg(tmp_path / "nope.csv"))


def test_missing_column_names_column_and_field(tmp_path):
    r = [{k: v for k, v in row.items() if k != "title"} for row in rows()]
    with pytest.raises(FedshopError, match=r"shop.csv: missing column 'title' \(data.columns.text_pair\); columns "
                                           r"found: search_term, grade, shop, qid"):
        D.prepare(csv_cfg(write_csv(tmp_path / "shop.csv", r)))


def test_unknown_label_names_row_and_value(tmp_path):
    r = rows()
    r[6]["grade"] = "excellent"
    with pytest.raises(FedshopError, match=r"shop.csv row 7: column 'grade' has unknown label 'excellent'"):
        D.prepare(csv_cfg(write_csv(tmp_path / "shop.csv", r), "data.labels=[exact,substitute,complement,irrelevant]"))


def test_missing_label_names_row(tmp_path):
    r = rows()
    r[3]["grade"] = ""
    with pytest.raises(FedshopError, match=r"shop.csv row 4: column 'grade' \(data.columns.label\) has no label"):
        D.prepare(csv_cfg(write_csv(tmp_path / "shop.csv", r)))


def test_empty_text_names_row(tmp_path):
    r = rows()
    r[10]["search_term"] = "  "
    with pytest.raises(FedshopError, match=r"row 11: column 'search_term' \(data.columns.text\) is empty"):
        D.prepare(csv_cfg(write_csv(tmp_path / "shop.csv", r)))


def test_non_utf8_names_line(tmp_path):
    path = write_csv(tmp_path / "shop.csv", rows())
    lines = path.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b"query", b"qu\xe9ry")  # latin-1 é
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(FedshopError, match=r"shop.csv line 6: text is not valid UTF-8 \(byte 0xe9"):
        D.prepare(csv_cfg(path))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_utf8_check_reads_in_chunks_and_still_names_the_line(tmp_path, chunk):
    """The check streams the file: a character cut by a chunk boundary is fine, a bad byte is found at its line."""
    good = tmp_path / "good.csv"
    good.write_bytes(b"text\n" + "sofá é€𝄞\n".encode() * 4)
    D._check_utf8(good, chunk)
    bad = tmp_path / "bad.csv"
    bad.write_bytes("é\n€\n".encode() + b"ok\nx\xe9y\n")
    with pytest.raises(FedshopError, match=r"bad.csv line 4: text is not valid UTF-8 \(byte 0xe9 at offset 11\)"):
        D._check_utf8(bad, chunk)


def test_empty_file(tmp_path):
    path = tmp_path / "shop.jsonl"
    path.write_text("")
    with pytest.raises(FedshopError, match=r"shop.jsonl"):
        D.prepare(csv_cfg(path))


def test_unknown_extension(tmp_path):
    path = tmp_path / "shop.txt"
    path.write_text("a,b\n")
    with pytest.raises(FedshopError, match=r"cannot tell the format from '.txt'"):
        D.prepare(csv_cfg(path))


def test_empty_shard_names_merchant(tmp_path):
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", rows()), "data.val_fraction=0.99")
    with pytest.raises(FedshopError, match=r"merchant 'shop_0' has an empty shard \(\d+ rows, 0 for training\)"):
        D.prepare(cfg)


def test_merchant_count_mismatch(tmp_path):
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", rows()), "simulation.num_merchants=5")
    with pytest.raises(FedshopError, match=r"found 2 merchants in column 'shop' but simulation.num_merchants=5"):
        D.prepare(cfg)


def test_long_text_truncated_with_warning(tmp_path, caplog):
    r = rows()
    r[2]["title"] = "x" * 5000
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", r), "data.max_text_chars=100")
    with caplog.at_level(logging.WARNING):
        fd = D.prepare(cfg)
    assert "1 texts in column 'title' were longer than data.max_text_chars=100" in caplog.text
    assert "first at row 3" in caplog.text
    all_pairs = [t for ds in [fd.test, *fd.train, *fd.val] for t in ds["text_pair"]]
    assert max(len(t) for t in all_pairs) == 100


def test_bad_config_values_are_named():
    with pytest.raises(FedshopError, match=r"config strategy.num_rounds=0: expected > 0"):
        compose(["task=relevance", "strategy.num_rounds=0"])
    with pytest.raises(FedshopError, match=r"config: ValidationError"):
        compose(["task=relevance", "train.lr=fast"])


def test_partitioning_is_deterministic_and_complete():
    """Every generated row trains (in some merchant's train or val split); the held-out test set is the
    generator's own judged queries, none of them a training query."""
    cfg = compose(["task=relevance", "simulation.num_merchants=5"])
    a = D._build(cfg)
    b = D._build(cfg)
    assert [t["text_pair"] for t in a.train] == [t["text_pair"] for t in b.train]
    total = sum(len(t) + len(v) for t, v in zip(a.train, a.val, strict=True))
    assert total == len(synthetic.generate_relevance(5, 300, seed=cfg.seed))
    judged = D.judged_set(cfg)
    assert judged is not None and a.test["text_pair"] == [r["product_title"] for r in judged.rows]
    assert len(set(a.test["query_id"]) & {q for t in a.train for q in t["query_id"]}) == 0


def test_the_judge_follows_the_labelling_rules():
    """Asked type with every asked attribute and brand: exact; one wrong, or a sibling type: substitute; an
    accessory: complement; the rest irrelevant."""
    t = synthetic.TYPE_BY_NAME
    intent = synthetic.Intent(t["sofa"], {"color": "grey", "material": "leather"}, "Aurora")

    def product(name: str, color: str = "grey", attr: str | None = "leather", brand: str = "Aurora"):
        return synthetic._Product(t[name], color, attr, brand, "")

    assert synthetic.judge(intent, product("sofa")) == "exact"
    assert synthetic.judge(intent, product("sofa", color="green")) == "substitute"
    assert synthetic.judge(intent, product("sofa", attr="velvet")) == "substitute"
    assert synthetic.judge(intent, product("sofa", brand="Orbit")) == "substitute"
    assert synthetic.judge(intent, product("loveseat")) == "substitute"
    assert synthetic.judge(intent, product("throw pillow", attr="cotton")) == "complement"
    assert synthetic.judge(intent, product("floor lamp", attr=None)) == "irrelevant"
    anything = synthetic.Intent(t["sofa"], {}, "")
    assert synthetic.judge(anything, product("sofa", color="red", attr="wool", brand="Orbit")) == "exact"


def test_the_judged_test_set_is_large_noise_free_and_judges_every_catalog_product():
    j = synthetic.generate_judged(10, 400, seed=42, concentration=0.3, num_hard=250)
    again = synthetic.generate_judged(10, 400, seed=42, concentration=0.3, num_hard=250)
    assert j.rows == again.rows and j.hard == again.hard
    assert len(j.rows) >= 2000 and len(j.queries) >= 300
    assert len(j.catalog) == len(j.rows) and len(j.judgements) == len(j.queries)
    assert all(len(row) == len(j.catalog) for row in j.judgements)
    by_id = {p["id"]: i for i, p in enumerate(j.catalog)}
    for r in j.rows:  # a query's own judged pairs agree with the catalog judgement (no label noise)
        assert j.judgements[int(str(r["query_id"])[1:])][by_id[str(r["product_id"])]] == r["esci_label"]
    assert min(sum(x == "exact" for x in row) for row in j.judgements) >= 2
    assert collections.Counter(r["esci_label"] for r in j.rows).keys() == set(synthetic.ESCI_LABELS)
    train = collections.Counter(r["merchant"] for r in synthetic.generate_relevance(10, 300, seed=42))
    test = collections.Counter(r["merchant"] for r in j.rows)
    assert set(test) == set(train) and test.most_common(1)[0][0] == train.most_common(1)[0][0]
    assert collections.Counter(h["kind"] for h in j.hard) == dict.fromkeys(synthetic.HARD_KINDS, 50)
    assert all(len(h["titles"]) == 4 for h in j.hard)


@pytest.mark.parametrize("alpha,min_tvd", [(0.1, 0.3)])
def test_dirichlet_partition_is_label_skewed(alpha, min_tvd):
    cfg = compose(["task=relevance", "partition=dirichlet", f"partition.alpha={alpha}", "simulation.num_merchants=4",
                   "partition.min_partition_size=5"])
    fd = D.prepare(cfg)
    assert len(fd.train) == 4
    dists = []
    for t, v in zip(fd.train, fd.val, strict=True):
        counts = np.bincount(list(t["label"]) + list(v["label"]), minlength=4)
        dists.append(counts / counts.sum())
    tvd = [0.5 * np.abs(a - b).sum() for i, a in enumerate(dists) for b in dists[i + 1:]]
    assert np.mean(tvd) > min_tvd
    assert D.prepare(cfg).train[0]["text"] == fd.train[0]["text"]


def test_iid_partition_deals_whole_queries_evenly():
    fd = D.prepare(compose(["task=relevance", "partition=iid", "simulation.num_merchants=4"]))
    shards = [datasets.concatenate_datasets([t, v]) for t, v in zip(fd.train, fd.val, strict=True)]
    queries = [set(s["query_id"]) for s in shards]
    assert all(not (a & b) for i, a in enumerate(queries) for b in queries[i + 1:])  # no query on two merchants
    assert max(map(len, queries)) - min(map(len, queries)) <= 1
    assert sorted(fd.names) == [f"merchant_{i:02d}" for i in range(4)]
    assert all(D.SHARD not in s.column_names for s in shards)
    assert D.prepare(compose(["task=relevance", "partition=iid", "simulation.num_merchants=4", "seed=7"])).train[0][
        "query_id"] != fd.train[0]["query_id"]


def test_dual_encoder_refuses_label_skewed_partition():
    with pytest.raises(FedshopError, match="partition=dirichlet .* splits a query's judged products"):
        D.prepare(compose(["task=retrieval", "partition=dirichlet"]))


def big_rows(n: int) -> list[dict[str, object]]:
    """n rows over n // 5 queries, numeric labels and merchants (read back as str() writes them)."""
    return [{"search_term": f"query {i // 5}", "title": f"product {i}", "grade": i % 4, "shop": i % 2,
             "qid": f"q{i // 5}"} for i in range(n)]


def test_validation_in_batches_names_the_file_row_and_counts_every_truncation(tmp_path, monkeypatch, caplog):
    """Rows are validated ROWS_PER_BATCH at a time: errors still name the row of the file, truncations are
    counted over every batch, and the result is the same as in one batch."""
    r = big_rows(1000)
    r[3]["title"], r[777]["title"] = "x" * 300, "y" * 300
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", r), "data.max_text_chars=100")
    whole, labels = D.normalize(D.read_file(cfg.data.path), cfg.data, "shop")
    monkeypatch.setattr(D, "ROWS_PER_BATCH", 64)
    with caplog.at_level(logging.WARNING):
        batched, labels_b = D.normalize(D.read_file(cfg.data.path), cfg.data, "shop")
    assert "2 texts in column 'title' were longer than data.max_text_chars=100" in caplog.text
    assert "first at row 4" in caplog.text
    assert labels == labels_b == ["0", "1", "2", "3"]
    assert batched.to_list() == whole.to_list()
    assert batched[0]["merchant"] == "0" and len(batched[777]["text_pair"]) == 100
    r[700]["search_term"] = " "
    with pytest.raises(FedshopError, match=r"bad.csv row 701: column 'search_term' \(data.columns.text\) is empty"):
        D.prepare(csv_cfg(write_csv(tmp_path / "bad.csv", r)))


def test_a_file_shard_lives_in_its_arrow_cache_and_its_tokens_are_reused(tmp_path):
    """A file's rows, validated rows and tokens are memory-mapped files under data.cache_dir, not Python
    objects, and a merchant that loads its shard again (a restart, the next round's process) reuses the tokens."""
    from common.tasks import model as M

    cache = tmp_path / "cache"
    cfg = csv_cfg(write_csv(tmp_path / "shop.csv", big_rows(2000)), f"data.cache_dir={cache}")
    tokenizer = M.load_tokenizer(compose(["task=relevance", "model=tiny"]).model)

    def tokens() -> tuple[int, Path]:
        train, val, _ = D.load_shard(cfg.data.path, cfg, "shop_0")
        assert len(train) + len(val) == 2000
        assert all(Path(f["filename"]).is_relative_to(cache) for f in train.cache_files)
        tok = M.tokenize(train, tokenizer, 32)
        assert tok.cache_files and len(tok) == len(train)
        path = Path(tok.cache_files[0]["filename"])
        assert path.is_relative_to(cache)
        return path.stat().st_mtime_ns, path

    first, second = tokens(), tokens()
    assert first == second  # the same cache file, not written again
