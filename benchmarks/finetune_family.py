"""Fine-tune a model on one chemical family and measure what it changes.

    nice -n 10 python benchmarks/finetune_family.py --data runs/data --out runs/ft-oxides
        [--element O] [--model bundled] [--max-steps 200] [--n 300] [--seed 0]

The family: the crystals whose sequence holds the element's token (--element O: every crystal
with oxygen). Its members of --data's train split and of its val split become the fine-tuning
dataset, OUT/data. --data must be split as the base model's training data was (the bundled model:
`python data_prep/prepare.py --input data/mp_structures.csv.gz --out runs/data`, seed 0), so that
the family's validation crystals are ones the base model never trained on and its loss on them is
honest. The model is then fine-tuned with `train.py --init-from`'s defaults (wyckoffgpt.training.
FINETUNE_DEFAULTS) for at most --max-steps steps, into OUT/model.

Measured, base model against fine-tuned one: the validation loss on the family's val crystals
(nats per target token, the training loop's evaluation), and the family's share among --n
unconditional samples (T = 1, the generator's defaults, same seed). Prints one JSON line last,
also written to OUT/report.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from wyckoffgpt.atomic import atomic_write
from wyckoffgpt.data import VOCAB_FIELDS, SequenceDataset, load_meta, write_dataset
from wyckoffgpt.generation import CrystalGenerator
from wyckoffgpt.modeling_wyckoffgpt import WyckoffGPTModel
from wyckoffgpt.training import TrainConfig, evaluate, input_features, resolve_init_from, train
from wyckoffgpt.vocab import default_vocab


def family_split(data: Path, split: str, element_id: int) -> list[tuple[Any, Any]]:
    ds = SequenceDataset(data, split)
    items = (ds[i] for i in range(len(ds)))
    return [(ids.numpy(), vals.numpy()) for ids, vals in items if bool((ids == element_id).any())]


def write_family_dataset(data: Path, out: Path, element: str) -> dict[str, int]:
    meta = load_meta(data)
    element_id = default_vocab().element_ids[element]
    splits = {s: family_split(data, s, element_id) for s in ("train", "val")}
    write_dataset(out, splits, {**{k: meta[k] for k in VOCAB_FIELDS}, "source": str(data),
                                "family": f"sequences with {element}"})  # fmt: skip
    return {s: len(v) for s, v in splits.items()} | {f"all_{s}": meta["splits"][s] for s in ("train", "val")}


def val_loss(model_dir: Path, data: Path) -> float:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = WyckoffGPTModel.from_pretrained(str(model_dir), dtype=torch.float32).to(acc.device)
    features = input_features(model.config, load_meta(data)["vocab_hash"])
    return evaluate(acc, model, SequenceDataset(data, "val"), 256, model.config.pad_token_id, features)["loss"]


def family_share(model_dir: Path, element: str, n: int, seed: int) -> dict[str, Any]:
    gen = CrystalGenerator.from_pretrained(model_dir)
    start = time.perf_counter()
    samples = gen.generate(n, temperature=1.0, seed=seed, check_unique=False)
    hits = sum(element in s.sequence.tokens for s in samples)
    return {"share": hits / n, "hits": hits, "n": n, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared dataset with the base model's train/val split")
    p.add_argument("--out", required=True, help="new folder for the family dataset, the model and report.json")
    p.add_argument("--element", default="O", help="the family: crystals containing this element")
    p.add_argument("--model", default="bundled", help="base model: 'bundled', a folder or a Hub repo id")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, help="sequences per step (default: the small preset's)")
    p.add_argument("--n", type=int, default=300, help="unconditional samples per model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16"], help="of the fine-tuning")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; choose a new --out", file=sys.stderr)
        return 2
    if args.element not in default_vocab().element_ids:
        print(f"error: unknown element {args.element!r}", file=sys.stderr)
        return 2
    base = resolve_init_from(args.model)

    sizes = write_family_dataset(Path(args.data), out / "data", args.element)
    print(f"family dataset: {sizes}", flush=True)
    before = {"val_loss": val_loss(base, out / "data"), **family_share(base, args.element, args.n, args.seed)}
    print(f"base: {before}", flush=True)
    start = time.perf_counter()
    summary = train(TrainConfig(data_dir=str(out / "data"), out_dir=str(out / "model"), init_from=args.model,
                                max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed, mixed_precision=args.mixed_precision,
                                log_every=10, progress=False,
                                command="python " + " ".join(sys.argv)))  # fmt: skip
    train_s = time.perf_counter() - start
    after = {"val_loss": val_loss(out / "model", out / "data"),
             **family_share(out / "model", args.element, args.n, args.seed)}  # fmt: skip
    report = {
        "benchmark": "finetune_family", "date": datetime.date.today().isoformat(), "base_model": str(base),
        "element": args.element, "family_sizes": sizes, "steps": summary["step"], "stop_reason": summary["stop_reason"],
        "exported": summary["exported"], "train_seconds": round(train_s, 1), "before": before, "after": after,
        "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    atomic_write(out / "report.json", json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
