"""S.U.N. rate of a model: the share of samples that are Stable, Unique and Novel.

    python benchmarks/sun.py [--model DIR] [-n 200] [--temperature 1.0] [--conditions none low high]
                             [--seed 0] [--workers 2] [--log sun.jsonl] [--out sun.json]

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
import json
import time
import warnings
from pathlib import Path

import screening

from wyckoffgpt import stability
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex
from wyckoffgpt.generation import CrystalGenerator, resolve_model_path
from wyckoffgpt.sampling import SamplingConfig


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
    p.add_argument("--log", type=Path, help="JSONL of finished relaxations; a rerun with the same settings resumes")
    p.add_argument("--report-only", action="store_true", help="relax nothing: report on what --log holds")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    index = FingerprintIndex.load(resolve_model_path(args.model) / INDEX_FILE)
    config = stability.RelaxConfig(fmax=args.fmax, max_steps=args.max_steps)
    refs = stability.default_references(args.data, config)
    conditions = [screening.Condition(c, ehull=None if c == "none" else c) for c in args.conditions]
    report = {"benchmark": "sun", "date": time.strftime("%Y-%m-%d"), "model": str(resolve_model_path(args.model)),
              "n_asked": args.n, "temperature": args.temperature, "seed": args.seed, "fmax": args.fmax,
              "max_steps": args.max_steps, "workers": args.workers, "chgnet": stability.chgnet_version(),
              **screening.run(gen, conditions, args.n, args.temperature, args.seed, refs, config, args.workers,
                              args.log, index, args.report_only),
              "wall_s": 0.0}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(screening.table(report))
    line = json.dumps(report)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
