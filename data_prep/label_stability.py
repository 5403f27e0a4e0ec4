"""Model-labelled training rows: crystals of train systems the data has no label for, relaxed and
labelled `ehull:low|high` by the stability funnel.

    python data_prep/label_stability.py --data DIR --out DIR2 --log labels.jsonl
                                            [--source substitution|samples|log] [--model M] [--intermetallic]
                                            [--systems 150 | --targets Al-Ca-Ag ...] [--per-system 4] [--max-atoms 12]
                                            [--relax-steps 300] [--repeat 2] [--workers K] [--seed 0]

Why: 92 % of the data's rows are `ehull:low`, and the high ones are mostly other chemistries, so the
stability token learns which systems are stable, not which crystals of one system are. Here each of
`--systems` ternary systems of the dataset's train split (never a val or test system; with
`--intermetallic` only those of metals and metalloids), or each system named by `--targets` (train
ternaries chosen by hand, e.g. the analogues of a system the model misjudges), receives `--per-system`
crystals:
- `--source substitution`: structure types of other train ternaries, the source's elements replaced,
  in order of electronegativity, by the target's (cation for cation, anion for anion), the cell scaled
  by the atoms' volumes;
- `--source samples`: the model's own valid samples (`--model`, default the bundled one) in that
  system, half asked `ehull:low` and half `high`, so the token learns from the model's own mistakes.
Each is relaxed with CHGNet to convergence (fmax 0.1 eV/Å, at most `--relax-steps` FIRE steps),
scored against the data's hull like a generated sample and labelled with the dataset's own stability
threshold, so a system gets stable and unstable crystals side by side. Only converged, connected
relaxations are labelled (a relaxation cut off at the step cap would look less stable than it is); a
relaxed crystal equal to a training crystal is skipped, as the MP label is authoritative. Every skip
is counted by reason.

DIR2 is DIR with the relaxed, re-tokenized crystals appended to its train split, `--repeat` times
each; val and test are DIR's. In meta.json their material ids are `subst:<system>:<source id>` or
`sample:<system>:<class asked>:<seed>-<index>`, and `model_labelled` lists each labelling round's recipe
and counts (DIR may itself be labelled). Every finished relaxation is appended to the --log (JSONL),
so a killed run resumes; `--source log` relaxes nothing and adds every label of the --log whose
system is a train system of DIR. Needs the `relax` extra (CHGNet), except with `--source log`.
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

from pymatgen.core import Element, Structure  # noqa: E402

from wyckoffgpt import stability  # noqa: E402
from wyckoffgpt.atomic import atomic_write  # noqa: E402
from wyckoffgpt.data import SequenceDataset, load_meta, split_systems, write_dataset  # noqa: E402
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex  # noqa: E402
from wyckoffgpt.generation import resolve_model_path  # noqa: E402
from wyckoffgpt.structure_io import InputError  # noqa: E402
from wyckoffgpt.tokenizer import CrystalSequence, CrystalTokenizer, DecodeError, EncodeError  # noqa: E402


def by_electronegativity(elements: list[str]) -> list[str]:
    """Elements from most electropositive to most electronegative (ties by Z), the order in which a
    source's sites are given the target's elements."""
    def key(el: str) -> tuple[float, int]:
        x = Element(el).X
        return (x if math.isfinite(x) else 0.0, Element(el).Z)
    return sorted(elements, key=key)


def substitute(structure: Structure, target: list[str]) -> Structure:
    """`structure` with its elements replaced by `target`'s in electronegativity order, its cell scaled
    by the ratio of the atoms' volumes (atomic radii cubed), so CHGNet starts near a sane density."""
    source = by_electronegativity([el.symbol for el in structure.composition.elements])
    mapping = dict(zip(source, by_electronegativity(target)))
    out = structure.copy()
    out.replace_species(mapping)

    def atoms_volume(s: Structure) -> float:
        return sum(n * (Element(el.symbol).atomic_radius or 1.5) ** 3 for el, n in s.composition.items())

    out.scale_lattice(structure.volume * atoms_volume(out) / atoms_volume(structure))
    return out


