"""Load, validate, split and partition examples into merchant shards.

Every example is normalised to the columns `text`, `text_pair` (relevance only), `label` (int),
`merchant` and `query_id`. Errors a user can fix raise FedshopError naming file, column, row, value.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import overload

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner, Partitioner

from common.run.config import DataConfig, FedshopConfig
from common.run.errors import FedshopError
from common.tasks import synthetic
from common.tasks.registry import get_task, task_class

log = logging.getLogger(__name__)
datasets.disable_progress_bars()

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
SYNTHETIC = "synthetic marketplace"
ROWS_PER_BATCH = 10_000  # rows validated at a time: memory follows the batch, not the file


SHARD = "_fedshop_shard"  # partition=iid's merchant of each row (by query), dropped from the shards


class Shards:
    """Every merchant's (train, val), split from its flwr-datasets partition when first asked for, the last
    CACHED kept: a Ray actor of a 10,000-merchant simulation splits only the shards it trains."""

    CACHED = 64

    def __init__(self, partitioner: Partitioner, names: list[str], cfg: FedshopConfig, source: str) -> None:
        self.partitioner, self.names, self.cfg, self.source = partitioner, names, cfg, source
        self._split: OrderedDict[int, tuple[datasets.Dataset, datasets.Dataset]] = OrderedDict()
        self._sizes: list[int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def split(self, k: int) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Merchant k's (train, val); an empty training split is the user's error, named."""
        if k not in self._split:
            try:
                shard = self.partitioner.load_partition(k)
            except ValueError as exc:
                raise FedshopError(f"{self.source}: partition={self.cfg.partition.name} failed: {exc}") from exc
            if SHARD in shard.column_names:
                shard = shard.remove_columns(SHARD)
            train, val = group_split(shard, self.cfg.data.val_fraction, self.cfg.seed, f"val:{self.names[k]}")
            if len(train) == 0:
                raise FedshopError(f"{self.source}: merchant '{self.names[k]}' has an empty shard ({len(shard)} "
                                   f"rows, {len(train)} for training) under partition={self.cfg.partition.name}")
            self._split[k] = (train, val)
            while len(self._split) > self.CACHED:
                self._split.popitem(last=False)
        self._split.move_to_end(k)
        return self._split[k]

    def sizes(self) -> list[int]:
        """Training examples of every merchant (every shard split once: the up-front check of them all)."""
        if self._sizes is None:
            self._sizes = [len(self.split(k)[0]) for k in range(len(self))]
        return self._sizes


class Side(Sequence[datasets.Dataset]):
    """The train (0) or val (1) splits of all shards, as a read-only sequence."""

    def __init__(self, shards: Shards, side: int) -> None:
        self.shards, self.side = shards, side

    def __len__(self) -> int:
        return len(self.shards)

    @overload
    def __getitem__(self, k: int) -> datasets.Dataset: ...

    @overload
    def __getitem__(self, k: slice) -> list[datasets.Dataset]: ...

    def __getitem__(self, k: int | slice) -> datasets.Dataset | list[datasets.Dataset]:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return self.shards.split(k % len(self))[self.side]


