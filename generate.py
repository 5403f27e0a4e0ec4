"""Generate crystal structures with a trained WyckoffGPT model.

    python generate.py --elements Al Ca Cu --ehull low [-n 100] [--spacegroup 225] [--model DIR]

Writes one file per valid structure (decoded, no atoms closer than the distance threshold, composition
passing the charge check) to --out, plus summary.csv with every sample and its flags, and prints a
short summary.
Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

FORMATS = {"cif": ".cif", "extxyz": ".extxyz", "json": ".json"}
CSV_FIELDS = ["index", "file", "formula", "reduced_formula", "requested_spacegroup", "detected_spacegroup",
              "num_sites", "density", "min_distance", "charge_balanced", "flags", "retries", "temperature", "sequence"]


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        raise UsageError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder or Hub repo id (default: the bundled model)")
    p.add_argument("--elements", nargs="+", metavar="EL", help="exactly this chemical system, e.g. Al Ca Cu")
    p.add_argument("--ehull", choices=["low", "high"], help="stability class (default: sampled)")
    p.add_argument("--spacegroup", type=int, metavar="N", help="space group number 1-230 (default: sampled)")
    p.add_argument("-n", "--num-samples", type=int, default=100, dest="n")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, dest="top_p", help="nucleus sampling of tokens (default: off)")
    p.add_argument("--batch-size", type=int, default=256, dest="batch_size")
    p.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--min-distance", type=float, default=0.7, dest="min_distance",
                   help="minimum interatomic distance in Å (default 0.7)")
    p.add_argument("--max-retries", type=int, dest="max_retries",
                   help="how often a sample whose atoms clash goes back to the site where the clash begins "
                        "and is sampled again from there (default: the library's MAX_RETRIES, 4; 0: raw "
                        "model samples); also a sample whose composition fails --charge-check, back to the "
                        "start after the given conditions")
    p.add_argument("--charge-check", choices=["ionic", "smact", "off"], default="ionic", dest="charge_check",
                   help="compositions resampled (within --max-retries) and left out when they fail it: 'ionic' "
                        "(default): oxides, nitrides, chalcogenides and halides need a charge-neutral set of "
                        "oxidation states, intermetallics are left as drawn; 'smact': every composition must "
                        "pass SMACT; 'off': none (the 'charge_balanced' column always says which pass SMACT)")
    p.add_argument("--out", type=Path, help="output folder (default: a new folder named after the run)")
    p.add_argument("--format", choices=list(FORMATS), default="cif")
    p.add_argument("--relax", action="store_true",
                   help="relax the written structures with CHGNet (pip install \"wyckoffgpt[relax]\"), CIFs in "
                        "OUT/relaxed/, energy above the training data's hull in summary.csv (sorted by it)")
    p.add_argument("--fmax", type=float, default=0.1, help="--relax force threshold, eV/Å (default 0.1)")
    p.add_argument("--relax-steps", type=int, default=300, dest="relax_steps",
                   help="--relax: FIRE steps before a relaxation counts as not converged (default 300)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model, done before the (slow) model load."""
    if args.n <= 0:
        raise UsageError(f"-n must be positive, got {args.n}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.min_distance >= 0:
        raise UsageError(f"--min-distance must be >= 0, got {args.min_distance}")
    if args.max_retries is not None and args.max_retries < 0:
        raise UsageError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.spacegroup is not None and not 1 <= args.spacegroup <= 230:
        raise UsageError(f"--spacegroup must be in 1-230, got {args.spacegroup}")
    if args.relax:
        check_relax_args(args)
    if args.device is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:0, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")


def check_relax_args(args: argparse.Namespace) -> None:
    from wyckoffgpt.stability import RelaxConfig, RelaxUnavailable, chgnet_version, default_data_csv

    if not args.fmax > 0:
        raise UsageError(f"--fmax must be > 0 eV/Å, got {args.fmax}")
    if args.relax_steps < 1:
        raise UsageError(f"--relax-steps must be >= 1, got {args.relax_steps}")
    try:
        chgnet_version()
        args.relax_config = RelaxConfig(fmax=args.fmax, max_steps=args.relax_steps)
        default_data_csv()
    except RelaxUnavailable as e:
        raise UsageError(str(e)) from None
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--relax: {e}") from None


def default_out(args: argparse.Namespace) -> Path:
    system = "-".join(args.elements) if args.elements else "any"
    parts = [system] + ([f"sg{args.spacegroup}"] if args.spacegroup else []) + \
        ([f"ehull-{args.ehull}"] if args.ehull else []) + [time.strftime("%Y%m%d-%H%M%S")]
    out = Path("generated_" + "_".join(parts))
    k = 1
    while out.exists():
        out = out.with_name(f"{out.name.rsplit('.', 1)[0]}.{k}")
        k += 1
    return out


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None


def structure_text(structure, fmt: str) -> str:
    if fmt == "cif":
        from pymatgen.io.cif import CifWriter

        return str(CifWriter(structure))
    if fmt == "json":
        return json.dumps(structure.as_dict())
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buf = io.StringIO()
    write(buf, AseAtomsAdaptor.get_atoms(structure), format="extxyz")
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = args.out or default_out(args)
    created = not out.exists()
    prepare_out(out)
    try:
        return generate(args, out)
    except UsageError:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no empty folder behind for a run that never started
        raise


def generate(args: argparse.Namespace, out: Path) -> int:

    import transformers
    from tqdm import tqdm

    from wyckoffgpt.atomic import atomic_write
    from wyckoffgpt.generation import CrystalGenerator, InputError

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        gen = CrystalGenerator.from_pretrained(args.model, device=args.device)
        gen.conditions(args.elements, args.ehull, args.spacegroup)  # fail before any sampling
    except InputError as e:
        raise UsageError(str(e)) from None

    t0 = time.perf_counter()
    with tqdm(total=args.n, unit="seq", file=sys.stderr, disable=None, desc="sampling") as bar:
        results = gen.generate(args.n, elements=args.elements, ehull=args.ehull, spacegroup=args.spacegroup,
                               temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                               top_p=args.top_p, min_distance=args.min_distance, on_finished=bar.update,
                               charge_check=args.charge_check,
                               **({} if args.max_retries is None else {"max_retries": args.max_retries}))
    rows = []
    for r in results:
        s, name = r.structure, ""
        if r.valid:
            name = f"{r.index:05d}_{s.composition.reduced_formula}_sg{r.spacegroup}{FORMATS[args.format]}"
            atomic_write(out / name, structure_text(s, args.format))
        rows.append({
            "index": r.index, "file": name,
            "formula": s.formula.replace(" ", "") if s is not None else "",
            "reduced_formula": s.composition.reduced_formula if s is not None else "",
            "requested_spacegroup": r.spacegroup if r.spacegroup is not None else "",
            "detected_spacegroup": r.detected_spacegroup if r.detected_spacegroup is not None else "",
            "num_sites": len(s) if s is not None else "",
            "density": f"{s.density:.4f}" if s is not None else "",
            "min_distance": f"{r.min_distance:.4f}" if r.min_distance is not None else "",
            "charge_balanced": "" if r.charge_balanced is None else str(r.charge_balanced).lower(),
            "flags": "|".join(r.flags) + (f": {r.error}" if r.error else ""),
            "retries": r.retries,
            "temperature": r.temperature, "sequence": str(r.sequence),
        })
    fields, funnel = CSV_FIELDS, None
    if args.relax:
        from wyckoffgpt.stability import SUMMARY_FIELDS

        rows, funnel = relax_written(args, results, rows, out)
        fields = CSV_FIELDS + SUMMARY_FIELDS
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "summary.csv", buf.getvalue())
    elapsed = time.perf_counter() - t0

    decoded = [r for r in results if r.structure is not None]
    valid = [r for r in decoded if r.valid]
    placed = [r for r in decoded if r.distance_valid]
    consistent = [r for r in valid if "spacegroup_mismatch" not in r.flags]
    unique = [r for r in valid if "duplicate" not in r.flags]
    balanced = [r for r in placed if r.charge_balanced]
    print(f"seed {gen.last_seed}, T={args.temperature}, {elapsed:.1f} s")
    print(f"sampled {len(results)}, decoded {len(decoded)}, passed distance filter (>= {args.min_distance} Å) "
          f"{len(placed)}, of these charge-balanced (SMACT) {len(balanced)}")
    unbalanced = [r for r in placed if "not_charge_balanced" in r.flags]
    if unbalanced:
        print(f"{len(unbalanced)} failed the charge check ({args.charge_check}) after their retries and were not "
              f"written (flag not_charge_balanced; --charge-check off keeps them)")
    retried = [r for r in results if r.retries]
    if retried:
        print(f"{len(retried)} samples were sent back to an earlier site and resampled "
              f"({sum(r.retries for r in retried)} retries; the 'retries' column of summary.csv)")
    if funnel:
        print("funnel: " + " -> ".join(f"{k} {v}" for k, v in funnel.items())
              + f" (stable: e_above_hull <= {args.relax_config.stable_threshold} eV/atom of the training data's hull; "
              f"relaxed CIFs in {out / 'relaxed'}, summary.csv sorted by e_above_hull)")
    print(f"wrote {len(valid)} {args.format} files (space-group consistent {len(consistent)}, unique {len(unique)}"
          + f", charge check {args.charge_check}) and summary.csv to {out}")
    return 0