def plan(data: Path, n_systems: int, per_system: int, max_atoms: int, seed: int,
         counts: Counter, intermetallic: bool = False,
         targets: list[str] | None = None) -> list[tuple[str, Structure]]:
    """(key, substituted structure) for `per_system` sources in each of `n_systems` train ternaries
    (or in each of `targets`)."""
    systems = split_systems(data, "train")
    tokenizer = CrystalTokenizer()
    dataset = SequenceDataset(data, "train")
    ids = load_meta(data)["material_ids"]["train"]
    rng = np.random.default_rng(seed)
    targets = pick_targets(systems, n_systems, rng, intermetallic, targets)
    sources = [i for i, s in enumerate(systems) if s.count("-") == 2]
    jobs = []
    for target in targets:
        taken = 0
        for i in rng.permutation(sources):
            if taken == per_system:
                break
            if systems[i] == target:
                continue
            token_ids, values = dataset[int(i)]
            try:
                structure = tokenizer.decode(CrystalSequence.from_ids(token_ids.numpy(), values.numpy()))
            except DecodeError:
                counts["undecodable source"] += 1
                continue
            if len(structure) > max_atoms:
                continue
            jobs.append((f"subst:{target}:{ids[int(i)]}", substitute(structure, target.split("-"))))
            taken += 1
    return jobs


def is_intermetallic(system: str) -> bool:
    """Every element a metal or metalloid (Al-Ca-Cu, not Sr-Ti-O)."""
    return all(Element(el).is_metal or Element(el).is_metalloid for el in system.split("-"))


def pick_targets(train_systems: list[str], n_systems: int, rng: np.random.Generator,
                 intermetallic: bool, targets: list[str] | None = None) -> list[str]:
    """`n_systems` ternaries of the train split's systems (never a val or test system), at random;
    or `targets`, each checked to be a train ternary (InputError naming the first that is not)."""
    if targets:
        return train_targets(train_systems, targets)
    ternaries = sorted({s for s in train_systems if s.count("-") == 2})
    if intermetallic:
        ternaries = [s for s in ternaries if is_intermetallic(s)]
    return [ternaries[i] for i in rng.permutation(len(ternaries))[:n_systems]]


def train_targets(train_systems: list[str], targets: list[str]) -> list[str]:
    """`targets` in the split's spelling (elements sorted), each once; InputError naming the first that
    is not a ternary of the train split (a held-out system would leak its labels into training)."""
    ternaries = {s for s in train_systems if s.count("-") == 2}
    named = ["-".join(sorted(t.split("-"))) for t in targets]
    for given, system in zip(targets, named):
        if system not in ternaries:
            raise InputError(f"--targets {given}: not a ternary system of the dataset's train split")
    return list(dict.fromkeys(named))


def plan_samples(data: Path, model: str | None, n_systems: int, per_system: int, max_atoms: int, seed: int,
                 counts: Counter, intermetallic: bool = False,
                 targets: list[str] | None = None) -> list[tuple[str, Structure]]:
    """(key, structure) for the model's own valid samples in `n_systems` train ternaries (or in each of
    `targets`), `per_system` each, half asked `ehull:low` and half `high`: labelling what the model
    itself draws under each class teaches the token the model's own mistakes within a system."""
    from wyckoffgpt.generation import CrystalGenerator

    generator = CrystalGenerator.from_pretrained(model)
    rng = np.random.default_rng(seed)
    jobs = []
    for t, target in enumerate(pick_targets(split_systems(data, "train"), n_systems, rng, intermetallic, targets)):
        for c, ehull in enumerate(("low", "high")):
            n = per_system // 2 + (per_system % 2 if c == 0 else 0)
            if n == 0:
                continue
            for r in generator.generate(n, target.split("-"), ehull, seed=seed * 100_003 + 2 * t + c,
                                        batch_size=n, guidance=1.0):
                if not r.valid:
                    counts["invalid sample"] += 1
                elif len(r.structure) > max_atoms:
                    counts["sample too large"] += 1
                else:
                    jobs.append((f"sample:{target}:{ehull}:{seed}-{r.index}", r.structure))
    return jobs


