"""Crystal structure prediction from an exact formula, on structures a model was not trained on.

    python benchmarks/csp.py --data runs/data [--split val] [--n 200] [--k 20] [--model DIR]
                             [--input data/mp_structures.csv.gz] [--seed 0] [--workers 1] [--out csp.json]

For each of n held-out structures (a seeded choice from the split `--split` of the prepared dataset
--data; their structures are read again from --input by material id), k candidates are generated
with `CrystalGenerator.generate(k, formula=..., ehull="low")`. As in DiffCSP's CSP task, the
sampler is given the composition and the number of atoms of the primitive cell: the allowed
numbers of formula units per (conventional) cell are that of the primitive cell times 1, 2, 3 or 4
(the centrings). Charge check off (the formula is given); clash retries as in the generator.

Match: pymatgen StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10) between a candidate that passes
the distance filter and the true structure. k=1 uses the first candidate, k=K any of them.
  match_rate_k1 / match_rate_kK   share of structures with a matching candidate
  rms_k1 / rms_kK                 mean RMS displacement of the matches, normalised by (V/N)^(1/3) as
                                  StructureMatcher.get_rms_dist returns it (DiffCSP's figure); for
                                  k=K the best match per structure
  seconds_per_formula             wall time to generate the k candidates of one formula (mean)
With --unseen-systems only structures whose chemical system (element set) occurs nowhere in the
train split are used: structure prediction for chemistries the model has never seen.
A markdown summary is printed, then one JSON line (the report, also written to --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt.atomic import atomic_write  # noqa: E402
from wyckoffgpt.data import load_meta  # noqa: E402

MATCHER_SETTINGS = {"ltol": 0.3, "stol": 0.5, "angle_tol": 10}
CENTRINGS = (1, 2, 3, 4)  # conventional cell / primitive cell

_GEN = None
_OPTS: dict = {}


def split_systems(data_dir: Path, split: str) -> list[str]:
    """Chemical system ("Al-Ca-Cu") of each sequence of a split, read from its element tokens."""
    from wyckoffgpt.data import SequenceDataset
    from wyckoffgpt.vocab import default_vocab

    tokens = default_vocab().tokens
    out = []
    for ids, _ in SequenceDataset(data_dir, split):
        head = [tokens[i] for i in ids[:12].tolist()]  # <bos> stability n:k elements...
        out.append("-".join(sorted(head[3:3 + int(head[2][2:])])))
    return out


def held_out(data_dir: Path, input_path: Path, split: str, n: int, seed: int,
             unseen_systems: bool = False) -> list[tuple[str, object]]:
    """(material id, record) of n seeded structures of the split, one per reduced formula; with
    unseen_systems only those whose chemical system has no structure in the train split."""
    from pymatgen.core import Composition

    from wyckoffgpt.structure_io import iter_records

    meta = load_meta(data_dir)
    if split not in meta.get("material_ids", {}):
        raise SystemExit(f"csp.py: error: {data_dir} has no material ids for split {split!r}")
    ids = meta["material_ids"][split]
    if unseen_systems:
        seen = set(split_systems(data_dir, "train"))
        ids = [i for i, system in zip(ids, split_systems(data_dir, split)) if system not in seen]
    order = np.random.default_rng(seed).permutation(len(ids))
    wanted = {ids[i]: rank for rank, i in enumerate(order)}
    found = {}
    for rec in iter_records(input_path, None):
        if rec.key in wanted:
            found[rec.key] = rec
    chosen, formulas = [], set()
    for key in sorted(found, key=wanted.get):
        rec = found[key]
        try:
            formula = Composition(_structure(rec).composition).reduced_formula
        except ValueError:
            continue
        if formula in formulas:
            continue  # one structure per formula: the task is "this formula -> its structure"
        formulas.add(formula)
        chosen.append((key, rec))
        if len(chosen) == n:
            break
    return chosen


def _structure(rec):
    from wyckoffgpt.structure_io import parse_structure

    return parse_structure(rec)


def _init(model: str | None, k: int, seed: int) -> None:
    global _GEN
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    from wyckoffgpt.generation import CrystalGenerator

    _GEN = CrystalGenerator.from_pretrained(model, device="cpu", cpu_threads=1)
    _OPTS.update(k=k, seed=seed)


def predict(item: tuple[int, str, object]) -> dict:
    """Generate k candidates for one held-out structure and match them against it."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    index, key, rec = item
    target = _structure(rec)
    formula, per_unit = target.composition.get_reduced_formula_and_factor()
    prim = target.get_primitive_structure()
    z_prim = round(len(prim) / (len(target) / per_unit))
    units = sorted({z_prim * c for c in CENTRINGS})
    t0 = time.perf_counter()
    results = _GEN.generate(_OPTS["k"], formula=formula, formula_units=units, ehull="low",
                            seed=_OPTS["seed"] + index, check_unique=False, charge_check="off")
    seconds = time.perf_counter() - t0
    matcher = StructureMatcher(**MATCHER_SETTINGS)
    rms = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in results:
            d = None
            if r.distance_valid:
                try:
                    out = matcher.get_rms_dist(r.structure, target)
                    d = None if out is None else float(out[0])
                except (ValueError, ArithmeticError):
                    d = None
            rms.append(d)
    return {"material_id": key, "formula": formula, "atoms": len(target), "formula_units_allowed": units,
            "seconds": seconds, "match_seconds": time.perf_counter() - t0 - seconds,
            "valid": sum(r.distance_valid for r in results), "rms": rms,
            "formula_exact": all(r.structure is not None and r.structure.composition.reduced_formula == formula
                                 for r in results)}


