"""Crystal structure prediction from an exact formula, on structures a model was not trained on.

    python benchmarks/csp.py --data runs/data [--split val] [--n 200] [--k 20] [--model DIR]
                             [--input data/mp_structures.csv.gz] [--seed 0] [--analogues K] [--analogue-share F]
                             [--workers 1] [--out csp.json]

For each of n held-out structures (a seeded choice from the split `--split` of the prepared dataset
--data; their structures are read again from --input by material id), k candidates are generated
with `CrystalGenerator.generate(k, formula=..., ehull="low")`. As in DiffCSP's CSP task, the
sampler is given the composition and the number of atoms of the primitive cell: the allowed
numbers of formula units per (conventional) cell are that of the primitive cell times 1, 2, 3 or 4
(the centrings). Charge check off (the formula is given); clash retries as in the generator.
`--analogues K`: --analogue-share of the k candidates drawn for the formula with one element replaced
by one of its K nearest in Mendeleev number, then substituted back (`SamplingConfig.analogues`).

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
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # heldout.py, also when loaded as a module

from heldout import (  # noqa: E402
    MATCHER_SETTINGS,
    add_analogue_arguments,
    analogue_settings,
    emit,
    matcher,
    rms_distance,
    run_jobs,
    split_records,
    worker_generator,
)

from wyckoffgpt.data import split_systems  # noqa: E402
from wyckoffgpt.structure_io import InputError, parse_structure  # noqa: E402

CENTRINGS = (1, 2, 3, 4)  # conventional cell / primitive cell


def held_out(data_dir: Path, input_path: Path, split: str, n: int, seed: int,
             unseen_systems: bool = False) -> list[tuple[str, object]]:
    """(material id, record) of n seeded structures of the split, one per reduced formula; with
    unseen_systems only those whose chemical system has no structure in the train split."""
    from pymatgen.core import Composition

    rows = split_records(data_dir, input_path, split)
    if unseen_systems:
        seen = set(split_systems(data_dir, "train"))
        rows = [row for row in rows if row[1] not in seen]
    order = np.random.default_rng(seed).permutation(len(rows))
    chosen, formulas = [], set()
    for i in order:
        key, _, rec = rows[i]
        try:
            formula = Composition(parse_structure(rec).composition).reduced_formula
        except ValueError:
            continue
        if formula in formulas:
            continue  # one structure per formula: the task is "this formula -> its structure"
        formulas.add(formula)
        chosen.append((key, rec))
        if len(chosen) == n:
            break
    return chosen


def predict(item: tuple[int, str, object, int, int, dict]) -> dict:
    """Generate k candidates for one held-out structure and match them against it."""
    index, key, rec, k, seed, sampling = item
    target = parse_structure(rec)
    formula, per_unit = target.composition.get_reduced_formula_and_factor()
    prim = target.get_primitive_structure()
    z_prim = round(len(prim) / (len(target) / per_unit))
    units = sorted({z_prim * c for c in CENTRINGS})
    t0 = time.perf_counter()
    results = worker_generator().generate(k, formula=formula, formula_units=units, ehull="low",
                                          seed=seed + index, check_unique=False, charge_check="off", **sampling)
    seconds = time.perf_counter() - t0
    m = matcher()
    rms = [rms_distance(m, r.structure, target) if r.distance_valid else None for r in results]
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
    add_analogue_arguments(p)
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
    try:
        sampling = analogue_settings(args)
        chosen = held_out(args.data, args.input, args.split, args.n, args.seed, args.unseen_systems)
    except InputError as exc:
        print(f"csp.py: error: {exc}", file=sys.stderr)
        return 2
    items = [(i, key, rec, args.k, args.seed, sampling) for i, (key, rec) in enumerate(chosen)]
    rows = []
    for row in run_jobs(predict, items, args.workers, args.model):
        rows.append(row)
        print(f"{len(rows)}/{len(items)} {row['formula']}: {row['seconds']:.1f} s, "
              f"match k=1 {row['rms'][0] is not None}, any {any(d is not None for d in row['rms'])}",
              file=sys.stderr, flush=True)
    summary = summarize(rows, args.k)
    report = {"benchmark": "csp", "date": datetime.date.today().isoformat(), "command": shlex.join(sys.argv),
              "data": str(args.data), "split": args.split, "unseen_systems": args.unseen_systems, "model": args.model or "bundled", "k": args.k,
              "sampling": sampling,
              "matcher": MATCHER_SETTINGS, "wall_seconds": time.perf_counter() - t0, "workers": args.workers,
              **summary}
    print(f"| structures | match k=1 | match k={args.k} | RMS k=1 | RMS k={args.k} | s per formula |")
    print("|---|---|---|---|---|---|")
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    print(f"| {summary['structures']} | {100 * summary['match_rate_k1']:.2f} % | "
          f"{100 * summary[f'match_rate_k{args.k}']:.2f} % | {fmt(summary['rms_k1'])} | "
          f"{fmt(summary[f'rms_k{args.k}'])} | {summary['seconds_per_formula']:.2f} |")
    emit(report, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
