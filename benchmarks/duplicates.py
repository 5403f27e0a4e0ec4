"""Duplicates from canonical forms (wyckoffgpt.duplicates) against pairwise StructureMatcher
(wyckoffgpt.decode.find_duplicates_pairwise): agreement and time. The last line printed is one JSON object.

For each sample set (Al-Ca-Cu with ehull low, and unconditional; -n each, seed 0, bundled model or
--model), the valid structures go through both methods in the same order. Each method assigns
every structure to the earlier structure it matches, or to itself: a partition. A pair of
structures is "decided the same" when both partitions put it in one group or both keep it apart.
Reported per set:
  pair_agreement           over the pairs of the same reduced formula (the only pairs either method
                           ever compares; pairs of different formulas are kept apart by both)
  pair_agreement_all       over all pairs
  flag_agreement           per structure, the "duplicate" flag (matches an earlier one) is the same
  disagreements            the pairs decided differently, grouped by (space groups, which method
                           matched them)
  seconds_keyed, seconds_matcher, speedup
  novelty                  against the bundled model's training fingerprint index: novel fractions
                           from canonical forms (FingerprintIndex.find_match) and from pairwise
                           StructureMatcher (find_match_pairwise), how many samples they disagree
                           on, and their times

    python benchmarks/duplicates.py [-n 2000] [--model DIR] [--cache DIR]

--cache keeps the sampled structures (pickles) so a rerun skips sampling.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pickle
import platform
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

SETS = {"AlCaCu_low": {"elements": ["Al", "Ca", "Cu"], "ehull": "low"}, "unconditional": {}}


def sample_set(name: str, n: int, model: str | None, cache: Path | None) -> list:
    path = cache / f"{name}_{n}.pkl" if cache else None
    if path is not None and path.is_file():
        return pickle.loads(path.read_bytes())
    from wyckoffgpt.generation import CrystalGenerator

    gen = CrystalGenerator.from_pretrained(model, device="cpu")
    results = gen.generate(n, seed=0, check_unique=False, **SETS[name])
    out = [(r.structure, r.spacegroup) for r in results if r.valid]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(out))
    return out


def cached_matcher(structures: list, path: Path | None) -> tuple[list, float]:
    """StructureMatcher's answer and its time (kept with --cache: it is the slow half)."""
    from wyckoffgpt.decode import find_duplicates_pairwise as find_duplicates

    if path is not None and path.is_file():
        return pickle.loads(path.read_bytes())
    t0 = time.perf_counter()
    out = find_duplicates(structures), time.perf_counter() - t0
    if path is not None:
        path.write_bytes(pickle.dumps(out))
    return out


def novelty(structures: list, model: str | None) -> dict:
    from wyckoffgpt.fingerprints import FingerprintIndex
    from wyckoffgpt.generation import resolve_model_path

    index = FingerprintIndex.load(resolve_model_path(model))
    t0 = time.perf_counter()
    keyed = [index.find_match(s) is None for s in structures]
    t_keyed = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairwise = [index.find_match_pairwise(s) is None for s in structures]
    t_pairwise = time.perf_counter() - t0
    return {"novel_keyed": round(sum(keyed) / len(keyed), 4), "novel_matcher": round(sum(pairwise) / len(pairwise), 4),
            "disagreeing_samples": sum(a != b for a, b in zip(keyed, pairwise)),
            "seconds_keyed": round(t_keyed, 2), "seconds_matcher": round(t_pairwise, 2)}


def groups(matches: list) -> list[int]:
    """Group id of each structure: the structure it matched, or itself."""
    return [i if m is None else m for i, m in enumerate(matches)]


def compare(structures: list, keyed: list, matcher: list) -> dict:
    formulas = [s.composition.reduced_formula for s in structures]
    gk, gm = groups(keyed), groups(matcher)
    same_formula = agree = 0
    kinds: Counter = Counter()
    examples = []
    n = len(structures)
    for i in range(n):
        for j in range(i + 1, n):
            if formulas[i] != formulas[j]:
                continue
            same_formula += 1
            k, m = gk[i] == gk[j], gm[i] == gm[j]
            if k == m:
                agree += 1
                continue
            sgs = tuple(sorted({_sg(structures[i]), _sg(structures[j])}))
            kinds[(sgs, "keyed only" if k else "matcher only")] += 1
            if len(examples) < 10:
                examples.append({"pair": [i, j], "formula": formulas[i], "spacegroups": list(sgs),
                                 "matched_by": "keyed" if k else "matcher"})
    all_pairs = n * (n - 1) // 2
    flags = sum((a is None) == (b is None) for a, b in zip(keyed, matcher))
    return {
        "structures": n, "same_formula_pairs": same_formula,
        "pair_agreement": round(agree / same_formula, 5) if same_formula else None,
        "pair_agreement_all": round((all_pairs - (same_formula - agree)) / all_pairs, 6) if all_pairs else None,
        "flag_agreement": round(flags / n, 5) if n else None,
        "unique_keyed": sum(m is None for m in keyed), "unique_matcher": sum(m is None for m in matcher),
        "disagreeing_pairs": same_formula - agree,
        "disagreements": [{"spacegroups": list(sgs), "kind": kind, "pairs": c} for (sgs, kind), c in kinds.most_common(15)],
        "examples": examples,
    }


_SG_CACHE: dict[int, int | None] = {}


def _sg(structure) -> int | None:
    from wyckoffgpt.decode import detected_spacegroup

    key = id(structure)
    if key not in _SG_CACHE:
        _SG_CACHE[key] = detected_spacegroup(structure)
    return _SG_CACHE[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000, help="samples per set (default 2000)")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--cache", type=Path, help="folder to keep the sampled structures in")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    args = p.parse_args()

    from wyckoffgpt.duplicates import find_duplicates as keyed_duplicates

    report = {"benchmark": "duplicates", "date": datetime.date.today().isoformat(), "n": args.n,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "sets": {}}
    for name in args.sets:
        samples = sample_set(name, args.n, args.model, args.cache)
        structures = [s for s, _ in samples]
        t0 = time.perf_counter()
        keyed = keyed_duplicates(structures)
        t_keyed = time.perf_counter() - t0
        matcher, t_matcher = cached_matcher(structures, args.cache / f"{name}_{args.n}_matcher.pkl"
                                            if args.cache else None)
        row = compare(structures, keyed, matcher)
        row.update(seconds_keyed=round(t_keyed, 2), seconds_matcher=round(t_matcher, 2),
                   speedup=round(t_matcher / t_keyed, 1))
        row["novelty"] = novelty(structures, args.model)
        report["sets"][name] = row
        print(f"{name}: {row['structures']} valid, pair agreement {row['pair_agreement']} "
              f"({row['disagreeing_pairs']} of {row['same_formula_pairs']} same-formula pairs differ), "
              f"flags {row['flag_agreement']}, unique {row['unique_keyed']} vs {row['unique_matcher']}, "
              f"{t_keyed:.1f} s vs {t_matcher:.1f} s; novel {row['novelty']}", file=sys.stderr)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