def summarize(rows: list[dict], k: int) -> dict:
    first = [r["rms"][0] for r in rows]
    best = [min((d for d in r["rms"] if d is not None), default=None) for r in rows]
    m1 = [d for d in first if d is not None]
    mk = [d for d in best if d is not None]
    return {
        "structures": len(rows),
        "match_rate_k1": len(m1) / len(rows), f"match_rate_k{k}": len(mk) / len(rows),
        "rms_k1": float(np.mean(m1)) if m1 else None, f"rms_k{k}": float(np.mean(mk)) if mk else None,
        "seconds_per_formula": float(np.mean([r["seconds"] for r in rows])),
        "match_seconds_per_formula": float(np.mean([r["match_seconds"] for r in rows])),
        "valid_fraction": sum(r["valid"] for r in rows) / (k * len(rows)),
        "formula_exact_fraction": sum(r["formula_exact"] for r in rows) / len(rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder (material ids per split)")
    p.add_argument("--split", default="val", help="held-out split of --data (default val)")
    p.add_argument("--input", type=Path, default=REPO / "data" / "mp_structures.csv.gz",
                   help="the structures --data was prepared from")
    p.add_argument("--model", help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--unseen-systems", action="store_true", dest="unseen_systems",
                   help="only structures whose chemical system (element set) has no structure in the train split")
    p.add_argument("--n", type=int, default=200, help="held-out structures (one per formula)")
    p.add_argument("--k", type=int, default=20, help="candidates per formula")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes, one formula at a time each")
    p.add_argument("--out", type=Path, help="write the report (with per-structure rows) here; never overwritten")
    args = p.parse_args(argv)
    if args.n <= 0 or args.k <= 0 or args.workers <= 0:
        print("csp.py: error: --n, --k and --workers must be positive", file=sys.stderr)
        return 2
    if args.out is not None and args.out.exists():
        print(f"csp.py: error: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    chosen = held_out(args.data, args.input, args.split, args.n, args.seed, args.unseen_systems)
    items = [(i, key, rec) for i, (key, rec) in enumerate(chosen)]
    with Pool(args.workers, initializer=_init, initargs=(args.model, args.k, args.seed)) as pool:
        rows = []
        for row in pool.imap(predict, items):
            rows.append(row)
            print(f"{len(rows)}/{len(items)} {row['formula']}: {row['seconds']:.1f} s, "
                  f"match k=1 {row['rms'][0] is not None}, any {any(d is not None for d in row['rms'])}",
                  file=sys.stderr, flush=True)
    summary = summarize(rows, args.k)
    report = {"benchmark": "csp", "date": datetime.date.today().isoformat(), "command": shlex.join(sys.argv),
              "data": str(args.data), "split": args.split, "unseen_systems": args.unseen_systems, "model": args.model or "bundled", "k": args.k,
              "matcher": MATCHER_SETTINGS, "wall_seconds": time.perf_counter() - t0, "workers": args.workers,
              **summary}
    print(f"| structures | match k=1 | match k={args.k} | RMS k=1 | RMS k={args.k} | s per formula |")
    print("|---|---|---|---|---|---|")
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    print(f"| {summary['structures']} | {100 * summary['match_rate_k1']:.2f} % | "
          f"{100 * summary[f'match_rate_k{args.k}']:.2f} % | {fmt(summary['rms_k1'])} | "
          f"{fmt(summary[f'rms_k{args.k}'])} | {summary['seconds_per_formula']:.2f} |")
    if args.out is not None:
        atomic_write(args.out, json.dumps({**report, "rows": rows}, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
