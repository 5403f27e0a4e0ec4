"""Model-labelled training rows: the model's own samples, labelled `ehull:low|high` by the stability funnel.

    python data_prep/label_samples.py --model M --data DIR --out DIR2 --log labels.jsonl
                                      [--systems 160] [--elements-count 3] [--per-class 2]
                                      [--relax-steps 40] [--repeat 4] [--workers K] [--seed 0]

Why: 92 % of the data's rows are `ehull:low` and the high ones are mostly other chemistries, so the
stability token learns which systems are stable, not which crystals of one system are. Here the model
draws `--per-class` samples with `ehull:low` and as many with `ehull:high` in each of `--systems`
chemical systems of the dataset's train split (never its val or test systems); the valid, novel ones
(a sample equal to a training crystal keeps that crystal's MP label) are relaxed with CHGNet for at
most `--relax-steps` FIRE steps, scored against the data's hull, and labelled with the dataset's own
stability threshold. Samples that fail to relax or come apart (disconnected) are skipped and counted.

DIR2 is DIR with the labelled sequences appended to its train split, `--repeat` times each (they are
few next to the MP rows); val and test are DIR's. In meta.json they are marked: their material ids
are `model:<system>:<class>:<index>`, and `model_labelled` records the model, the recipe and the
counts. Every finished relaxation is appended to the --log (JSONL), so a killed run resumes.
Needs the `relax` extra (CHGNet).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import stability  # noqa: E402
from wyckoffgpt.atomic import atomic_write  # noqa: E402
from wyckoffgpt.data import SequenceDataset, load_meta, split_systems, write_dataset  # noqa: E402
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex  # noqa: E402
from wyckoffgpt.generation import CrystalGenerator, resolve_model_path  # noqa: E402
from wyckoffgpt.structure_io import InputError  # noqa: E402

CLASSES = ("low", "high")


def pick_systems(data: Path, count: int, n_elements: int, seed: int) -> list[str]:
    """`count` chemical systems of the train split with `n_elements` elements, in a seeded order."""
    systems = sorted({s for s in split_systems(data, "train") if s.count("-") + 1 == n_elements})
    rng = np.random.default_rng(seed)
    return [systems[i] for i in rng.permutation(len(systems))[:count]]


def draw(gen: CrystalGenerator, systems: list[str], per_class: int, seed: int, fingerprints: FingerprintIndex,
         counts: Counter) -> list[tuple[str, object]]:
    """(key, sample) of the valid, novel samples; `counts` tallies the rest by reason."""
    out = []
    for system in systems:
        for ehull in CLASSES:
            for s in gen.generate(per_class, elements=system.split("-"), ehull=ehull, seed=seed):
                counts["drawn"] += 1
                if not s.valid:
                    counts["invalid"] += 1
                elif fingerprints.find_match(s.structure) is not None:
                    counts["known (MP label kept)"] += 1
                else:
                    out.append((f"model:{system}:{ehull}:{s.index}", s))
    return out


def label(result: stability.StabilityResult, refs: stability.ElementalReferences,
          config: stability.RelaxConfig) -> tuple[float | None, str]:
    """(e_above_hull, "") of a relaxation that ended in a sane, connected cell (converged or at the
    step cap: the cap is the recipe), else (None, the reason)."""
    if result.status not in ("relaxed", "not_converged", "disconnected") or result.energy_per_atom is None:
        return None, result.status
    if not stability.is_connected(result.structure, config.bond_factor):
        return None, "disconnected"
    e_form = refs.formation_energy_per_atom(result.structure, result.energy_per_atom, config.corrections)
    if not math.isfinite(e_form):
        return None, "error"
    return refs.hull.e_above_hull(result.structure.composition, e_form), ""


def relax_and_log(jobs: list[tuple[str, object]], log: Path, relax_steps: int, workers: int | None) -> None:
    config = stability.RelaxConfig(max_steps=relax_steps)
    refs = stability.default_references(config=config)
    t0 = time.perf_counter()
    with log.open("a") as f:
        for done, (i, r) in enumerate(stability.iter_relax([s.structure for _, s in jobs], config, workers), 1):
            key, sample = jobs[i]
            e_hull, reason = label(r, refs, config)
            record = {"key": key, "e_above_hull": e_hull, "skipped": reason or None, "steps": r.steps,
                      "seconds": round(r.seconds, 2), "sequence": str(sample.sequence)}
            f.write(json.dumps(record) + "\n")
            f.flush()
            if done % 25 == 0:
                print(f"{done}/{len(jobs)} relaxed, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def read_log(log: Path) -> dict[str, dict]:
    if not log.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, log.read_text().splitlines()) if r}


def write_labelled(data: Path, out: Path, records: dict[str, dict], repeat: int, recipe: dict) -> dict:
    """DIR with the labelled records appended to train (`repeat` times each); returns the label counts."""
    from wyckoffgpt.tokenizer import CrystalSequence
    from wyckoffgpt.vocab import default_vocab

    meta = load_meta(data)
    threshold = meta.get("stability_threshold")
    vocab = default_vocab()
    splits = {}
    for name in meta["splits"]:
        ds = SequenceDataset(data, name)
        splits[name] = [(ids.numpy(), values.numpy()) for ids, values in (ds[i] for i in range(len(ds)))]
    labelled, ids_out, classes = [], [], Counter()
    for key, r in sorted(records.items()):
        if r["e_above_hull"] is None:
            continue
        cls = "low" if r["e_above_hull"] < threshold else "high"
        seq = CrystalSequence.from_string(r["sequence"], vocab)
        ids = seq.ids.copy()
        ids[1] = vocab.token_to_id[f"ehull:{cls}"]
        labelled.append((ids, seq.values.astype(np.float32)))
        ids_out.append(key)
        classes[cls] += 1
    splits["train"] = splits["train"] + labelled * repeat
    material_ids = dict(meta["material_ids"])
    material_ids["train"] = list(material_ids["train"]) + ids_out * repeat
    keep = {k: v for k, v in meta.items() if k not in ("format", "max_length", "splits")}
    summary = {**recipe, "repeat": repeat, "sequences": len(labelled), "classes": dict(classes),
               "stability_threshold": threshold}
    write_dataset(out, splits, {**keep, "material_ids": material_ids, "model_labelled": summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or bundled name (default: the bundled model)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder (data_prep/prepare.py)")
    p.add_argument("--out", type=Path, required=True, help="new dataset folder")
    p.add_argument("--log", type=Path, required=True, help="JSONL of finished relaxations (resumed)")
    p.add_argument("--systems", type=int, default=160, help="train systems to sample in")
    p.add_argument("--elements-count", type=int, default=3, help="elements per system (3: ternaries)")
    p.add_argument("--per-class", type=int, default=2, help="samples per system and stability class")
    p.add_argument("--relax-steps", type=int, default=40, help="FIRE steps at most per relaxation")
    p.add_argument("--repeat", type=int, default=4, help="copies of each labelled sequence in train")
    p.add_argument("--workers", type=int, help="relaxation processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        if args.out.exists() and any(args.out.iterdir()):
            raise InputError(f"{args.out} exists and is not empty; choose a new folder")
        for name, v in (("systems", args.systems), ("per-class", args.per_class),
                        ("relax-steps", args.relax_steps), ("repeat", args.repeat)):
            if v < 1:
                raise InputError(f"--{name} must be at least 1, got {v}")
        load_meta(args.data)
        stability.chgnet_version()
        gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
        folder = resolve_model_path(args.model)
        fingerprints = FingerprintIndex.load(folder / INDEX_FILE)
    except (InputError, stability.RelaxUnavailable, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    systems = pick_systems(args.data, args.systems, args.elements_count, args.seed)
    t0 = time.perf_counter()
    done = read_log(args.log)
    drawn = draw(gen, systems, args.per_class, args.seed, fingerprints, counts)
    jobs = [(k, s) for k, s in drawn if k not in done]
    draw_s = time.perf_counter() - t0
    relax_and_log(jobs, args.log, args.relax_steps, args.workers)
    keys = {k for k, _ in drawn}  # a log of a larger run labels only this run's samples
    records = {k: r for k, r in read_log(args.log).items() if k in keys}
    counts.update(r["skipped"] or "labelled" for r in records.values())
    recipe = {"model": str(folder), "systems": len(systems), "elements_count": args.elements_count,
              "per_class": args.per_class, "relax_steps": args.relax_steps, "seed": args.seed,
              "labeller": stability.chgnet_version()}
    summary = write_labelled(args.data, args.out, records, args.repeat, recipe)
    report = {**summary, "counts": dict(counts), "draw_s": round(draw_s, 1),
              "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write(args.out / "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
