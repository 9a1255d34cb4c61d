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
from typing import Any, overload

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from common import synthetic
from common.config import DataConfig, FedshopConfig
from common.errors import FedshopError

log = logging.getLogger(__name__)
datasets.disable_progress_bars()

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
SYNTHETIC = "synthetic marketplace"


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


def read_file(path: str | Path, fmt: str = "auto", field: str = "data.path") -> datasets.Dataset:
    """Read a CSV, JSON Lines or Parquet file through `datasets`, with clear errors naming the config `field`."""
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
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure becomes one clear message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise FedshopError(f"data file {p}: could not be read as {fmt}: {first}") from exc
    assert isinstance(ds, datasets.Dataset)
    if len(ds) == 0:
        raise FedshopError(f"data file {p}: no rows")
    return ds


def load_raw(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, str]:
    """The configured examples as a raw Dataset, and a name for messages."""
    if cfg.source == "synthetic":
        s = cfg.synthetic
        gen = synthetic.generate_relevance if cfg.task == "relevance" else synthetic.generate_reviews
        size = s.num_queries if cfg.task == "relevance" else s.num_reviews
        rows = gen(s.num_merchants, size, seed, s.concentration, s.label_noise)
        return datasets.Dataset.from_list(rows), SYNTHETIC
    assert cfg.path is not None
    return read_file(cfg.path, cfg.format), f"data file {Path(cfg.path).expanduser()}"


def column(ds: datasets.Dataset, name: str) -> list[Any]:
    """One column as a list, through Arrow: iterating `ds[name]` (datasets 4) formats row by row, 12x slower."""
    return list(ds.with_format("arrow")[name].to_pylist())


def normalize(ds: datasets.Dataset, cfg: DataConfig, source: str) -> tuple[datasets.Dataset, list[str]]:
    """Validate a raw table and map it to the standard columns; returns it with the label names."""
    cols = cfg.columns
    roles = {"text": cols.text, "text_pair": cols.text_pair, "label": cols.label,
             "merchant": cols.merchant, "query_id": cols.query_id}
    for role, col in roles.items():
        if col and col not in ds.column_names:
            raise FedshopError(f"{source}: missing column '{col}' (data.columns.{role}); columns found: "
                               f"{', '.join(ds.column_names)}")
    n = len(ds)
    if n == 0:
        raise FedshopError(f"{source}: no rows")
    texts: dict[str, list[str]] = {}
    for role in ("text", "text_pair"):
        col = roles[role]
        if not col:
            continue
        values = column(ds, col)
        out, truncated = [], []
        for i, v in enumerate(values):
            s = "" if v is None else str(v).strip()
            if not s:
                raise FedshopError(f"{source} row {i + 1}: column '{col}' (data.columns.{role}) is empty")
            if len(s) > cfg.max_text_chars:
                truncated.append(i + 1)
                s = s[: cfg.max_text_chars]
            out.append(s)
        if truncated:
            log.warning("%s: %d texts in column '%s' were longer than data.max_text_chars=%d and were truncated "
                        "(first at row %d)", source, len(truncated), col, cfg.max_text_chars, truncated[0])
        texts[role] = out
    raw_labels = column(ds, cols.label)
    label_str = []
    for i, v in enumerate(raw_labels):
        s = "" if v is None else str(v).strip()
        if not s:
            raise FedshopError(f"{source} row {i + 1}: column '{cols.label}' (data.columns.label) has no label")
        label_str.append(s)
    labels = list(cfg.labels) if cfg.labels else sorted(set(label_str))
    index = {name: k for k, name in enumerate(labels)}
    for i, s in enumerate(label_str):
        if s not in index:
            raise FedshopError(f"{source} row {i + 1}: column '{cols.label}' has unknown label '{s}'; expected one "
                               f"of {labels} (data.labels)")
    if len(labels) < 2:
        raise FedshopError(f"{source}: column '{cols.label}' has a single label {labels}; need at least two")
    merchants = [str(m) for m in column(ds, cols.merchant)] if cols.merchant else ["all"] * n
    for i, m in enumerate(merchants):
        if m in {"", "None", "nan"}:
            raise FedshopError(f"{source} row {i + 1}: column '{cols.merchant}' (data.columns.merchant) is empty")
    if cols.query_id:
        qids = [str(q) for q in column(ds, cols.query_id)]
    elif cfg.task == "relevance":
        qids = texts["text"]
    else:  # group by content: stable when rows move between files, and duplicates never straddle splits
        pairs = texts.get("text_pair") or [""] * n
        qids = [hashlib.sha1(f"{t}\x1f{p}".encode()).hexdigest()[:16]
                for t, p in zip(texts["text"], pairs, strict=True)]
    out_cols: dict[str, list[Any]] = {"text": texts["text"], "label": [index[s] for s in label_str],
                                      "merchant": merchants, "query_id": qids}
    if "text_pair" in texts:
        out_cols["text_pair"] = texts["text_pair"]
    return datasets.Dataset.from_dict(out_cols), labels