@dataclass
class FederatedData:
    """The global held-out test split and one (train, val) pair per merchant shard (split on first use)."""

    labels: list[str]
    test: datasets.Dataset
    shards: Shards

    @property
    def names(self) -> list[str]:
        """Merchant names, by partition id."""
        return self.shards.names

    @property
    def train(self) -> Side:
        """Each merchant's training split."""
        return Side(self.shards, 0)

    @property
    def val(self) -> Side:
        """Each merchant's local validation split."""
        return Side(self.shards, 1)

    @property
    def pooled_train(self) -> datasets.Dataset:
        """Union of all merchants' train splits (for the centralized baseline)."""
        return datasets.concatenate_datasets(list(self.train))


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Fail naming the line and byte of the first invalid UTF-8, reading the file 1 MiB at a time."""
    offset, line, carry = 0, 1, b""  # carry: a character cut by the chunk boundary
    with path.open("rb") as f:
        while True:
            raw = f.read(chunk)
            buf, carry = carry + raw, b""
            try:
                buf.decode("utf-8")
            except UnicodeDecodeError as exc:
                if raw and exc.reason == "unexpected end of data" and len(buf) - exc.start < 4:
                    buf, carry = buf[: exc.start], buf[exc.start:]
                else:
                    newline = b"\n"
                    raise FedshopError(
                        f"data file {path} line {line + buf[: exc.start].count(newline)}: text is not valid UTF-8 "
                        f"(byte 0x{buf[exc.start]:02x} at offset {offset + exc.start}); re-save the file as UTF-8"
                    ) from exc
            if not raw:
                return
            offset, line = offset + len(buf), line + buf.count(b"\n")


def read_file(path: str | Path, fmt: str = "auto", field: str = "data.path",
              cache_dir: str | None = None) -> datasets.Dataset:
    """Read a CSV, JSON Lines or Parquet file through `datasets` into its memory-mapped Arrow cache (cache_dir,
    else HF_DATASETS_CACHE), with clear errors naming the config `field`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedshopError(f"data file {p}: not found ({field})")
    if fmt == "auto":
        if p.suffix.lower() not in FORMATS:
            raise FedshopError(f"data file {p}: cannot tell the format from '{p.suffix}'; set data.format="
                               f"csv|json|parquet")
        fmt = FORMATS[p.suffix.lower()]
    if fmt in {"csv", "json"}:
        _check_utf8(p)
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FedshopError(f"data file {p}: could not be read as {fmt}: {first}") from exc
    assert isinstance(ds, datasets.Dataset)
    if len(ds) == 0:
        raise FedshopError(f"data file {p}: no rows")
    return ds


def load_raw(cfg: FedshopConfig) -> tuple[datasets.Dataset, str]:
    """The configured examples as a raw Dataset (the task's built-in data, or data.path), and a name for messages."""
    d = cfg.data
    if d.source == "synthetic":
        return datasets.Dataset.from_list(get_task(cfg).generate(cfg.seed)), SYNTHETIC
    assert d.path is not None
    return read_file(d.path, d.format, cache_dir=d.cache_dir), f"data file {Path(d.path).expanduser()}"


def _strings(values: pa.ChunkedArray) -> pa.Array:
    """A column as strings, written as str() writes them; missing values stay null."""
    arr = values.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr
    return pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())


def _first(mask: pa.Array) -> int | None:
    """Position of the first true value of a boolean array, or None."""
    hits = pc.indices_nonzero(pc.fill_null(mask, False))
    return hits[0].as_py() if len(hits) else None


def _label_names(ds: datasets.Dataset, col: str) -> list[str]:
    """The labels a column holds (trimmed, sorted), read ROWS_PER_BATCH rows at a time."""
    seen: set[str] = set()
    for batch in ds.with_format("arrow").iter(ROWS_PER_BATCH):
        seen.update(v for v in pc.unique(pc.utf8_trim_whitespace(_strings(batch[col]))).to_pylist() if v)
    return sorted(seen)


