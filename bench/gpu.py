"""GPU throughput (not in CI): training examples/s for full vs LoRA, float32 vs bf16 autocast, for MiniLM and a
base-size BERT (random init: speed only), and a simulation of 4 merchants sharing the GPU (client_gpus=0.25).

Run on a machine with CUDA (the user's CUDA torch): python bench/gpu.py [--seconds 20] [--skip-simulation].
Writes bench/results/gpu.json. Without a GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
from _util import run_simulation, table, write
from transformers import BertConfig, BertForSequenceClassification

from common.run.config import compose
from common.tasks import model as M


def base_size_bert(labels: int) -> BertForSequenceClassification:
    """BERT-base's shape (12 layers, hidden 768, 110M parameters), randomly initialised."""
    return BertForSequenceClassification(BertConfig(num_labels=labels))  # type: ignore[call-arg]


def examples_per_second(model: torch.nn.Module, batch: int, length: int, bf16: bool, seconds: float) -> float:
    """Training steps on random token ids for about `seconds`; examples per second after a warm-up."""
    device = torch.device("cuda")
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (batch, length), device=device)
    labels = torch.randint(0, 4, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def training_rows(seconds: float) -> list[dict[str, Any]]:
    """Every (model, fine-tuning, precision) combination."""
    rows = []
    for model_name in ("minilm", "bert-base"):
        for tune in ("full", "lora"):
            cfg = compose(["model=minilm", f"finetune={tune}"])
            for bf16 in (False, True):
                if model_name == "minilm":
                    model = M.build_model(cfg.model, ["e", "s", "c", "i"], 0, cfg.finetune)
                else:
                    model = M.with_finetune(base_size_bert(4), cfg.finetune, 0)
                rate = examples_per_second(model, 32, 128, bf16, seconds)
                rows.append({"model": model_name, "finetune": tune, "precision": "bf16 autocast" if bf16 else "fp32",
                             "examples_per_s": rate})
                print(table(rows[-1:], list(rows[-1])), flush=True)
                del model
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    """Measure and write bench/results/gpu.json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--skip-simulation", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    doc: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "training": training_rows(a.seconds)}
    if not a.skip_simulation:
        sims = []
        for tune in ("full", "lora"):
            run = run_simulation(["model=minilm", "train.progress=false", "simulation.num_merchants=4",
                                  "simulation.client_gpus=0.25", "simulation.client_cpus=1", f"finetune={tune}",
                                  "strategy.num_rounds=3"])
            rounds = [r["seconds"] for r in run["results"]["rounds"][2:]]
            sims.append({"setting": f"simulation, 4 merchants x 0.25 GPU, {tune}",
                         "round_s": sum(rounds) / len(rounds), "accuracy": run["results"]["final"]["accuracy"]})
        doc["simulation"] = sims
        print(table(sims, list(sims[0])))
    print(table(doc["training"], ["model", "finetune", "precision", "examples_per_s"]))
    print("written:", write("gpu", doc))


if __name__ == "__main__":
    main()
