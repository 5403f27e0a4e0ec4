"""Recovery of stable crystals: given a chemical system, does the model propose its stable crystals?

    python benchmarks/recovery.py --data DIR [--split test] [--input data/mp_structures.csv.gz]
                                  [--model DIR] [--n 300] [--n-large 2000] [--large-systems 0]
                                  [--max-systems M] [--seed 0] [--analogues K] [--analogue-share F]
                                  [--workers 2] [--out recovery.json]

--data is a dataset prepared with `data_prep/prepare.py --split system` (whole chemical systems in
val and test); its structures are read again from --input by material id. Targets: for each ternary
system of the split --split with at least --min-stable structures within --stable-ehull eV/atom of
the hull (the `e_above_hull` column), those structures. Per system, N samples are drawn conditioned on
its elements (`CrystalGenerator.generate(N, elements=..., ehull="low", temperature=1.0)`, the default
sampler and charge check), and a target counts as recovered when at least one valid sample of its
reduced formula matches it, unrelaxed, under StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10).
`--large-systems K` repeats this with --n-large samples on the first K systems (the paper's budget).
--max-systems caps the systems, in a seeded order. `--analogues K` draws --analogue-share of each
system's N samples in its analogue systems (`SamplingConfig.analogues`, `wyckoffgpt.analogues`).
With `--analogue-templates` some samples are substituted known crystals, not drawn by the model;
`recovered_by_drawn` counts the targets that the drawn samples alone match, so that the two sources
of a recovery stay apart.

A model trained on a random split of the same data has seen most of these structures: its recovery
is then memorisation, not transfer. So each target is looked up among the model's training crystals
(its fingerprint index, `fingerprints.npz`: by material id, and by StructureMatcher's default
tolerances for the same crystal under another id); `seen_in_training` counts those, and
`recovered_unseen` / `unseen` is the recovery on the others, the figure that measures transfer.

Per system: targets, seen in training, recovered (also of the unseen), valid samples, distinct
formulas sampled, sampling and matching seconds. A markdown table is printed, then one JSON line
(the report, also written to --out with the per-target rows).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections import defaultdict
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

from wyckoffgpt.structure_io import InputError, Record, parse_structure  # noqa: E402

TEMPERATURE = 1.0
UNCHECKED = "unchecked"  # seen_as of a target when the model has no fingerprint index
PER_SYSTEM = ("targets", "recovered", "seen_in_training", "recovered_unseen")


def target_systems(rows: list[tuple[str, str, Record]], stable_ehull: float, min_stable: int,
                   arity: int = 3) -> dict[str, list[tuple[str, Record]]]:
    """Stable structures (material id, record) of each system of `arity` elements with at least
    `min_stable` of them within `stable_ehull` eV/atom of the hull."""
    stable: dict[str, list[tuple[str, Record]]] = defaultdict(list)
    for key, system, rec in rows:
        if system.count("-") + 1 == arity and rec.e_above_hull is not None and rec.e_above_hull <= stable_ehull:
            stable[system].append((key, rec))
    return {s: v for s, v in sorted(stable.items()) if len(v) >= min_stable}


def match_targets(samples: list, targets: list) -> list[dict]:
    """For each target structure, the first sample (in order) that matches it, comparing only within
    the same reduced formula: {"matched", "first_sample", "rms"}."""
    by_formula: dict[str, list[tuple[int, object]]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_formula[s.composition.reduced_formula].append((i, s))
    m = matcher()
    out = []
    for target in targets:
        hit = next(((i, d) for i, s in by_formula.get(target.composition.reduced_formula, [])
                    if (d := rms_distance(m, s, target)) is not None), None)
        out.append({"matched": hit is not None, "first_sample": None if hit is None else hit[0],
                    "rms": None if hit is None else hit[1]})
    return out


def run_system(job: tuple[str, int, str, list[tuple[str, Record]], int, int, dict]) -> dict:
    """Sample one system and match its targets (in a pool worker)."""
    budget, index, system, targets, n, seed, sampling = job
    t0 = time.perf_counter()
    results = worker_generator().generate(n, elements=system.split("-"), ehull="low", temperature=TEMPERATURE,
                                          seed=seed + index, check_unique=False, **sampling)
    sample_seconds = time.perf_counter() - t0
    valid = [r for r in results if r.valid]
    samples = [r.structure for r in valid]
    structures = [parse_structure(rec) for _, rec in targets]
    matches = match_targets(samples, structures)
    # --analogue-templates: a target first matched by a template is matched again among the drawn samples.
    by_template = [k for k, m in enumerate(matches) if m["matched"] and "template" in valid[m["first_sample"]].flags]
    if by_template:
        drawn = [r.structure for r in valid if "template" not in r.flags]
        for k, own in zip(by_template, match_targets(drawn, [structures[k] for k in by_template])):
            matches[k]["matched_by_drawn"] = own["matched"]
    return {"budget": budget, "system": system, "n": n, "valid": len(samples),
            "formulas_sampled": len({s.composition.reduced_formula for s in samples}),
            "sample_seconds": sample_seconds, "match_seconds": time.perf_counter() - t0 - sample_seconds,
            "targets": [{"material_id": key, "formula": s.composition.reduced_formula, "e_above_hull": rec.e_above_hull,
                         **m} for (key, rec), s, m in zip(targets, structures, matches)]}


def training_lookup(model: str | None):
    """(index, training-data facts) of the model's fingerprint index, or (None, reason) without one."""
    from wyckoffgpt.fingerprints import FingerprintIndex
    from wyckoffgpt.generation import resolve_model_path

    try:
        index = FingerprintIndex.load(resolve_model_path(model))
    except (FileNotFoundError, ValueError) as exc:
        return None, {"unknown": str(exc).splitlines()[0]}
    return index, {"source": index.meta.get("source"), "dataset_seed": index.meta.get("dataset_seed"),
                   "split": index.meta.get("dataset_split", "not recorded"), "crystals": len(index)}


