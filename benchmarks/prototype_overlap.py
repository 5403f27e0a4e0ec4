"""How many stable crystals of held-out chemical systems have a structure type seen in training?

    python benchmarks/prototype_overlap.py --data DIR [--split test] [--input data/mp_structures.csv.gz]
                                           [--stable-ehull 0.1] [--min-stable 3] [--nearest 1 2 4 6]
                                           [--substitutions 1 2]

--data: a dataset prepared with `data_prep/prepare.py --split system`. Targets as in recovery.py: the
structures within --stable-ehull eV/atom of the hull of each ternary system of --split with at least
--min-stable of them. A target's structure type is its space group and the multiset of Wyckoff
positions each element occupies, elements anonymous (the token sequence without values). Counted:
targets whose type occurs among the train split's crystals at all, and among those of the analogue
systems `SamplingConfig.analogues` K would sample (one element replaced by one of its K nearest in
Mendeleev number), for each K of --nearest. An upper bound of what drawing in analogue systems can
recover: same type is necessary for a match, not sufficient (free coordinates and cell must agree
too).

Then the same for the skeletons `analogue_source="known"` would force (`analogues.known_skeletons`:
space group and Wyckoff positions with their elements, the replacing elements put back), for each K
of --nearest and each number of elements replaced at once of --substitutions: the targets whose
skeleton is among them, and the skeletons per system. One JSON line last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout import split_records  # noqa: E402
from recovery import target_systems  # noqa: E402

from wyckoffgpt.analogues import known_skeletons, nearest_elements  # noqa: E402
from wyckoffgpt.data import SequenceDataset, load_meta  # noqa: E402
from wyckoffgpt.fingerprints import FingerprintIndex, build_fingerprint_index  # noqa: E402
from wyckoffgpt.grammar import Conditions  # noqa: E402
from wyckoffgpt.tokenizer import CrystalSequence, CrystalTokenizer  # noqa: E402
from wyckoffgpt.vocab import default_vocab  # noqa: E402

VOCAB = default_vocab()


def structure_type(ids) -> tuple[str, tuple[str, tuple[tuple[str, ...], ...]]]:
    """(chemical system, (space group token, sorted per-element sorted Wyckoff orbits))."""
    tokens = [VOCAB.tokens[i] for i in ids]
    n = int(tokens[2].split(":")[1])
    elements, group = tokens[3:3 + n], tokens[3 + n]
    sites: dict[str, list[str]] = defaultdict(list)
    for orbit, element in zip(tokens[4 + n:], tokens[5 + n:]):
        if element in elements and orbit in VOCAB.token_to_id and orbit.startswith("w"):
            sites[element].append(orbit)
    return "-".join(sorted(elements)), (group, tuple(sorted(tuple(sorted(s)) for s in sites.values())))


def skeleton(ids, values) -> tuple[int, tuple[tuple[str, str], ...]]:
    """(space group number, sorted (Wyckoff letter, element) of the sites): what a known skeleton fixes."""
    desc = CrystalTokenizer(VOCAB).parse(CrystalSequence.from_ids(ids.tolist(), values.tolist(), VOCAB))
    return desc.group.number, tuple(sorted((s.position.letter, s.element) for s in desc.sites))


def skeleton_coverage(data: Path, systems: dict, skeleton_of: dict, nearest: list[int], substitutions: list[int]) -> dict:
    """Per (K, S): targets whose skeleton `known_skeletons` lists, and the median skeletons per system."""
    with tempfile.TemporaryDirectory() as tmp:
        index = FingerprintIndex.load(build_fingerprint_index(data, Path(tmp) / "fingerprints.npz"), VOCAB)
    out = {}
    for k in nearest:
        for depth in substitutions:
            hits, sizes = 0, []
            for system, rows in systems.items():
                cond = Conditions("ehull:low", tuple(VOCAB.by_z(system.split("-"))))
                found = {(a.conditions.spacegroup, a.conditions.sites) for a in known_skeletons(cond, k, index, None, depth)}
                sizes.append(len(found))
                hits += sum(skeleton_of[key] in found for key, _ in rows)
            out[f"K={k},S={depth}"] = {"targets_with_skeleton": hits, "median_skeletons": float(np.median(sizes))}
            print(f"known skeletons, K = {k}, {depth} element(s) replaced at once: {hits} targets have theirs "
                  f"(median {np.median(sizes):g} skeletons per system)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--input", type=Path, default=REPO / "data" / "mp_structures.csv.gz")
    p.add_argument("--stable-ehull", type=float, default=0.1)
    p.add_argument("--min-stable", type=int, default=3)
    p.add_argument("--nearest", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--substitutions", type=int, nargs="+", default=[1, 2],
                   help="elements replaced at once for the known-skeleton count (SamplingConfig.analogue_substitutions)")
    args = p.parse_args(argv)
    if load_meta(args.data).get("split") != "system":
        print(f"prototype_overlap.py: error: {args.data} was not prepared with --split system", file=sys.stderr)
        return 2
    train = SequenceDataset(args.data, "train")
    types_by_system: dict[str, set] = defaultdict(set)
    for i in range(len(train)):
        system, kind = structure_type(train[i][0].tolist())
        types_by_system[system].add(kind)
    all_types = set().union(*types_by_system.values())
    known = sorted({e for s in types_by_system for e in s.split("-")})

    held = SequenceDataset(args.data, args.split)
    ids = load_meta(args.data)["material_ids"][args.split]
    kind_of = {ids[i]: structure_type(held[i][0].tolist())[1] for i in range(len(held))}
    skeleton_of = {ids[i]: skeleton(*held[i]) for i in range(len(held))}
    systems = target_systems(split_records(args.data, args.input, args.split), args.stable_ehull, args.min_stable)
    targets = [(s, kind_of[key]) for s, rows in systems.items() for key, _ in rows]
    report = {"benchmark": "prototype_overlap", "data": str(args.data), "split": args.split, "systems": len(systems),
              "targets": len(targets), "type_in_train": sum(kind in all_types for _, kind in targets), "analogues": {}}
    for k in args.nearest:
        hits = 0
        for system, kind in targets:
            elements = system.split("-")
            near = {"-".join(sorted([new if e == old else e for e in elements]))
                    for old in elements for new in nearest_elements(old, [c for c in known if c not in elements], k)}
            hits += any(kind in types_by_system.get(a, ()) for a in near)
        report["analogues"][k] = hits
        print(f"K = {k}: {hits}/{len(targets)} targets have their structure type in an analogue system's train crystals")
    print(f"{report['type_in_train']}/{len(targets)} targets of {len(systems)} systems have their structure type "
          f"somewhere in train")
    report["known_skeletons"] = skeleton_coverage(args.data, systems, skeleton_of, args.nearest, args.substitutions)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