class _Normalizer:
    """Validates one batch of raw rows (a pyarrow Table) and maps it to the standard columns; counts truncations."""

    def __init__(self, cfg: DataConfig, source: str, labels: list[str]) -> None:
        self.cfg, self.source, self.labels = cfg, source, pa.array(labels, pa.string())
        self.truncated: dict[str, tuple[int, int]] = {}  # column -> (texts truncated, first row, 1-based)

    def __call__(self, batch: pa.Table, rows: list[int]) -> pa.Table:
        cols = self.cfg.columns
        text = self._text(batch, rows, "text")
        pair = self._text(batch, rows, "text_pair") if cols.text_pair else None
        out = {"text": text, "label": self._label(batch, rows), "merchant": self._merchant(batch, rows),
               "query_id": self._query_id(batch, text, pair)}
        if pair is not None:
            out["text_pair"] = pair
        return pa.table(out)

    def _text(self, batch: pa.Table, rows: list[int], role: str) -> pa.Array:
        col = getattr(self.cfg.columns, role)
        text = pc.utf8_trim_whitespace(_strings(batch[col]))
        empty = _first(pc.fill_null(pc.equal(pc.utf8_length(text), 0), True))
        if empty is not None:
            raise FedshopError(f"{self.source} row {rows[empty] + 1}: column '{col}' (data.columns.{role}) is empty")
        long = pc.greater(pc.utf8_length(text), self.cfg.max_text_chars)
        count = pc.sum(long).as_py() or 0
        if count:
            before = self.truncated.get(col, (0, rows[_first(long) or 0] + 1))
            self.truncated[col] = (before[0] + count, before[1])
            text = pc.if_else(long, pc.utf8_slice_codeunits(text, 0, self.cfg.max_text_chars), text)
        return text

    def _label(self, batch: pa.Table, rows: list[int]) -> pa.Array:
        col = self.cfg.columns.label
        names = pc.utf8_trim_whitespace(_strings(batch[col]))
        missing = _first(pc.fill_null(pc.equal(names, ""), True))
        if missing is not None:
            raise FedshopError(f"{self.source} row {rows[missing] + 1}: column '{col}' (data.columns.label) has no "
                               f"label")
        index = pc.index_in(names, value_set=self.labels)
        unknown = _first(pc.is_null(index))
        if unknown is not None:
            raise FedshopError(f"{self.source} row {rows[unknown] + 1}: column '{col}' has unknown label "
                               f"'{names[unknown].as_py()}'; expected one of {self.labels.to_pylist()} (data.labels)")
        return pc.cast(index, pa.int64())

    def _merchant(self, batch: pa.Table, rows: list[int]) -> pa.Array:
        col = self.cfg.columns.merchant
        if not col:
            return pa.array(["all"] * batch.num_rows, pa.string())
        names = pc.fill_null(_strings(batch[col]), "None")
        bad = _first(pc.is_in(names, value_set=pa.array(["", "None", "nan"])))
        if bad is not None:
            raise FedshopError(f"{self.source} row {rows[bad] + 1}: column '{col}' (data.columns.merchant) is empty")
        return names

    def _query_id(self, batch: pa.Table, text: pa.Array, pair: pa.Array | None) -> pa.Array:
        if self.cfg.columns.query_id:
            return pc.fill_null(_strings(batch[self.cfg.columns.query_id]), "None")
        if task_class(self.cfg.task).group_by_text:
            return text
        # group by content: stable when rows move between files, and duplicates never straddle splits
        pairs = pair.to_pylist() if pair is not None else [""] * len(text)
        return pa.array([hashlib.sha1(f"{t}\x1f{p}".encode()).hexdigest()[:16]
                         for t, p in zip(text.to_pylist(), pairs, strict=True)], pa.string())

    def warn(self) -> None:
        """Log, per column, how many texts were cut to data.max_text_chars."""
        for col, (count, first) in self.truncated.items():
            log.warning("%s: %d texts in column '%s' were longer than data.max_text_chars=%d and were truncated "
                        "(first at row %d)", self.source, count, col, self.cfg.max_text_chars, first)


