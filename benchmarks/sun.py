"""S.U.N. rate of a model: the share of samples that are Stable, Unique and Novel.

    python benchmarks/sun.py [--model DIR] [-n 200] [--temperature 1.0] [--conditions none low high]
                             [--seed 0 ...] [--workers 2] [--log sun.jsonl] [--out sun.json]

For each stability condition (`none`: unconditional, `low`/`high`: --ehull), n samples of any
chemistry are drawn (generator defaults: clash retries, ionic charge check), the valid ones relaxed
with CHGNet and scored against the training data's hull (benchmarks/screening.py says how; --log
makes a killed run resumable). A sample counts for S.U.N. at threshold t when it relaxed, is
connected, lies at most t eV/atom above the hull, matches no other such sample (unique) and no
training crystal (novel, the model's fingerprint index). Rates are of all n samples, with a 95 %
Wilson interval, at t = 0.1 (MatterGen), 0.08 (the CHGNet-based comparisons) and 0.0.
A markdown table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse

import screening


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    screening.add_arguments(p, 200, "samples per condition")
    p.add_argument("--conditions", nargs="+", choices=["none", "low", "high"], default=["none", "low", "high"])
    args = p.parse_args()
    conditions = [screening.Condition(c, ehull=None if c == "none" else c) for c in args.conditions]
    report = screening.run_from_args(args, "sun", conditions)
    print(screening.table(report))
    screening.emit(report, args.out)


if __name__ == "__main__":
    main()
