"""Serving forms of a trained model, measured side by side on the held-out test set.

`python -m serving.compress serving.model_dir=DIR serving.catalog=FILE serving.compress.queries=FILE
serving.compress.query_log=FILE` writes, under serving.compress.out_dir (default <run dir>/compressed):
  pruned/    structured pruning: the teacher with only serving.compress.student_layers kept and, with
             serving.compress.student_intermediate_size, each feed-forward block cut to its most important
             neurons (no training)
  student/   the same architecture distilled from the teacher's label distribution over unlabeled
             (query, product) pairs: the marketplace's own query log x its catalog, never merchant data
  report.json and a table: size on disk, examples/s, p50/p99 latency ranking `latency_candidates`
  products, accuracy / macro-F1 / nDCG@10 and argmax agreement with the teacher, for
  fp32, int8 (torch, every layer), int8-mixed (torch, the most sensitive layers kept fp32), onnx-int8
  (ONNX Runtime), pruned, student, student-int8, student-int8-mixed and student-onnx-int8.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from common.run.config import CompressConfig, FedshopConfig
from common.run.errors import FedshopError
from common.tasks.encoder import Encoder, retriever_path
from common.tasks.metrics import classification_report
from common.tasks.model import LABELS_FILE
from serving.catalog import Catalog, load_catalog
from serving.ranker import Ranker, quantize_int8

log = logging.getLogger(__name__)


def load_judgements(path: str | Path) -> list[dict[str, Any]]:
    """Held-out (query, {product id: label}) judgements, one JSON object per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedshopError(f"serving.compress.queries={p}: not found (python -m serving.make_catalog writes one)")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out.append({"query_id": str(entry["query_id"]), "query": str(entry["query"]),
                        "judgements": {str(k): str(v) for k, v in entry["judgements"].items()}})
        except (ValueError, KeyError, AttributeError) as exc:
            raise FedshopError(f"{p} line {i}: expected {{query_id, query, judgements}}: {exc}") from exc
    if not out:
        raise FedshopError(f"{p}: no judgements")
    return out


def quality(ranker: Ranker, catalog: Catalog, judged: list[dict[str, Any]]) -> tuple[dict[str, float], np.ndarray]:
    """accuracy, macro_f1, ndcg@10 on the judgements, and the predicted label per judged pair."""
    y, probs, qids = [], [], []
    for entry in judged:
        pids = [pid for pid in entry["judgements"] if pid in catalog.by_id]
        unknown = [lab for lab in (entry["judgements"][pid] for pid in pids) if lab not in ranker.labels]
        if unknown:
            raise FedshopError(f"judgement label(s) {sorted(set(unknown))} are not the model's labels {ranker.labels}")
        probs.append(ranker.probabilities(entry["query"], [catalog.by_id[pid].title for pid in pids]))
        y += [ranker.labels.index(entry["judgements"][pid]) for pid in pids]
        qids += [entry["query_id"]] * len(pids)
    p = np.concatenate(probs).astype(np.float64)
    report = classification_report(y, p, len(ranker.labels), qids, ranker.gains.tolist())
    return report, p.argmax(axis=1)


def speed(ranker: Ranker, catalog: Catalog, queries: list[str], candidates: int, repeats: int) -> dict[str, float]:
    """Latency of ranking `candidates` products for one query (p50/p99 ms) and examples/s."""
    rng = random.Random(0)
    titles = [p.title for p in catalog.products]
    times = []
    for i in range(repeats):
        batch = [titles[rng.randrange(len(titles))] for _ in range(candidates)]
        t0 = time.perf_counter()
        ranker.score(queries[i % len(queries)], batch)
        times.append(time.perf_counter() - t0)
    ms = sorted(t * 1000 for t in times)
    return {"p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))],
            "examples_per_s": candidates * len(times) / sum(times)}


