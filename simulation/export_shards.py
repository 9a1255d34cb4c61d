"""`python -m simulation.export_shards OUT [overrides]`: write each merchant's shard and the test split to files.

For trying a deployment on the built-in data: every merchant machine gets its own
OUT/<merchant>.parquet, the server gets OUT/test.parquet. Columns use the configured names
(data.columns.*) and label names, so the same data config reads them back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets

from common.run.config import FedshopConfig, compose
from common.run.errors import FedshopError
from common.tasks import data as D


def _to_user_columns(ds: datasets.Dataset, cfg: FedshopConfig, labels: list[str]) -> datasets.Dataset:
    c = cfg.data.columns
    out = {c.text: ds["text"], c.label: [labels[i] for i in ds["label"]]}
    if c.text_pair:
        out[c.text_pair] = ds["text_pair"]
    if c.merchant:
        out[c.merchant] = ds["merchant"]
    if c.query_id:
        out[c.query_id] = ds["query_id"]
    return datasets.Dataset.from_dict(out)


def export(cfg: FedshopConfig, out: Path) -> list[Path]:
    """Write <merchant>.parquet per shard (train + validation rows) and test.parquet; returns the paths."""
    fd = D.prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, train, val in zip(fd.names, fd.train, fd.val, strict=True):
        path = out / f"{name}.parquet"
        _to_user_columns(datasets.concatenate_datasets([train, val]), cfg, fd.labels).to_parquet(path)
        paths.append(path)
    _to_user_columns(fd.test, cfg, fd.labels).to_parquet(out / "test.parquet")
    return [*paths, out / "test.parquet"]


def main(argv: list[str]) -> int:
    """Command line entry point."""
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    try:
        paths = export(compose(argv[1:]), Path(argv[0]))
    except FedshopError as exc:
        print(f"fedshop: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
