"""S.U.N. rate of a model: the share of samples that are Stable, Unique and Novel.

    python benchmarks/sun.py [--model DIR] [-n 200] [--temperature 1.0] [--conditions none low high]
                             [--seed 0] [--workers 2] [--out sun.json]

For each stability condition (`none`: unconditional, `low`/`high`: --ehull), n samples are drawn
(generator defaults: clash retries, ionic charge check), the valid ones relaxed with CHGNet and scored
against the training data's hull (wyckoffgpt.stability). A sample counts for S.U.N. at threshold t
when it relaxed, is connected, lies at most t eV/atom above the hull, matches no other such sample
(unique) and no training crystal (novel, the model's fingerprint index). Rates are of all n samples,
with a 95 % Wilson interval, at t = 0.1 (MatterGen), 0.08 (the CHGNet-based comparisons) and 0.0.
Also the funnel counts and the median e_above_hull of the relaxed, connected samples.
A markdown table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import metrics, stability  # noqa: E402
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex  # noqa: E402
from wyckoffgpt.generation import CrystalGenerator, resolve_model_path  # noqa: E402
from wyckoffgpt.sampling import SamplingConfig  # noqa: E402

THRESHOLDS = (0.1, 0.08, 0.0)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def sun_count(results: list[stability.StabilityResult], index: FingerprintIndex, threshold: float) -> int:
    stable = [r.structure for r in results
              if r.status == "relaxed" and r.e_above_hull is not None and r.e_above_hull <= threshold]
    unique = [s for s, u in zip(stable, metrics.unique_flags(stable)) if u]
    return sum(metrics.novel_flags(unique, index))


def run_condition(gen: CrystalGenerator, refs: stability.ElementalReferences, index: FingerprintIndex,
                  condition: str, args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    t0 = time.perf_counter()
    ehull = None if condition == "none" else condition
    samples = gen.generate(args.n, ehull=ehull, temperature=args.temperature, seed=args.seed)
    valid = [r for r in samples if r.valid]
    t1 = time.perf_counter()
    config = stability.RelaxConfig(fmax=args.fmax, max_steps=args.max_steps)
    with tqdm(total=len(valid), desc=f"relaxing ({condition})", file=sys.stderr) as bar:
        results = stability.assess([r.structure for r in valid], refs, config, args.workers, bar.update)
    t2 = time.perf_counter()
    ehulls = [r.e_above_hull for r in results if r.status == "relaxed" and r.e_above_hull is not None]
    out = {"condition": condition, "n": args.n,
           "funnel": stability.funnel(args.n, len(valid), results, index, config.stable_threshold),
           "status": {s: sum(r.status == s for r in results) for s in stability.STATUSES},
           "median_e_above_hull": float(np.median(ehulls)) if ehulls else None,
           "share_relaxed_below_0.1": float(np.mean(np.array(ehulls) <= 0.1)) if ehulls else None,
           "seconds_sampling": round(t1 - t0, 1), "seconds_relaxing": round(t2 - t1, 1),
           "seconds_per_structure_median": float(np.median([r.seconds for r in results])) if results else None}
    for t in THRESHOLDS:
        k = sun_count(results, index, t)
        lo, hi = wilson(k, args.n)
        out[f"sun_{t:g}"] = {"count": k, "rate": k / args.n, "ci95": [lo, hi]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    p.add_argument("--conditions", nargs="+", choices=["none", "low", "high"], default=["none", "low", "high"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fmax", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--data", type=Path, help="Materials Project CSV of the hull (default: data/mp_structures.csv.gz)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    index = FingerprintIndex.load(resolve_model_path(args.model) / INDEX_FILE)
    refs = stability.default_references(args.data, stability.RelaxConfig(fmax=args.fmax))
    report = {"benchmark": "sun", "date": time.strftime("%Y-%m-%d"), "model": str(resolve_model_path(args.model)),
              "temperature": args.temperature, "seed": args.seed, "fmax": args.fmax, "max_steps": args.max_steps,
              "chgnet": stability.chgnet_version(), "conditions": {}}
    for c in args.conditions:
        report["conditions"][c] = run_condition(gen, refs, index, c, args)
        if args.out:  # after each condition, so that a long run killed midway keeps what it measured
            args.out.write_text(json.dumps(report) + "\n")
    print("| condition | n | valid | relaxed | connected | <= 0.1 | unique | novel | median e_hull | "
          "S.U.N. 0.1 | S.U.N. 0.08 | S.U.N. 0.0 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c, r in report["conditions"].items():
        f = r["funnel"]
        sun = " | ".join(f"{100 * r[k]['rate']:.1f} % [{100 * r[k]['ci95'][0]:.1f}, {100 * r[k]['ci95'][1]:.1f}]"
                         for k in ("sun_0.1", "sun_0.08", "sun_0"))
        med = "" if r["median_e_above_hull"] is None else f"{r['median_e_above_hull']:.3f}"
        print(f"| {c} | {r['n']} | {f['valid']} | {f['relaxed']} | {f['connected']} | {f['stable']} | "
              f"{f['unique']} | {f.get('novel', '')} | {med} | {sun} |")
    line = json.dumps(report)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