def relax_written(args: argparse.Namespace, results: list, rows: list[dict], out: Path) -> tuple[list[dict], dict]:
    """--relax: relax the valid samples (all cores), write relaxed CIFs to OUT/relaxed/, add the
    stability columns to their rows (sorted by e_above_hull, unrelaxed last) and count the funnel."""
    from tqdm import tqdm

    from wyckoffgpt import stability
    from wyckoffgpt.atomic import atomic_write
    from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex
    from wyckoffgpt.generation import resolve_model_path

    valid = [r for r in results if r.valid]
    refs = stability.default_references(config=args.relax_config)
    with tqdm(total=len(valid), unit="structure", file=sys.stderr, disable=None, desc="relaxing") as bar:
        found = stability.assess([r.structure for r in valid], refs, args.relax_config, on_finished=bar.update)
    by_index = dict(zip((r.index for r in valid), found))
    (out / "relaxed").mkdir(exist_ok=True)
    for row in rows:
        s = by_index.get(row["index"])
        row.update(stability.summary_fields(s))
        if s is not None and s.status == "relaxed":
            atomic_write(out / "relaxed" / (Path(row["file"]).stem + ".cif"), structure_text(s.structure, "cif"))
    rows.sort(key=lambda row: (row["e_above_hull"] == "", float(row["e_above_hull"] or 0), row["index"]))
    index_path = resolve_model_path(args.model) / INDEX_FILE
    index = FingerprintIndex.load(index_path) if index_path.exists() else None
    return rows, stability.funnel(len(results), len(valid), found, index, args.relax_config.stable_threshold)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
