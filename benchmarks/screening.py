"""Screening of generated samples per condition, shared by benchmarks/sun.py and benchmarks/conditioning.py.

For each condition (a chemical system or none, a stability class or none), n samples are drawn with
the generator's defaults; the valid ones are relaxed with CHGNet and scored against the training
data's hull (wyckoffgpt.stability). The relaxations run interleaved across conditions (sample 0 of
every condition, then sample 1, ...) and every finished one is appended to a JSONL log, so that a
run killed midway resumes where it stopped and, if never finished, still compares the conditions
on the same number of samples: the report covers the first k samples of every condition, k the
largest count for which all of them are done.

Per condition: the funnel counts, the median e_above_hull of the relaxed and connected samples, the
share of those within 0.1 eV/atom, and the S.U.N. rate (stable, unique among the stable ones, novel
against the model's training crystals; a share of all k samples) at 0.1 eV/atom (MatterGen), 0.08
(the CHGNet-based comparisons) and 0.0, each with a 95 % Wilson interval.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import stability  # noqa: E402
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex  # noqa: E402
from wyckoffgpt.generation import CrystalGenerator, GeneratedCrystal, resolve_model_path  # noqa: E402
from wyckoffgpt.metrics import wilson_interval  # noqa: E402
from wyckoffgpt.sampling import SamplingConfig  # noqa: E402

THRESHOLDS = (0.1, 0.08, 0.0)


@dataclass(frozen=True)
class Condition:
    """What one arm of the comparison asks the generator for."""

    name: str
    elements: tuple[str, ...] | None = None
    ehull: str | None = None
    guidance: float | None = None
    guidance_contrast: str | None = None  # None: SamplingConfig's default


# Samples are drawn in batches of BLOCK (each batch its own random stream), so that sample i does not
# depend on n: a larger -n extends a finished --log instead of redrawing it (relaxing is the costly
# part). Logs of runs with n <= BLOCK, made before this, stay valid.
BLOCK = 12


def draw(gen: CrystalGenerator, conditions: Sequence[Condition], n: int, temperature: float,
         seed: int | Sequence[int]) -> dict[str, list[GeneratedCrystal]]:
    """n seeded samples per condition and seed (the same seeds for every condition, so a rerun redraws
    them); the first k of a seed are the same for every n >= k. Several seeds are independent draws
    pooled: seed j's samples are indices j*n to (j+1)*n - 1 of each condition."""
    seeds = [seed] if isinstance(seed, int) else list(seed)
    whole_blocks = -(-n // BLOCK) * BLOCK  # a batch's draws depend on its size: only whole ones repeat
    out = {}
    for c in conditions:
        extra = {} if c.guidance is None else {"guidance": c.guidance}
        extra |= {} if c.guidance_contrast is None else {"guidance_contrast": c.guidance_contrast}
        out[c.name] = [sample for s in seeds
                       for sample in gen.generate(whole_blocks, elements=list(c.elements) if c.elements else None,
                                                  ehull=c.ehull, temperature=temperature, seed=s,
                                                  batch_size=BLOCK, **extra)[:n]]
    return out


def _formula(sample: GeneratedCrystal) -> str:
    return sample.structure.composition.reduced_formula if sample.structure is not None else ""


def read_log(path: Path | None) -> dict[tuple[str, int], dict]:
    if path is None or not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            records[(d["condition"], d["index"])] = d
    return records


def relax_interleaved(samples: dict[str, list[GeneratedCrystal]], refs: stability.ElementalReferences,
                      config: stability.RelaxConfig, workers: int, log: Path | None,
                      progress=None) -> dict[tuple[str, int], dict]:
    """Relax and score every valid sample not yet in `log`, interleaved across conditions; returns
    all records, (condition, index) -> record with the StabilityResult's fields and the formula."""
    records = read_log(log)
    for (name, i), d in records.items():
        if name in samples and i < len(samples[name]) and d["formula"] != _formula(samples[name][i]):
            raise SystemExit(f"{log}: sample {i} of {name} was {d['formula']}, now {_formula(samples[name][i])}: "
                             "the log is from another draw (model, seed or temperature); use a new --log")
    n = max(len(v) for v in samples.values())
    todo = [(name, i) for i in range(n) for name, v in samples.items()
            if i < len(v) and v[i].valid and (name, i) not in records]
    if progress is not None:
        progress.reset(total=len(todo))
    if not todo:
        return records
    sink = log.open("a") if log else None
    try:
        structures = [samples[name][i].structure for name, i in todo]
        for pos, result in stability.iter_assess(structures, refs, config, workers):
            name, i = todo[pos]
            d = {"condition": name, "index": i, "formula": _formula(samples[name][i]), **result.to_dict()}
            records[(name, i)] = d
            if sink:
                sink.write(json.dumps(d) + "\n")
                sink.flush()
            if progress is not None:
                progress.update(1)
    finally:
        if sink:
            sink.close()
    return records


def complete_prefix(samples: dict[str, list[GeneratedCrystal]], records: dict[tuple[str, int], dict]) -> int:
    """The largest k such that the first k samples of every condition are relaxed (or invalid)."""
    k = min(len(v) for v in samples.values())
    for name, v in samples.items():
        for i, s in enumerate(v[:k]):
            if s.valid and (name, i) not in records:
                k = i
                break
    return k


def summarise(name: str, samples: list[GeneratedCrystal], records: dict[tuple[str, int], dict], k: int,
              index: FingerprintIndex | None, stable_threshold: float = 0.1) -> dict:
    """The figures of one condition over its first k samples."""
    valid = [i for i, s in enumerate(samples[:k]) if s.valid]
    results = [stability.StabilityResult.from_dict(records[(name, i)]) for i in valid]
    scored = [r.e_above_hull for r in results if r.relaxed and r.connected and r.e_above_hull is not None]
    within = int(np.sum(np.array(scored) <= stable_threshold)) if scored else 0
    out = {"condition": name, "n": k,
           "funnel": stability.funnel(k, len(valid), results, index, stable_threshold),
           "status": {s: sum(r.status == s for r in results) for s in stability.STATUSES},
           "median_e_above_hull": float(np.median(scored)) if scored else None,
           "scored": len(scored),
           "within_0.1_of_scored": within / len(scored) if scored else None,
           "within_0.1_of_scored_ci95": list(wilson_interval(within, len(scored))),
           "seconds_per_structure_median": float(np.median([r.seconds for r in results])) if results else None}
    for t in THRESHOLDS:
        count = stability.funnel(k, len(valid), results, index, t).get("novel", 0)
        out[f"sun_{t:g}"] = {"count": count, "rate": count / k if k else None,
                             "ci95": list(wilson_interval(count, k))}
    return out


def run(gen: CrystalGenerator, conditions: Sequence[Condition], n: int, temperature: float, seed: int | Sequence[int],
        refs: stability.ElementalReferences, config: stability.RelaxConfig, workers: int, log: Path | None,
        index: FingerprintIndex | None, report_only: bool = False) -> dict:
    """Draw, relax (resumably) and summarise every condition: {"k": ..., "conditions": {name: figures}}.
    `report_only`: relax nothing, summarise what `log` holds (a run stopped on purpose)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    samples = draw(gen, conditions, n, temperature, seed)
    t1 = time.perf_counter()
    if report_only:
        records = read_log(log)
    else:
        with tqdm(desc="relaxing", file=sys.stderr) as bar:
            records = relax_interleaved(samples, refs, config, workers, log, bar)
    t2 = time.perf_counter()
    k = complete_prefix(samples, records)
    return {"k": k, "seconds_sampling": round(t1 - t0, 1), "seconds_relaxing_this_run": round(t2 - t1, 1),
            "conditions": {c.name: summarise(c.name, samples[c.name], records, k, index, config.stable_threshold)
                           for c in conditions}}


def pct(rate: float | None, ci: Sequence[float] | None = None) -> str:
    if rate is None:
        return ""
    if ci is None:
        return f"{100 * rate:.1f} %"
    return f"{100 * rate:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def table(report: dict) -> str:
    """Markdown table of a `run` report, one row per condition."""
    lines = ["| condition | n | valid | relaxed | connected | <= 0.1 | unique | novel | median e_hull (eV/atom) | "
             "within 0.1 of scored | S.U.N. 0.1 | S.U.N. 0.08 | S.U.N. 0.0 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["conditions"].items():
        f = r["funnel"]
        med = "" if r["median_e_above_hull"] is None else f"{r['median_e_above_hull']:.3f}"
        sun = " | ".join(pct(r[k]["rate"], r[k]["ci95"]) for k in ("sun_0.1", "sun_0.08", "sun_0"))
        lines.append(f"| {name} | {r['n']} | {f['valid']} | {f['relaxed']} | {f['connected']} | {f['stable']} | "
                     f"{f['unique']} | {f.get('novel', '')} | {med} | "
                     f"{pct(r['within_0.1_of_scored'], r['within_0.1_of_scored_ci95'])} | {sun} |")
    return "\n".join(lines)


# -- the command line of sun.py and conditioning.py -------------------------------------------------

def add_arguments(p: argparse.ArgumentParser, n: int, n_help: str) -> None:
    """The flags every screening benchmark has."""
    p.add_argument("--model", help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("-n", type=int, default=n, help=n_help)
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="sampling seed; several: independent draws of -n each, pooled (one --log holds them all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fmax", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--data", type=Path, help="Materials Project CSV of the hull (default: data/mp_structures.csv.gz)")
    p.add_argument("--log", type=Path, help="JSONL of finished relaxations; a rerun with the same settings resumes")
    p.add_argument("--report-only", action="store_true", help="relax nothing: report on what --log holds")
    p.add_argument("--out", type=Path)


def run_from_args(args: argparse.Namespace, benchmark: str, conditions: Sequence[Condition],
                  **settings: object) -> dict:
    """Load the model, its training crystals and the hull, run the conditions, and return the report
    with the run's settings (`settings`: the benchmark's own, recorded as given)."""
    warnings.simplefilter("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    index = FingerprintIndex.load(resolve_model_path(args.model) / INDEX_FILE)
    config = stability.RelaxConfig(fmax=args.fmax, max_steps=args.max_steps)
    refs = stability.default_references(args.data, config)
    report = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "model": str(resolve_model_path(args.model)),
              **settings, "n_asked": args.n, "temperature": args.temperature,
              "seed": args.seed[0] if len(args.seed) == 1 else args.seed, "fmax": args.fmax,
              "max_steps": args.max_steps, "workers": args.workers, "chgnet": stability.chgnet_version(),
              **run(gen, conditions, args.n, args.temperature, args.seed, refs, config, args.workers, args.log,
                    index, args.report_only)}
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def emit(report: dict, out: Path | None) -> None:
    """The report as one JSON line, last on stdout as every benchmark's, and in `out`."""
    line = json.dumps(report)
    if out:
        out.write_text(line + "\n")
    print(line)