def normalize(ds: datasets.Dataset, cfg: DataConfig, source: str,
              labels: list[str] | None = None) -> tuple[datasets.Dataset, list[str]]:
    """Validate a raw table and map it to the standard columns, ROWS_PER_BATCH rows at a time (a file's result
    goes to its Arrow cache, so memory does not grow with the file); returns it with the label names (`labels`
    when given: a test file is read with the training data's labels)."""
    cols = cfg.columns
    roles = {"text": cols.text, "text_pair": cols.text_pair, "label": cols.label,
             "merchant": cols.merchant, "query_id": cols.query_id}
    for role, col in roles.items():
        if col and col not in ds.column_names:
            raise FedshopError(f"{source}: missing column '{col}' (data.columns.{role}); columns found: "
                               f"{', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise FedshopError(f"{source}: no rows")
    labels = labels or (list(cfg.labels) if cfg.labels else _label_names(ds, cols.label))
    if len(labels) < 2:
        raise FedshopError(f"{source}: column '{cols.label}' has a single label {labels}; need at least two")
    normalizer = _Normalizer(cfg, source, labels)
    key = json.dumps({"v": "fedshop-normalize-v1", "ds": ds._fingerprint, "data": asdict(cfg), "labels": labels},
                     sort_keys=True)
    # Recomputed every time (load_from_cache_file=False): it is vectorised, and the truncation warning is then
    # logged on every run, not only on the first.
    out = ds.with_format("arrow").map(normalizer, batched=True, batch_size=ROWS_PER_BATCH, with_indices=True,
                                      remove_columns=ds.column_names, load_from_cache_file=False, desc=None,
                                      new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    normalizer.warn()
    return out.with_format(None), labels


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by its parts: deterministic splits and subsets."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_split(ds: datasets.Dataset, fraction: float, seed: int,
                salt: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split by query group (all pairs of a query on one side), deterministic for a seed."""
    if fraction <= 0:
        return ds, ds.select([])
    held = []
    for batch in ds.with_format("arrow").iter(ROWS_PER_BATCH):  # each query of a batch hashed once
        queries = pc.dictionary_encode(batch["query_id"]).combine_chunks()
        flags = np.array([unit_hash(seed, salt, q) < fraction for q in queries.dictionary.to_pylist()], dtype=bool)
        held.append(flags[queries.indices.to_numpy()])
    is_held = np.concatenate(held)
    return ds.select(np.flatnonzero(~is_held)), ds.select(np.flatnonzero(is_held))


def partition(pool: datasets.Dataset, cfg: FedshopConfig, source: str) -> tuple[Partitioner, list[str]]:
    """A flwr-datasets partitioner over the pool, and the merchant name of each partition."""
    p, k = cfg.partition, cfg.simulation.num_merchants
    if p.name == "natural":
        natural = NaturalIdPartitioner(partition_by="merchant")
        natural.dataset = pool
        names = [str(natural.partition_id_to_natural_id[i]) for i in range(natural.num_partitions)]
        if len(names) != k:
            raise FedshopError(f"{source}: partition=natural found {len(names)} merchants in column "
                               f"'{cfg.data.columns.merchant}' but simulation.num_merchants={k}; set "
                               f"simulation.num_merchants={len(names)} or use partition=dirichlet|iid")
        return natural, names
    num = p.num_partitions or k
    if p.name == "iid":
        return _iid_by_query(pool, num, cfg.seed, source)
    assert p.alpha is not None and p.min_partition_size is not None  # common/run/config/data.py checked both
    partitioner = DirichletPartitioner(num_partitions=num, partition_by="label", alpha=p.alpha,
                                       min_partition_size=p.min_partition_size, seed=cfg.seed)
    partitioner.dataset = pool
    return partitioner, [f"merchant_{i:02d}" for i in range(num)]


def _iid_by_query(pool: datasets.Dataset, num: int, seed: int, source: str) -> tuple[Partitioner, list[str]]:
    """partition=iid over whole query groups: the seeded shuffle of the query ids dealt round-robin, so a query's
    judged products stay on one merchant and merchants differ by at most one query."""
    qids = pool.unique("query_id")
    if len(qids) < num:
        raise FedshopError(f"{source}: partition=iid into {num} merchants needs at least {num} queries; "
                           f"there are {len(qids)}")
    order = np.random.default_rng(seed).permutation(len(qids))
    shard_of = {qids[j]: i % num for i, j in enumerate(order)}
    pool = pool.add_column(SHARD, [shard_of[q] for q in pool["query_id"]])
    natural = NaturalIdPartitioner(partition_by=SHARD)
    natural.dataset = pool
    ids = [int(natural.partition_id_to_natural_id[i]) for i in range(natural.num_partitions)]
    return natural, [f"merchant_{i:02d}" for i in ids]


def _data_key(cfg: FedshopConfig) -> str:
    return json.dumps({"data": asdict(cfg.data), "partition": asdict(cfg.partition), "seed": cfg.seed,
                       "k": cfg.simulation.num_merchants}, sort_keys=True)


def _build(cfg: FedshopConfig) -> FederatedData:
    get_task(cfg)  # an unknown task, or a config it cannot run, fails before any data is read
    raw, source = load_raw(cfg)
    ds, labels = normalize(raw, cfg.data, source)
    judged = judged_set(cfg)
    if cfg.data.test_path:  # a fixed test file: every row of the data trains
        pool, test = ds, read_test(cfg.data, labels)[0]
    elif judged is not None:  # the built-in marketplace's own held-out queries: every generated row trains
        pool, test = ds, _judged_test(cfg, judged, labels)[0]
    else:
        pool, test = group_split(ds, cfg.data.test_fraction, cfg.seed, "test")
    if len(test) == 0:
        raise FedshopError(f"{source}: the held-out test split is empty; raise data.test_fraction or add rows")
    shards = Shards(*partition(pool, cfg, source), cfg, source)
    shards.split(0)  # the partitioner's own checks (Dirichlet's min_partition_size) fail here, before any run
    return FederatedData(labels, test, shards)


_CACHE: dict[str, FederatedData] = {}


def judged_set(cfg: FedshopConfig) -> synthetic.JudgedSet | None:
    """The task's built-in judged test set, catalog and hard queries (cached per process); None without one."""
    return get_task(cfg).judged()


def _judged_test(cfg: FedshopConfig, judged: synthetic.JudgedSet,
                 labels: list[str] | None = None) -> tuple[datasets.Dataset, list[str]]:
    """The judged set's pairs validated like training data, and the label names."""
    return normalize(datasets.Dataset.from_list(judged.rows), cfg.data, f"{SYNTHETIC} (test)", labels)


def read_test(cfg: DataConfig, labels: list[str] | None = None) -> tuple[datasets.Dataset, list[str]]:
    """The held-out test file data.test_path, validated like training data (with `labels` when given, else
    data.labels or the file's own); returns it with the label names."""
    assert cfg.test_path is not None
    raw = read_file(cfg.test_path, cfg.format, "data.test_path", cfg.cache_dir)
    return normalize(raw, cfg, f"data file {Path(cfg.test_path).expanduser()}", labels)


def load_test(cfg: FedshopConfig) -> tuple[datasets.Dataset, list[str]]:
    """The server's held-out test set: the file data.test_path when set (the server then needs no training data;
    labels from data.labels or the file), the built-in marketplace's judged queries, else the configured data's
    test split."""
    if cfg.data.test_path:
        return read_test(cfg.data)
    judged = judged_set(cfg)
    if judged is not None:  # the built-in marketplace's test set needs none of its training data
        return _judged_test(cfg, judged)
    fd = prepare(cfg)
    return fd.test, fd.labels


def prepare(cfg: FedshopConfig) -> FederatedData:
    """Load, validate, hold out the global test split and partition into merchant shards (cached per process)."""
    key = _data_key(cfg)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _build(cfg)
    return _CACHE[key]


def load_shard(path: str | Path, cfg: FedshopConfig,
               name: str) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """A merchant's own shard file, validated and split into local (train, val) as in simulation."""
    get_task(cfg)
    raw = read_file(path, cfg.data.format, "deploy.shard", cfg.data.cache_dir)
    ds, labels = normalize(raw, cfg.data, f"data file {Path(path).expanduser()}")
    train, val = group_split(ds, cfg.data.val_fraction, cfg.seed, f"val:{name}")
    if len(train) == 0:
        raise FedshopError(f"data file {path}: no training rows left after the validation split")
    return train, val, labels


def rows_digest(ds: datasets.Dataset) -> str:
    """A short hash of a split's texts and labels, in order: results.json's `test_digest`, equal when two runs
    scored the same rows."""
    h = hashlib.sha256()
    cols = [c for c in ("text", "text_pair", "label") if c in ds.column_names]
    for batch in ds.with_format("arrow").select_columns(cols).iter(ROWS_PER_BATCH):
        for col in cols:
            h.update(json.dumps(batch[col].to_pylist()).encode())
    return h.hexdigest()[:16]