def seen_in_training(index, targets: list[tuple[str, Record]]) -> list[str | None]:
    """Per target, the material id of the training crystal it is (None: unseen; UNCHECKED without an
    index), by id or by structure."""
    if index is None:
        return [UNCHECKED] * len(targets)
    ids = set(index.material_ids.tolist())
    return [key if key in ids else index.find_match(parse_structure(rec)) for key, rec in targets]


def tally(rows: list[dict]) -> dict:
    targets = [t for r in rows for t in r["targets"]]
    unseen = [t for t in targets if t.get("seen_as") is None]
    checked = not any(t.get("seen_as") == UNCHECKED for t in targets)
    return {"systems": len(rows), "targets": len(targets), "recovered": sum(t["matched"] for t in targets),
            "seen_in_training": len(targets) - len(unseen) if checked else None,
            "unseen": len(unseen) if checked else None,
            "recovered_unseen": sum(t["matched"] for t in unseen) if checked else None,
            "recovered_by_drawn": sum(t.get("matched_by_drawn", t["matched"]) for t in targets),
            "valid_fraction": sum(r["valid"] for r in rows) / max(1, sum(r["n"] for r in rows)),
            "sample_seconds": sum(r["sample_seconds"] for r in rows),
            "match_seconds": sum(r["match_seconds"] for r in rows)}


def training_note(t: dict, training: dict) -> str:
    """What the model's training crystals say about these figures, in one line."""
    if "unknown" in training:
        return f"Not checked whether the targets were training crystals ({training['unknown']})."
    facts = f"trained on {training['crystals']} crystals of {training['source']}, split {training['split']}"
    if not t["seen_in_training"]:
        return f"None of the {t['targets']} targets is among the model's training crystals ({facts})."
    return (f"**{t['seen_in_training']} of the {t['targets']} targets are among the model's training crystals** "
            f"({facts}): recovery of those measures memorisation, not transfer to unseen systems. "
            f"On the {t['unseen']} unseen targets: {share(t['recovered_unseen'], t['unseen'])} recovered.")


