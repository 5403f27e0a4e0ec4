"""The same model on the CPU and on a GPU: validation NLL, KV-cached vs full-prefix logits on the GPU,
and the generator's samples on the GPU. The last line printed is one JSON object:

    nll_cpu, nll_device, nll_rel_diff   loss per target token of the first --n-val validation sequences
    kv_cache_max_abs_diff               last-position logits, one token at a time with the cache vs the
                                        whole prefix, on the device
    generation                          per condition: samples, seconds, seq-valid, dist-valid, SMACT,
                                        space-group consistency (and the exact chemical system when asked)

    python benchmarks/device_parity.py [--model DIR] [--data runs/data] [--device cuda] [-n 1000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import CrystalGenerator  # noqa: E402
from wyckoffgpt.chemistry import smact_valid  # noqa: E402
from wyckoffgpt.data import SequenceDataset, collate  # noqa: E402
from wyckoffgpt.training import input_features  # noqa: E402

CONDITIONS = ({}, {"elements": ["Al", "Ca", "Cu"], "ehull": "low"}, {"spacegroup": 225})


@torch.no_grad()
def parity(model, data: str, n_val: int, device: str) -> dict:
    cfg = model.config
    ds = SequenceDataset(data, "val")
    batch = collate([ds[i] for i in range(min(n_val, len(ds)))], cfg.pad_token_id,
                    input_features(cfg, cfg.vocab_hash))
    out = model.to("cpu")(**batch, compute_loss=True)
    nll_cpu = float(out.loss_sum / out.n_tokens)
    on_device = model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = on_device(**batch, compute_loss=True)
    nll_device = float(out.loss_sum / out.n_tokens)
    prefix = {k: v[:8, :20] for k, v in batch.items()}
    full = on_device(**prefix).logits[:, -1]
    past = step = None
    for t in range(20):
        step = on_device(**{k: v[:, t:t + 1] for k, v in prefix.items()}, cache=past, use_cache=True)
        past = step.cache
    model.to("cpu")
    return {"nll_cpu": nll_cpu, "nll_device": nll_device, "nll_rel_diff": abs(nll_cpu - nll_device) / abs(nll_cpu),
            "kv_cache_max_abs_diff": float((full - step.logits[:, -1]).abs().max())}


def generation(gen: CrystalGenerator, n: int) -> list[dict]:
    rows = []
    for kw in CONDITIONS:
        t0 = time.perf_counter()
        res = gen.generate(n, temperature=1.0, seed=0, **kw)
        decoded = [r for r in res if r.structure is not None]
        valid = [r for r in res if r.valid]
        row = {"conditions": kw, "n": len(res), "seconds": round(time.perf_counter() - t0, 1),
               "seq_valid": len(decoded) / len(res), "dist_valid": len(valid) / len(res),
               "smact": float(np.mean([smact_valid(r.structure.composition) for r in decoded])),
               "sg_consistent": float(np.mean(["spacegroup_mismatch" not in r.flags for r in valid]))}
        if "elements" in kw:
            row["exact_system"] = all({e.symbol for e in r.structure.composition.elements} == set(kw["elements"])
                                      for r in valid)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("--data", default="runs/data", help="tokenized dataset folder (its val split)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-n", type=int, default=1000, help="samples per condition")
    p.add_argument("--n-val", type=int, default=512)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    report = {"device": args.device, **parity(gen.model, args.data, args.n_val, args.device)}
    print(json.dumps(report), flush=True)
    report["generation"] = generation(CrystalGenerator.from_pretrained(args.model, device=args.device), args.n)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