def relax_and_log(jobs: list[tuple[str, Structure]], log: Path, relax_steps: int, workers: int | None,
                  tokenizer: CrystalTokenizer, fingerprints: FingerprintIndex) -> None:
    config = stability.RelaxConfig(max_steps=relax_steps)
    refs = stability.default_references(config=config)
    t0 = time.perf_counter()
    with log.open("a") as f:
        # iter_assess labels only converged, connected relaxations ("relaxed"): the others keep their
        # status as the reason; a relaxed one without a finite formation energy is an "error".
        for done, (i, r) in enumerate(stability.iter_assess([s for _, s in jobs], refs, config, workers), 1):
            key = jobs[i][0]
            e_hull = r.e_above_hull
            reason = "" if e_hull is not None else r.status if r.status != "relaxed" else "error"
            sequence = None
            if e_hull is not None:
                try:
                    sequence = str(tokenizer.encode(r.structure, e_hull))
                except EncodeError:
                    reason = "not tokenizable"
                else:
                    if fingerprints.find_match(r.structure) is not None:
                        reason = "known (MP label kept)"
            record = {"key": key, "e_above_hull": e_hull, "skipped": reason or None, "steps": r.steps,
                      "seconds": round(r.seconds, 2), "sequence": None if reason else sequence}
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
    meta = load_meta(data)
    threshold = meta["stability_threshold"]
    splits = {}
    for name in meta["splits"]:
        ds = SequenceDataset(data, name)
        splits[name] = [(ids.numpy(), values.numpy()) for ids, values in (ds[i] for i in range(len(ds)))]
    labelled, ids_out, classes = [], [], Counter()
    for key, r in sorted(records.items()):
        if r["sequence"] is None:
            continue
        seq = CrystalSequence.from_string(r["sequence"])
        labelled.append((seq.ids, seq.values.astype(np.float32)))
        ids_out.append(key)
        classes["low" if r["e_above_hull"] < threshold else "high"] += 1
    splits["train"] = splits["train"] + labelled * repeat
    material_ids = dict(meta["material_ids"])
    material_ids["train"] = list(material_ids["train"]) + ids_out * repeat
    keep = {k: v for k, v in meta.items() if k not in ("format", "max_length", "splits")}
    summary = {**recipe, "repeat": repeat, "sequences": len(labelled), "classes": dict(classes),
               "stability_threshold": threshold}
    earlier = meta.get("model_labelled", [])  # DIR may itself be a labelled dataset
    rounds = ([earlier] if isinstance(earlier, dict) else list(earlier)) + [summary]
    write_dataset(out, splits, {**keep, "material_ids": material_ids, "model_labelled": rounds})
    return summary


def label_new(args: argparse.Namespace, threshold: float, fingerprints: FingerprintIndex,
              counts: Counter) -> dict[str, dict]:
    """Plan this run's crystals, relax and label those the --log does not hold yet; their records."""
    if args.source == "samples":
        jobs = plan_samples(args.data, args.model, args.systems, args.per_system, args.max_atoms, args.seed,
                            counts, args.intermetallic, args.targets)
    else:
        jobs = plan(args.data, args.systems, args.per_system, args.max_atoms, args.seed, counts, args.intermetallic,
                    args.targets)
    done = read_log(args.log)
    tokenizer = CrystalTokenizer(stability_threshold=threshold)
    relax_and_log([j for j in jobs if j[0] not in done], args.log, args.relax_steps, args.workers,
                  tokenizer, fingerprints)
    keys = {k for k, _ in jobs}  # a log of a larger run labels only this run's structures
    return {k: r for k, r in read_log(args.log).items() if k in keys}