def _unit_hash(*parts: object) -> float:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def group_split(ds: datasets.Dataset, fraction: float, seed: int,
                salt: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split by query group (all pairs of a query on one side), deterministic for a seed."""
    if fraction <= 0:
        return ds, ds.select([])
    is_held = [_unit_hash(seed, salt, q) < fraction for q in column(ds, "query_id")]
    held = [i for i, h in enumerate(is_held) if h]
    kept = [i for i, h in enumerate(is_held) if not h]
    return ds.select(kept), ds.select(held)


def partition(pool: datasets.Dataset, cfg: FedshopConfig, source: str) -> tuple[Partitioner, list[str]]:
    """A flwr-datasets partitioner over the pool, and the merchant name of each partition."""
    p, k = cfg.partition, cfg.simulation.num_merchants
    partitioner: Partitioner
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
    if p.name == "dirichlet":
        assert p.alpha is not None and p.min_partition_size is not None  # common/config.py checked both
        partitioner = DirichletPartitioner(num_partitions=num, partition_by="label", alpha=p.alpha,
                                           min_partition_size=p.min_partition_size, seed=cfg.seed)
    else:
        if len(pool) < num:
            raise FedshopError(f"{source}: partition=iid into {num} merchants needs at least {num} training rows; "
                               f"there are {len(pool)}")
        partitioner = IidPartitioner(num_partitions=num)
        pool = pool.shuffle(seed=cfg.seed)
    partitioner.dataset = pool
    return partitioner, [f"merchant_{i:02d}" for i in range(num)]


def _data_key(cfg: FedshopConfig) -> str:
    return json.dumps({"data": asdict(cfg.data), "partition": asdict(cfg.partition), "seed": cfg.seed,
                       "k": cfg.simulation.num_merchants}, sort_keys=True)


def _build(cfg: FedshopConfig) -> FederatedData:
    raw, source = load_raw(cfg.data, cfg.seed)
    ds, labels = normalize(raw, cfg.data, source)
    pool, test = group_split(ds, cfg.data.test_fraction, cfg.seed, "test")
    if len(test) == 0:
        raise FedshopError(f"{source}: the held-out test split is empty; raise data.test_fraction or add rows")
    shards = Shards(*partition(pool, cfg, source), cfg, source)
    shards.split(0)  # the partitioner's own checks (Dirichlet's min_partition_size) fail here, before any run
    return FederatedData(labels, test, shards)


_CACHE: dict[str, FederatedData] = {}


def load_test(cfg: FedshopConfig) -> tuple[datasets.Dataset, list[str]]:
    """The server's held-out test split: deploy.test_path when set, else the configured data's test split."""
    if cfg.deploy.test_path:
        raw = read_file(cfg.deploy.test_path, cfg.data.format, "deploy.test_path")
        return normalize(raw, cfg.data, f"data file {Path(cfg.deploy.test_path).expanduser()}")
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
    raw = read_file(path, cfg.data.format, "deploy.shard")
    ds, labels = normalize(raw, cfg.data, f"data file {Path(path).expanduser()}")
    train, val = group_split(ds, cfg.data.val_fraction, cfg.seed, f"val:{name}")
    if len(train) == 0:
        raise FedshopError(f"data file {path}: no training rows left after the validation split")
    return train, val, labels


def label_gains(cfg: DataConfig, labels: list[str]) -> list[float] | None:
    """Per-label ranking gains for task=relevance (None when the task has no ranking)."""
    if cfg.task != "relevance":
        return None
    missing = [name for name in labels if name not in cfg.gains]
    if missing:
        raise FedshopError(f"data.gains has no gain for label(s) {missing}; labels are {labels}")
    return [float(cfg.gains[name]) for name in labels]