def share(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "unchecked"
    return f"{a}/{b}" + (f" ({100 * a / b:.0f} %)" if b else "")


def print_table(rows: dict[str, list[dict]], budgets: dict[str, int]) -> None:
    large = {r["system"]: r for r in rows.get("large", [])}
    n, n_large = budgets["main"], budgets.get("large")
    head = f"| system | stable | seen in training | recovered, N = {n} | unseen recovered |"
    head += f" recovered, N = {n_large} |" if large else ""
    print(head + " valid | sampling s | matching s |")
    print("|---" * (head.count("|") + 2) + "|")
    for r in rows["main"]:
        t = tally([r])
        line = (f"| {r['system']} | {t['targets']} | {UNCHECKED if t['seen_in_training'] is None else t['seen_in_training']} | {share(t['recovered'], t['targets'])} "
                f"| {share(t['recovered_unseen'], t['unseen'])} |")
        if large:
            big = tally([large[r["system"]]]) if r["system"] in large else None
            line += f" {share(big['recovered'], big['targets']) if big else '-'} |"
        print(line + f" {r['valid']}/{r['n']} | {r['sample_seconds']:.0f} | {r['match_seconds']:.0f} |")
    for budget, size in budgets.items():
        t = tally(rows[budget])
        print(f"\nN = {size}, {t['systems']} systems: recovered {share(t['recovered'], t['targets'])} "
              f"(by drawn samples alone: {t['recovered_by_drawn']}); "
              f"seen in training {UNCHECKED if t['seen_in_training'] is None else t['seen_in_training']}; unseen recovered {share(t['recovered_unseen'], t['unseen'])}; "
              f"sampling {t['sample_seconds']:.0f} s, matching {t['match_seconds']:.0f} s (wall seconds, summed over the systems)")


def check_arguments(args: argparse.Namespace) -> str | None:
    """One line naming the first bad argument, or None."""
    for name in ("n", "n_large", "workers", "min_stable"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    for name in ("large_systems", "seed"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    if args.max_systems is not None and args.max_systems <= 0:
        return f"--max-systems must be positive, got {args.max_systems}"
    if not np.isfinite(args.stable_ehull) or args.stable_ehull < 0:
        return f"--stable-ehull must be a finite number >= 0 eV/atom, got {args.stable_ehull}"
    if not (args.data / "meta.json").is_file():
        return f"--data {args.data} is not a prepared dataset folder (no meta.json)"
    if not args.input.exists():
        return f"--input {args.input} does not exist"
    if args.out is not None and args.out.exists():
        return f"{args.out} exists; choose another --out"
    return None


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        print(f"recovery.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset prepared with --split system")
    p.add_argument("--split", choices=("test", "val"), default="test", help="held-out split of --data")
    p.add_argument("--input", type=Path, default=REPO / "data" / "mp_structures.csv.gz",
                   help="the structures --data was prepared from (with an e_above_hull column)")
    p.add_argument("--model", help="model folder or Hub id (default: the bundled model)")
    p.add_argument("--n", type=int, default=300, help="samples per system (default 300)")
    p.add_argument("--n-large", type=int, default=2000, help="samples per system of the larger budget (default 2000)")
    p.add_argument("--large-systems", type=int, default=0,
                   help="systems (the first of the run) sampled again with --n-large (default 0: none)")
    p.add_argument("--max-systems", type=int, help="at most this many systems, in a seeded order (default all)")
    p.add_argument("--min-stable", type=int, default=3, help="stable structures a system needs (default 3)")
    p.add_argument("--stable-ehull", type=float, default=0.1, help="stable: e_above_hull <= this, eV/atom (0.1)")
    p.add_argument("--seed", type=int, default=0, help="order of the systems; system i is sampled with seed + i")
    add_analogue_arguments(p)
    p.add_argument("--workers", type=int, default=2, help="processes, one system at a time each (default 2)")
    p.add_argument("--out", type=Path, help="write the report (with per-target rows) here; never overwritten")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    problem = check_arguments(args)
    try:
        sampling = None if problem else analogue_settings(args)
        rows = [] if problem else split_records(args.data, args.input, args.split)
    except InputError as exc:
        problem = str(exc)
    if problem is None and rows and all(rec.e_above_hull is None for _, _, rec in rows):
        problem = f"--input {args.input} has no e_above_hull values for the {args.split} structures"
    if problem:
        print(f"recovery.py: error: {problem}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    systems = target_systems(rows, args.stable_ehull, args.min_stable)
    names = [list(systems)[i] for i in np.random.default_rng(args.seed).permutation(len(systems))]
    names = names[:args.max_systems]
    index, training = training_lookup(args.model)
    if index is None and sampling["analogues"] and sampling["analogue_source"] == "known":
        # Checked here: in the workers it would surface as a pool traceback after the first system.
        print(f"recovery.py: error: --analogue-source known needs the model's training crystals: "
              f"{training['unknown']}", file=sys.stderr)
        return 2
    seen = {name: seen_in_training(index, systems[name]) for name in names}
    budgets = {"main": args.n} | ({"large": args.n_large} if args.large_systems else {})
    jobs = [("large", i, s, systems[s], args.n_large, args.seed, sampling)
            for i, s in enumerate(names[:args.large_systems])]
    jobs += [("main", i, s, systems[s], args.n, args.seed, sampling) for i, s in enumerate(names)]  # longest first
    results: dict[str, list[dict]] = {b: [] for b in budgets}
    for row in run_jobs(run_system, jobs, args.workers, args.model, ordered=False):
        for t, seen_as in zip(row["targets"], seen[row["system"]]):
            t["seen_as"] = seen_as
        results[row["budget"]].append(row)
        t = tally([row])
        print(f"{sum(map(len, results.values()))}/{len(jobs)} {row['system']} N={row['n']}: "
              f"recovered {t['recovered']}/{t['targets']}, seen in training {t['seen_in_training']}, "
              f"{row['sample_seconds']:.0f} s + {row['match_seconds']:.0f} s", file=sys.stderr, flush=True)
    for budget_rows in results.values():
        budget_rows.sort(key=lambda r: names.index(r["system"]))
    totals = {b: {"n": size, **tally(results[b])} for b, size in budgets.items()}
    for b in budgets:
        totals[b]["per_system"] = {r["system"]: {k: v for k, v in tally([r]).items() if k in PER_SYSTEM}
                                   for r in results[b]}
    report = {"benchmark": "recovery", "date": datetime.date.today().isoformat(), "command": shlex.join(sys.argv),
              "data": str(args.data), "split": args.split, "model": args.model or "bundled",
              "training_data": training, "qualifying_systems": len(systems), "systems_run": len(names),
              "min_stable": args.min_stable, "stable_ehull": args.stable_ehull, "temperature": TEMPERATURE,
              "sampling": sampling,
              "matcher": MATCHER_SETTINGS, "workers": args.workers, "wall_seconds": time.perf_counter() - t0,
              **{f"{b}": t for b, t in totals.items()}}
    print_table(results, budgets)
    print("\n" + training_note(totals["main"], training))
    emit(report, results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