def logged_train_records(data: Path, log: Path, counts: Counter) -> dict[str, dict]:
    """Every record of `log` whose system is a train system of `data` (keys `<source>:<system>:...`);
    the others are counted, never used: a label must not leak into a held-out system."""
    train = set(split_systems(data, "train"))
    records = read_log(log)
    outside = [k for k in records if k.split(":")[1] not in train]
    counts["not a train system of --data"] += len(outside)
    return {k: r for k, r in records.items() if k not in outside}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder (data_prep/prepare.py)")
    p.add_argument("--out", type=Path, required=True, help="new dataset folder")
    p.add_argument("--log", type=Path, required=True, help="JSONL of finished relaxations (resumed)")
    p.add_argument("--model", help="model folder that draws the samples (--source samples) and whose "
                                   "fingerprints.npz names the training crystals (default: the bundled model)")
    p.add_argument("--source", choices=("substitution", "samples", "log"), default="substitution",
                   help="what is labelled: substituted train crystals, the --model's own samples, or "
                        "nothing new (every labelled crystal of --log joins train)")
    p.add_argument("--intermetallic", action="store_true",
                   help="target only train ternaries of metals and metalloids")
    p.add_argument("--systems", type=int, default=150, help="train ternaries to label crystals in, at random")
    p.add_argument("--targets", nargs="+", metavar="SYSTEM",
                   help="label in these train ternaries instead (elements joined by '-', e.g. Ag-Al-Ca)")
    p.add_argument("--per-system", type=int, default=4, help="crystals per system: sources to substitute, "
                                                              "or samples (half low, half high)")
    p.add_argument("--max-atoms", type=int, default=12, help="largest cell relaxed, atoms (relaxation cost)")
    p.add_argument("--relax-steps", type=int, default=300, help="FIRE steps at most per relaxation")
    p.add_argument("--repeat", type=int, default=2, help="copies of each labelled sequence in train")
    p.add_argument("--workers", type=int, help="relaxation processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        if args.out.exists() and any(args.out.iterdir()):
            raise InputError(f"{args.out} exists and is not empty; choose a new folder")
        for name in ("systems", "per_system", "max_atoms", "relax_steps", "repeat"):
            if getattr(args, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        meta = load_meta(args.data)
        if "stability_threshold" not in meta:
            raise InputError(f"{args.data}/meta.json has no stability_threshold; rebuild it with prepare.py")
        if args.source == "log" and not args.log.is_file():
            raise InputError(f"--log {args.log} does not exist")
        if args.targets and args.source == "log":
            raise InputError("--targets chooses where new crystals are labelled; --source log labels none")
        if args.targets:  # checked before any model loads or relaxation starts
            args.targets = train_targets(split_systems(args.data, "train"), args.targets)
        if args.source != "log":  # only new labels need CHGNet and the training crystals' index
            stability.chgnet_version()
            fingerprints = FingerprintIndex.load(resolve_model_path(args.model) / INDEX_FILE)
    except (InputError, stability.RelaxUnavailable, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts: Counter = Counter()
    t0 = time.perf_counter()
    if args.source == "log":
        records = logged_train_records(args.data, args.log, counts)
        recipe = {"source": f"log {args.log.name}"}
    else:
        records = label_new(args, meta["stability_threshold"], fingerprints, counts)
        recipe = {"source": "element substitution" if args.source == "substitution" else "model samples",
                  "intermetallic": args.intermetallic, "systems": args.targets or args.systems,
                  "per_system": args.per_system,
                  "max_atoms": args.max_atoms, "relax_steps": args.relax_steps, "seed": args.seed,
                  "labeller": stability.chgnet_version()}
    counts.update(r["skipped"] or "labelled" for r in records.values())
    summary = write_labelled(args.data, args.out, records, args.repeat, recipe)
    report = {**summary, "counts": dict(counts), "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write(args.out / "report.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