def _encoder(model: PreTrainedModel, where: Path) -> Any:
    encoder: Any = getattr(getattr(model, model.base_model_prefix, model), "encoder", None)
    if not isinstance(getattr(encoder, "layer", None), torch.nn.ModuleList):
        raise FedshopError(f"{where}: structured pruning needs a BERT-style encoder.layer list")
    return encoder


def keep_layers(teacher_dir: Path, keep: list[int], out: Path) -> Path:
    """Structured pruning: a copy of the teacher with only encoder layers `keep` (dense, so faster on CPU)."""
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    encoder = _encoder(model, teacher_dir)
    layers = encoder.layer
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad or not keep:
        raise FedshopError(f"serving.compress.student_layers={keep}: the teacher has layers 0..{len(layers) - 1}")
    encoder.layer = torch.nn.ModuleList([layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    if (teacher_dir / LABELS_FILE).is_file():
        (out / LABELS_FILE).write_text((teacher_dir / LABELS_FILE).read_text())
    return out


def _encode(tokenizer: Any, pairs: list[tuple[str, str]], max_length: int) -> Any:
    return tokenizer([q for q, _ in pairs], [t for _, t in pairs], truncation=True, max_length=max_length,
                     padding=True, return_tensors="pt")


def prune_ffn(model_dir: Path, size: int, pairs: list[tuple[str, str]], max_length: int) -> dict[str, Any]:
    """Structured pruning of every feed-forward block (in place on disk) to its `size` most important neurons.

    A neuron's importance is its mean |activation| over the calibration pairs' tokens times the L2 norm of
    its output weights: what removing it would change. Dense matrices stay dense, only smaller.
    """
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    layers = _encoder(model, model_dir).layer
    width = int(model.config.intermediate_size)
    if not 0 < size <= width:
        raise FedshopError(f"serving.compress.student_intermediate_size={size}: the model has {width} "
                           f"feed-forward neurons per layer")
    enc = _encode(AutoTokenizer.from_pretrained(model_dir), pairs, max_length)
    mask = enc["attention_mask"].bool()
    acts: dict[int, torch.Tensor] = {}
    hooks = [layer.intermediate.register_forward_hook(
        lambda _m, _i, out, i=i: acts.__setitem__(i, out[mask].abs().mean(0))) for i, layer in enumerate(layers)]
    with torch.inference_mode():
        model(**enc)
    for h in hooks:
        h.remove()
    for i, layer in enumerate(layers):
        w_in, w_out = layer.intermediate.dense, layer.output.dense
        importance = acts[i] * w_out.weight.detach().norm(dim=0)
        keep = importance.topk(size).indices.sort().values
        new_in, new_out = torch.nn.Linear(w_in.in_features, size), torch.nn.Linear(size, w_out.out_features)
        with torch.no_grad():
            new_in.weight.copy_(w_in.weight[keep])
            new_in.bias.copy_(w_in.bias[keep])
            new_out.weight.copy_(w_out.weight[:, keep])
            new_out.bias.copy_(w_out.bias)
        layer.intermediate.dense, layer.output.dense = new_in, new_out
    model.config.intermediate_size = size
    model.save_pretrained(model_dir)
    return {"intermediate_size": size, "teacher_intermediate_size": width}


def choose_fp32_layers(model_dir: Path, pairs: list[tuple[str, str]], max_length: int, target: float) -> dict[str, Any]:
    """The fewest encoder layers to keep fp32 so int8 agrees with fp32 on `target` of the pairs' argmax.

    Greedy: each step keeps fp32 the layer that raises agreement most. Measured on the operator's
    unlabeled pairs, never on the test set.
    """
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    n_layers = len(_encoder(model, model_dir).layer)
    enc = _encode(AutoTokenizer.from_pretrained(model_dir), pairs, max_length)
    with torch.inference_mode():
        reference = model(**enc).logits.argmax(-1)

    def agreement(fp32: list[int]) -> float:
        with torch.inference_mode():
            pred = quantize_int8(model, fp32)(**enc).logits.argmax(-1)
        return float((pred == reference).float().mean())

    chosen: list[int] = []
    steps: list[dict[str, Any]] = [{"fp32_layers": [], "agreement": agreement([])}]
    while steps[-1]["agreement"] < target and len(chosen) < n_layers:
        best = max((agreement(sorted([*chosen, i])), i) for i in range(n_layers) if i not in chosen)
        chosen = sorted([*chosen, best[1]])
        steps.append({"fp32_layers": chosen, "agreement": best[0]})
    return {"fp32_layers": chosen, "search": steps}


def unlabeled_pairs(catalog: Catalog, query_log: list[str], encoder: Encoder, per_query: int,
                    seed: int) -> list[tuple[str, str]]:
    """(query, title) pairs to distil on: per logged query, its nearest catalog titles plus random ones."""
    rng = random.Random(seed)
    titles = [p.title for p in catalog.products]
    vectors = encoder.encode(titles)
    near = max(1, per_query // 2)
    pairs = []
    for start in range(0, len(query_log), 256):
        chunk = query_log[start:start + 256]
        sims = encoder.encode(chunk) @ vectors.T
        for query, row in zip(chunk, sims, strict=True):
            top = np.argpartition(-row, min(near, len(titles) - 1))[:near]
            picked = set(top.tolist()) | {rng.randrange(len(titles)) for _ in range(per_query - near)}
            pairs += [(query, titles[i]) for i in sorted(picked)]
    return pairs


def distill(teacher: Ranker, student_dir: Path, pairs: list[tuple[str, str]], cfg: CompressConfig,
            seed: int) -> dict[str, float]:
    """Train the student (in place on disk) to match the teacher's label distribution (KL) on `pairs`."""
    torch.manual_seed(seed)
    tokenizer = teacher.tokenizer
    student: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(student_dir)
    targets = []
    for start in range(0, len(pairs), 64):
        chunk = pairs[start:start + 64]
        enc = tokenizer([q for q, _ in chunk], [t for _, t in chunk], truncation=True,
                        max_length=teacher.max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            targets.append(torch.softmax(teacher.model(**enc).logits.float(), dim=-1))
    soft = torch.cat(targets)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_lr)
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    student.train()
    t0, total, seen = time.perf_counter(), 0.0, 0
    for _ in range(cfg.distill_epochs):
        rng.shuffle(order)
        for start in range(0, len(order), cfg.distill_batch_size):
            idx = order[start:start + cfg.distill_batch_size]
            enc = tokenizer([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], truncation=True,
                            max_length=teacher.max_length, padding=True, return_tensors="pt")
            log_p = torch.log_softmax(student(**enc).logits.float(), dim=-1)
            loss = torch.nn.functional.kl_div(log_p, soft[idx], reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    student.eval()
    student.save_pretrained(student_dir)
    return {"distill_pairs": len(pairs), "distill_kl": total / max(seen, 1),
            "distill_seconds": time.perf_counter() - t0}


def compress(cfg: FedshopConfig, run_dir: Path) -> dict[str, Any]:
    """Build the forms, measure them, write report.json; returns the report."""
    v, c = cfg.serving, cfg.serving.compress
    if not v.model_dir or not v.catalog or not c.queries or not c.query_log:
        raise FedshopError("serving.model_dir, serving.catalog, serving.compress.queries and serving.compress."
                           "query_log are required (python -m serving.make_catalog writes the last three)")
    teacher_dir = Path(v.model_dir).expanduser().resolve()
    out = Path(c.out_dir).expanduser() if c.out_dir else run_dir / "compressed"
    out.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(v.catalog)
    judged = load_judgements(c.queries)
    log_path = Path(c.query_log).expanduser()
    if not log_path.is_file():
        raise FedshopError(f"serving.compress.query_log={log_path}: not found")
    query_log = [q.strip() for q in log_path.read_text().splitlines() if q.strip()]
    teacher = Ranker(teacher_dir, "fp32", v.max_length, v.gains, fallback_gains=v.fallback_gains)

    encoder = Encoder(retriever_path(v.retriever), v.max_length)
    pairs = unlabeled_pairs(catalog, query_log, encoder, c.distill_pairs_per_query, cfg.seed)
    calibration = random.Random(cfg.seed).sample(pairs, min(c.calibration_pairs, len(pairs)))
    pruned = keep_layers(teacher_dir, list(c.student_layers), out / "pruned")
    narrowed = (prune_ffn(pruned, c.student_intermediate_size, calibration, v.max_length)
                if c.student_intermediate_size else {})
    student_dir = Path(shutil.copytree(pruned, out / "student", dirs_exist_ok=True))
    distilled = distill(teacher, student_dir, pairs, c, cfg.seed)
    mixed = {name: choose_fp32_layers(d, calibration, v.max_length, c.int8_agreement)
             for name, d in (("teacher", teacher_dir), ("student", student_dir))}
    t8, s8 = mixed["teacher"]["fp32_layers"], mixed["student"]["fp32_layers"]

    def form(model_dir: Path, kind: str, fp32_layers: list[int] | None = None) -> Ranker:
        return Ranker(model_dir, kind, v.max_length, v.gains, fp32_layers or [], v.fallback_gains)

    # The -mixed forms exist only when the search kept a layer fp32 (else they are the int8 form).
    forms = {"fp32": teacher, "int8": form(teacher_dir, "int8"),
             **({"int8-mixed": form(teacher_dir, "int8", t8)} if t8 else {}),
             "onnx-int8": form(teacher_dir, "onnx-int8"), "pruned": form(pruned, "fp32"),
             "student": form(student_dir, "fp32"), "student-int8": form(student_dir, "int8"),
             **({"student-int8-mixed": form(student_dir, "int8", s8)} if s8 else {}),
             "student-onnx-int8": form(student_dir, "onnx-int8")}
    queries = [e["query"] for e in judged]
    rows, reference = [], None
    for name, ranker in forms.items():
        scores, pred = quality(ranker, catalog, judged)
        reference = pred if reference is None else reference
        rows.append({"form": name, "size_mb": ranker.size_mb(), **speed(ranker, catalog, queries,
                                                                        c.latency_candidates, c.latency_repeats),
                     **scores, "argmax_agreement_with_fp32": float((pred == reference).mean()),
                     "model_dir": str(ranker.model_dir), "serve_form": ranker.form,
                     "int8_fp32_layers": ranker.fp32_layers,
                     "serve_with": f"serving.model_dir={ranker.model_dir} serving.form={ranker.form}"
                                   + (f" serving.int8_fp32_layers=[{','.join(map(str, ranker.fp32_layers))}]"
                                      if ranker.fp32_layers else "")})
    report = {"teacher": str(teacher_dir), "judged_pairs": int(len(reference if reference is not None else [])),
              "judged_queries": len(judged), "layers_kept": list(c.student_layers), **narrowed, **distilled,
              "int8_layer_search": mixed, "calibration_pairs": len(calibration), "forms": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


COLUMNS = ["form", "size_mb", "examples_per_s", "p50_ms", "p99_ms", "accuracy", "macro_f1", "ndcg@10",
           "argmax_agreement_with_fp32"]


def table(rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table."""
    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows])


def _job(cfg: FedshopConfig, run_dir: Path) -> int:
    report = compress(cfg, run_dir)
    print(table(report["forms"]))
    print(f"report: {run_dir / 'compressed' if not cfg.serving.compress.out_dir else cfg.serving.compress.out_dir}"
          f"/report.json")
    return 0


if __name__ == "__main__":
    from common.run.cli import hydra_launcher

    hydra_launcher(_job, log)()
