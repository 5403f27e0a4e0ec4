"""Calibration of the stability estimate (wyckoffgpt.stability) against Materials Project's own.

    python benchmarks/stability_calibration.py [--n 300] [--max-atoms 20] [--seed 0] [--workers 2]
                                               [--data data/mp_structures.csv.gz] [--out calibration.json]

Draws n structures from the data, stratified (stable e_above_hull <= 0.1 / unstable; oxide /
intermetallic / other; binary / ternary / quaternary: equal shares of the 18 cells where the data
allow), relaxes and scores each exactly as a generated candidate is (wyckoffgpt.stability.relax),
against the hull built WITHOUT its own row, with and without MaterialsProject2020Compatibility
corrections. Reports the MAE of the estimated against MP's e_above_hull, and precision, recall and
F1 of "stable" (<= 0.1 eV/atom), over the structures that relaxed and are connected (failures are
counted). A markdown table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import stability as st  # noqa: E402

STABLE = 0.1
METALS_EXCLUDED = {"H", "He", "B", "C", "N", "O", "F", "Ne", "Si", "P", "S", "Cl", "Ar", "Ge", "As", "Se", "Br",
                   "Kr", "Sb", "Te", "I", "Xe"}


def chemistry(elements: list[str]) -> str:
    if "O" in elements:
        return "oxide"
    if not METALS_EXCLUDED & set(elements):
        return "intermetallic"
    return "other"


def draw(data: Path, n: int, max_atoms: int, seed: int):
    import pandas as pd
    from pymatgen.core import Composition

    df = pd.read_csv(data, dtype={"material_id": str})
    comps = df.formula.map(Composition)
    df["nel"] = comps.map(lambda c: len(c.elements))
    df["natoms"] = comps.map(lambda c: int(c.num_atoms))
    df["chem"] = comps.map(lambda c: chemistry([e.symbol for e in c.elements]))
    df["stable"] = df.e_above_hull <= STABLE
    df = df[(df.natoms <= max_atoms) & df.nel.between(2, 4)]
    rng = np.random.default_rng(seed)
    cells = list(df.groupby(["stable", "chem", "nel"]))
    per_cell = int(np.ceil(n / len(cells)))
    picked = []
    for _, cell in cells:
        picked.append(cell.iloc[rng.permutation(len(cell))[:per_cell]])
    out = pd.concat(picked)
    return out.iloc[rng.permutation(len(out))[:n]], len(cells)


def metrics(est: np.ndarray, true: np.ndarray) -> dict:
    pred, real = est <= STABLE, true <= STABLE
    tp, fp, fn = int((pred & real).sum()), int((pred & ~real).sum()), int((~pred & real).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    err = est - true
    return {"n": int(len(est)), "mae": float(np.mean(np.abs(err))), "median_ae": float(np.median(np.abs(err))),
            "mean_error": float(np.mean(err)), "precision": precision, "recall": recall, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn}


def load_done(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    return {d["material_id"]: d for d in map(json.loads, path.read_text().splitlines()) if d}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "data" / "mp_structures.csv.gz")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--max-atoms", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fmax", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--results", type=Path,
                   help="JSONL of per-structure results, appended as each finishes; rows already there are "
                        "not relaxed again (resume), and --report-only reports on them")
    p.add_argument("--report-only", action="store_true", help="no relaxation: report on --results as they are")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from pymatgen.core import Structure
    from tqdm import tqdm

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    rows, n_cells = draw(args.data, args.n, args.max_atoms, args.seed)
    hull = st.DataHull.from_csv(args.data)
    config = st.RelaxConfig(fmax=args.fmax, max_steps=args.max_steps)
    refs = st.ElementalReferences(hull, args.data, config)
    index = {mid: i for i, mid in enumerate(hull.ids)}
    done = load_done(args.results)
    todo = rows[~rows.material_id.isin(list(done))]
    t_ref = t_relax = 0.0
    if not args.report_only and len(todo):
        structures = [Structure.from_str(c, fmt="cif") for c in todo.cif]
        t_ref = time.perf_counter()
        refs.compute({el.symbol for s in structures for el in s.composition.elements})
        t_ref = time.perf_counter() - t_ref
        t_relax = time.perf_counter()
        sink = args.results.open("a") if args.results else None
        with tqdm(total=len(structures), desc="relaxing", file=sys.stderr) as bar:
            for i, r in st.iter_relax(structures, config, args.workers):
                row = todo.iloc[i]
                d = {"material_id": row.material_id, "formula": row.formula, "chem": row.chem, "nel": int(row.nel),
                     "natoms": int(row.natoms), "mp_e_above_hull": float(row.e_above_hull), "status": r.status,
                     "steps": r.steps, "seconds": r.seconds, "rmsd": r.rmsd, "energy_per_atom": r.energy_per_atom,
                     "error": r.error}
                if r.status == "relaxed":
                    for corr in (True, False):
                        e_form = refs.formation_energy_per_atom(r.structure, r.energy_per_atom, corr)
                        name = "mp2020" if corr else "raw"
                        d[f"e_form_{name}"] = e_form
                        for strict in (False, True):
                            d[f"ehull_{name}{'_strict' if strict else ''}"] = hull.e_above_hull(
                                r.structure.composition, e_form, exclude=[index[row.material_id]], strict=strict)
                done[row.material_id] = d
                if sink:
                    sink.write(json.dumps(d) + "\n")
                    sink.flush()
                bar.update(1)
        if sink:
            sink.close()
        t_relax = time.perf_counter() - t_relax
    results = [done[m] for m in rows.material_id if m in done]
    ok = [d for d in results if d["status"] == "relaxed"]
    true_a = np.array([d["mp_e_above_hull"] for d in ok])
    report = {"benchmark": "stability_calibration", "date": time.strftime("%Y-%m-%d"), "n_drawn": len(rows),
              "n": len(results), "strata": n_cells, "max_atoms": args.max_atoms, "seed": args.seed,
              "fmax": args.fmax, "max_steps": args.max_steps, "chgnet": st.chgnet_version(),
              "status": {s: sum(d["status"] == s for d in results) for s in st.STATUSES},
              "seconds_per_structure_median": float(np.median([d["seconds"] for d in results])),
              "steps_median": float(np.median([d["steps"] for d in results])),
              "rmsd_median_A": float(np.nanmedian([d["rmsd"] if d["rmsd"] is not None else np.nan for d in results])),
              "wall_relax_s": round(t_relax, 1), "wall_references_s": round(t_ref, 1),
              "wall_total_s": round(time.perf_counter() - t0, 1), "workers": args.workers,
              "mp_stable_share": float(np.mean(true_a <= STABLE))}
    variants = [f"{e}{x}" for e in ("raw", "mp2020") for x in ("", "_strict")]
    for name in variants:
        e = np.array([d[f"ehull_{name}"] for d in ok])
        report[name] = metrics(e, true_a)
        # Like for like: MP's own formation energy against the same hull (without the row); what
        # is left is CHGNet's formation-energy error, not the missing row.
        same = np.array([hull.e_above_hull(d["formula"], float(hull.e_form[index[d["material_id"]]]),
                                           exclude=[index[d["material_id"]]], strict="strict" in name) for d in ok])
        report[name]["mae_vs_mp_on_same_hull"] = float(np.mean(np.abs(e - same)))
        report[name]["mp_on_same_hull_stable_share"] = float(np.mean(same <= STABLE))
        report[name]["by_chemistry"] = {c: metrics(e[m], true_a[m]) for c in ("oxide", "intermetallic", "other")
                                        if (m := np.array([d["chem"] == c for d in ok])).any()}
        report[name]["by_n_elements"] = {str(k): metrics(e[m], true_a[m]) for k in (2, 3, 4)
                                         if (m := np.array([d["nel"] == k for d in ok])).any()}
    report["references"] = {el: v["source"] for el, v in refs.values.items()}
    print("| energies | own hull point | n | MAE (eV/atom) | median AE | mean error | precision | recall | F1 | "
          "MAE vs MP on the same hull |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in variants:
        m = report[name]
        print(f"| {name.split('_')[0]} | {'dropped' if 'strict' in name else 'kept when unstable'} | {m['n']} | "
              f"{m['mae']:.3f} | {m['median_ae']:.3f} | {m['mean_error']:+.3f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['mae_vs_mp_on_same_hull']:.3f} |")
    for name in variants:
        for group in ("by_chemistry", "by_n_elements"):
            print(name, group, {k: (v["n"], round(v["mae"], 3)) for k, v in report[name][group].items()})
    line = json.dumps(report)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
