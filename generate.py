"""Generate crystal structures with a trained WyckoffGPT model.

    python generate.py --elements Al Ca Cu --ehull low [-n 100] [--spacegroup 225] [--model DIR]
    python generate.py --temperatures 0.7 1.0 1.3 -n 300 --report sweep.csv --plot sweep.png --out DIR
    python generate.py --formula Ca2AlCu2 --formula-units 1,2,4 --ehull low
    python generate.py --wyckoff "225: Na 4a, Cl 4b" [--complete-sites]
    python generate.py --prompt "<bos> ehull:low n:2 Na Cl sg:225 w22a Na"

Writes one file per valid structure (decoded, no atoms closer than the distance threshold, composition
passing the charge check) to --out in subfolders of at most 1,000 files, plus summary.csv with every
sample and its flags (written as the samples are made; --resume continues a killed run), and prints a
short summary. With --temperatures, a sweep: one such folder per temperature inside --out and a table
of their metrics (wyckoffgpt.sweep).
Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block
        raise UsageError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The sampling flags' defaults and choices are the library's (SamplingConfig), not typed again here;
    # a flag left out is None, so that the model's recommended settings (sampling_config.json) apply.
    from wyckoffgpt.chemistry import CHARGE_CHECKS
    from wyckoffgpt.grammar import Limits
    from wyckoffgpt.sampling import ANALOGUE_SOURCES, GUIDANCE_CONTRASTS, SamplingConfig
    from wyckoffgpt.writer import FORMATS

    default = SamplingConfig()
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder, Hub repo id or bundled model name (default: the bundled model); "
                                   "the sampling defaults below are replaced by the model folder's "
                                   "sampling_config.json, where it has one")
    p.add_argument("--elements", nargs="+", metavar="EL", help="exactly this chemical system, e.g. Al Ca Cu")
    p.add_argument("--ehull", choices=["low", "high"], help="stability class (default: sampled)")
    p.add_argument("--spacegroup", type=int, metavar="N", help="space group number 1-230 (default: sampled)")
    p.add_argument("--formula", help="exactly this reduced formula in every sample, e.g. Ca2AlCu2")
    p.add_argument("--formula-units", dest="formula_units", metavar="K,K,...",
                   help="formula units per cell allowed with --formula, e.g. 1,2,4 (default: any within --max-atoms)")
    p.add_argument("--max-atoms", type=int, dest="max_atoms", metavar="N",
                   help=f"at most N atoms per (conventional) cell (default {Limits().max_atoms})")
    p.add_argument("--wyckoff", metavar="SPEC",
                   help="prototype: space group and Wyckoff sites, '<space group>: <element> <position>, ...', e.g. "
                        "'225: Na 4a, Cl 4b' (position: letter with or without its multiplicity); the model draws "
                        "the free coordinates and the cell; the elements are those of the sites")
    p.add_argument("--complete-sites", action="store_true", dest="complete_sites",
                   help="with --wyckoff: the model may add further sites of the same elements")
    p.add_argument("--prompt", metavar="TEXT",
                   help="complete this sequence prefix (CrystalSequence text form, as in summary.csv's sequence "
                        "column, e.g. '<bos> ehull:low n:2 Na Cl sg:225 w22a Na'); kept verbatim")
    p.add_argument("-n", "--num-samples", type=int, default=100, dest="n")
    temps = p.add_mutually_exclusive_group()
    temps.add_argument("--temperature", type=float, default=None,
                       help=f"sampling temperature (default {default.temperature}: the model's own distribution)")
    temps.add_argument("--temperatures", type=float, nargs="+", metavar="T",
                       help="a temperature sweep: n samples at each, in subfolders T<value> of --out, measured "
                            "(validity, uniqueness, novelty, distribution statistics) in --report")
    p.add_argument("--top-p", type=float, dest="top_p", default=None,
                   help="nucleus sampling of tokens (default: off)")
    p.add_argument("--batch-size", type=int, default=None, dest="batch_size",
                   help=f"sequences drawn together; the samples depend on it (default {default.batch_size})")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--min-distance", type=float, default=None, dest="min_distance",
                   help=f"minimum interatomic distance in Å (default {default.min_distance})")
    p.add_argument("--symprec", type=float, default=None,
                   help=f"spglib tolerance in Å when a structure's space group is compared with its sequence's "
                        f"(flag spacegroup_mismatch; default {default.symprec})")
    p.add_argument("--max-retries", type=int, default=None, dest="max_retries",
                   help="how often a sample whose atoms clash goes back to the site where the clash begins "
                        f"and is sampled again from there (default {default.max_retries}; 0: raw "
                        "model samples); also a sample whose composition fails --charge-check, back to the "
                        "start after the given conditions")
    p.add_argument("--charge-check", choices=CHARGE_CHECKS, default=None, dest="charge_check",
                   help=f"compositions resampled (within --max-retries) and left out when they fail it (default "
                        f"{default.charge_check}): 'ionic': oxides, nitrides, chalcogenides and halides need a "
                        "charge-neutral set of oxidation states, intermetallics are left as drawn; 'smact': every composition must "
                        "pass SMACT; 'off': none (the 'charge_balanced' column always says which pass SMACT)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance of --ehull: tokens drawn from contrast + W x "
                        "(conditioned - contrast) (default: the model's sampling_config.json, else "
                        f"{default.guidance}: off; > 1 pushes samples further toward the asked class, at twice "
                        "the model cost; no effect unless --ehull, or a --prompt, asks for a class)")
    p.add_argument("--guidance-contrast", choices=GUIDANCE_CONTRASTS, default=None,
                   dest="guidance_contrast",
                   help="--guidance: the contrast sequence's stability token (default: the model's, else "
                        f"{default.guidance_contrast}: the other class; 'unknown': ehull:unknown, for models trained "
                        "with stability_dropout; 'unknown-for-low': ehull:unknown for low, ehull:low for high)")
    p.add_argument("--analogues", type=int, default=None, metavar="K",
                   help="with --elements or --formula: draw --analogue-share of the samples in the systems made by "
                        "replacing one element with one of its K nearest in Mendeleev number, then substitute "
                        f"the element back (default {default.analogues}: off)")
    p.add_argument("--analogue-share", type=float, default=None, dest="analogue_share",
                   metavar="F", help=f"--analogues: fraction of the samples drawn in analogue systems "
                                     f"(default {default.analogue_share})")
    p.add_argument("--analogue-source", choices=ANALOGUE_SOURCES, default=None, dest="analogue_source",
                   help="--analogues: 'sampled' (default) draws in the analogue systems; 'known' forces the Wyckoff "
                        "skeletons of the model's training crystals in them, substituted back, and the model draws "
                        "their coordinates and cell")
    p.add_argument("--analogue-substitutions", type=int, default=None, dest="analogue_substitutions", metavar="S",
                   help="--analogue-source known: replace up to S elements of the system at once (default 1; 2 "
                        "also takes the skeletons of systems two elements away)")
    p.add_argument("--analogue-repeats", type=int, default=None, dest="analogue_repeats", metavar="R",
                   help="--analogues: draw each analogue (a known skeleton or an analogue system) at most R times, "
                        "the rest of the share in the requested system (default: no cap)")
    p.add_argument("--analogue-templates", action="store_true", default=None, dest="analogue_templates",
                   help="--analogue-source known: each skeleton's first sample is its neighbour's training crystal "
                        "with the elements put back (flagged 'template' in summary.csv), not drawn")
    p.add_argument("--out", type=Path, help="output folder (default: a new folder named after the run)")
    p.add_argument("--format", choices=FORMATS, default="cif")
    p.add_argument("--single-process", action="store_true", dest="single_process",
                   help="decode, filter and write in the sampling process (default: in a second process "
                        "while sampling goes on, which also samples when it would otherwise wait, when more "
                        "than one core is available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (killed or stopped) from the rows it has written")
    p.add_argument("--report", type=Path, help="sweep: the table, one row per temperature (default: OUT/sweep.csv)")
    p.add_argument("--plot", type=Path, help='sweep: a PNG of the table (needs pip install "wyckoffgpt[plot]")')
    p.add_argument("--reference", type=Path, help="sweep: novelty and distribution statistics against this set "
                   "(a prepared dataset folder, a CSV of CIFs, a folder of .cif files; default: the model's "
                   "fingerprint index of its training crystals)")
    p.add_argument("--relax", action="store_true",
                   help="relax the written structures with CHGNet (pip install \"wyckoffgpt[relax]\"), CIFs in "
                        "OUT/relaxed/, energy above the training data's hull in summary.csv (sorted by it)")
    p.add_argument("--fmax", type=float, default=0.1, help="--relax force threshold, eV/Å (default 0.1)")
    p.add_argument("--relax-steps", type=int, default=300, dest="relax_steps",
                   help="--relax: FIRE steps before a relaxation counts as not converged (default 300)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, before the (slow) model load and before anything is written;
    the sampling settings by the library's own checks."""
    from wyckoffgpt.generation import InputError, normalize_elements
    from wyckoffgpt.sampling import check_num_samples

    try:
        if args.elements is not None:
            normalize_elements(args.elements)
        check_num_samples(args.n)
        checked = sampling_config(args)
        for temperature in args.temperatures or []:
            checked.replace(temperature=temperature)
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.max_atoms is not None and args.max_atoms <= 0:
        raise UsageError(f"--max-atoms must be positive, got {args.max_atoms}")
    if args.formula_units is not None:
        from wyckoffgpt.conditioning import ConditioningError, parse_formula_units

        try:
            args.formula_units = parse_formula_units(args.formula_units)
        except ConditioningError as e:
            raise UsageError(f"--formula-units: {e}") from None
    if args.resume and (args.out is None or args.temperatures is not None):
        raise UsageError("--resume needs --out, the folder of the (single-temperature) run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.out is None or args.seed is None):
        raise UsageError("several processes (torchrun) need --out and --seed: one folder, one seed for all")
    if args.spacegroup is not None and not 1 <= args.spacegroup <= 230:
        raise UsageError(f"--spacegroup must be in 1-230, got {args.spacegroup}")
    if args.out is not None and not args.resume and args.out.is_dir() and any(args.out.iterdir()):
        raise UsageError(f"--out {args.out} already holds files (an earlier run?); choose a new or empty folder")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder")
    if args.temperatures is not None or args.report or args.plot or args.reference:
        check_sweep_args(args)
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


def sampling_config(args: argparse.Namespace, base=None):
    """The sampling flags given, over `base` (the model's `CrystalGenerator.sampling_defaults`;
    default: the library's), as a `wyckoffgpt.sampling.SamplingConfig` (InputError naming a bad one)."""
    from wyckoffgpt.sampling import FIELD_NAMES, SamplingConfig

    given = {name: v for name in FIELD_NAMES if (v := getattr(args, name)) is not None}
    return SamplingConfig.resolve(base, **given)


def check_sweep_args(args: argparse.Namespace) -> None:
    from wyckoffgpt import sweep

    if args.temperatures is None:
        raise UsageError("--report, --plot and --reference belong to a sweep: give --temperatures")
    try:
        args.temperatures = sweep.check_temperatures(args.temperatures)
        if args.plot:
            sweep.require_matplotlib()
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None
    for path in (args.report, args.plot):
        if path is not None and path.exists():
            raise UsageError(f"{path} exists; remove it or choose another name")
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"folder {path.parent} does not exist")
    if args.reference is not None and not args.reference.exists():
        raise UsageError(f"--reference {args.reference} does not exist")


def check_relax_args(args: argparse.Namespace) -> None:
    from wyckoffgpt.stability import RelaxConfig, RelaxUnavailable, chgnet_version, default_data_csv

    if args.temperatures is not None or args.resume or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--relax is for a single run in one process (no --temperatures, --resume or torchrun)")
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
    if args.formula:
        system = "".join(c for c in args.formula if c.isalnum())
    elif args.wyckoff:
        system = "wyckoff" + "".join(c for c in args.wyckoff.split(":")[0] if c.isdigit())
    elif args.prompt:
        system = "prompt"
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

    import gc

    import transformers
    from tqdm import tqdm

    from wyckoffgpt.generation import CrystalGenerator, InputError
    from wyckoffgpt.grammar import Limits
    from wyckoffgpt.writer import RunError, RunSettings, Share, write_run

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    exact = {"formula": args.formula, "formula_units": args.formula_units, "wyckoff": args.wyckoff,
             "complete_sites": args.complete_sites}
    try:
        limits = Limits(max_atoms=args.max_atoms) if args.max_atoms else None
        gen = CrystalGenerator.from_pretrained(args.model, device=args.device, limits=limits)
        # The modules and the model live until exit: keep the garbage collector from walking their
        # objects in every full collection and at exit (0.8 s of a 2,000-sample run's 27 s).
        gc.freeze()
        # fail before any sampling
        gen.prompt_prefix(args.prompt, gen.conditions(args.elements, args.ehull, args.spacegroup, **exact))
    except InputError as e:
        raise UsageError(str(e)) from None
    if args.temperatures is not None:
        return temperature_sweep(args, out, gen, {**exact, "prompt": args.prompt})

    try:
        sampling = sampling_config(args, gen.sampling_defaults)
        settings = RunSettings(n=args.n, elements=args.elements, ehull=args.ehull, spacegroup=args.spacegroup,
                               prompt=args.prompt, **exact, sampling=sampling, format=args.format,
                               model=args.model)
        t0 = time.perf_counter()
        share = Share.from_env()  # torchrun / accelerate launch: one part of the run per process
        with tqdm(total=args.n, unit="seq", file=sys.stderr, disable=None if share.rank == 0 else True,
                  desc="sampling") as bar:
            c = write_run(gen, settings, out, resume=args.resume, on_finished=bar.update,
                          worker=False if args.single_process else None, share=share)
    except (InputError, RunError) as e:
        raise UsageError(str(e)) from None
    elapsed = time.perf_counter() - t0
    if share.rank != 0:
        return 0
    guided = f", guidance {sampling.guidance:g} against {sampling.guidance_contrast}" if sampling.guided else ""
    print(f"seed {gen.last_seed}, T={sampling.temperature}{guided}, {elapsed:.1f} s")
    print(f"sampled {c.sampled}, decoded {c.decoded}, passed distance filter (>= {sampling.min_distance} Å) "
          f"{c.placed}, of these charge-balanced (SMACT) {c.balanced}")
    if c.unbalanced:
        print(f"{c.unbalanced} failed the charge check ({sampling.charge_check}) after their retries and were not "
              f"written (flag not_charge_balanced; --charge-check off keeps them)")
    if c.retried:
        print(f"{c.retried} samples were sent back to an earlier site and resampled "
              f"({c.retries} retries; the 'retries' column of summary.csv)")
    if args.relax:
        funnel = relax_run(args, out, c.sampled)
        print("funnel: " + " -> ".join(f"{k} {v}" for k, v in funnel.items())
              + f" (stable: e_above_hull <= {args.relax_config.stable_threshold} eV/atom of the training data's hull; "
              f"relaxed CIFs in {out / 'relaxed'}, summary.csv sorted by e_above_hull)")
    print(f"wrote {c.valid} {args.format} files (space-group consistent {c.consistent}, unique {c.unique}"
          + f", charge check {sampling.charge_check}) and summary.csv to {out}")
    return 0


def temperature_sweep(args: argparse.Namespace, out: Path, gen, exact: dict) -> int:
    """`exact`: the formula, Wyckoff and prompt conditions, passed on to every temperature."""
    from tqdm import tqdm

    from wyckoffgpt import metrics, sweep
    from wyckoffgpt.generation import resolve_model_path
    from wyckoffgpt.writer import write_results

    report = args.report or out / "sweep.csv"
    if report.exists():
        raise UsageError(f"{report} exists; remove it, or choose another --report or --out")
    for t in args.temperatures:
        if (out / f"T{t}").exists():
            raise UsageError(f"{out / f'T{t}'} exists (an earlier sweep?); choose another --out")
    try:
        reference = (metrics.load_reference(args.reference) if args.reference
                     else metrics.model_reference(resolve_model_path(args.model)))
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"reference: {reference.name}" if reference is not None else "reference: none (the model folder has no "
          "fingerprints.npz): novelty and distribution statistics left empty; pass --reference")

    def write_point(point: sweep.SweepPoint) -> None:
        folder = out / f"T{point.temperature}"
        folder.mkdir(exist_ok=True)
        write_results(point.results, folder, args.format)

    t0 = time.perf_counter()
    with tqdm(total=args.n * len(args.temperatures), unit="seq", file=sys.stderr, disable=None,
              desc="sweep") as bar:
        config = sampling_config(args, gen.sampling_defaults)
        points = sweep.run_sweep(gen, args.temperatures, args.n, reference, config=config,
                                 on_finished=bar.update, on_point=write_point, elements=args.elements,
                                 ehull=args.ehull, spacegroup=args.spacegroup, **exact)
    rows = sweep.sweep_rows(points)
    sweep.write_table(rows, report)
    print(f"seed {points[0].seed}, {len(points)} temperatures x {args.n} samples, {time.perf_counter() - t0:.1f} s")
    for point, r in zip(points, rows):
        novel = "–" if r["novel"] is None else f"{r['novel']:.3f}"
        print(f"T={point.temperature}: valid {r['valid']:.3f}, unique {r['unique'] or 0:.3f}, novel {novel}; "
              f"{sum(x.valid for x in point.results)} structures written to {out / f'T{point.temperature}'}")
    if args.plot:
        from wyckoffgpt.sampling import SamplingConfig

        default = SamplingConfig()
        conditions = ", ".join(filter(None, [
            "-".join(args.elements or []), args.ehull and f"ehull {args.ehull}",
            args.spacegroup and f"space group {args.spacegroup}",
            config.max_retries != default.max_retries and f"max retries {config.max_retries}",
            config.charge_check != default.charge_check and f"charge check {config.charge_check}",
            config.guided and f"guidance {config.guidance:g} against {config.guidance_contrast}"]))
        sweep.plot_sweep(points, args.plot, conditions or "unconditional")
    print(f"wrote {report}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def relax_run(args: argparse.Namespace, out: Path, n_sampled: int) -> dict[str, int]:
    """--relax: relax the run's written structures (all cores), write relaxed CIFs to OUT/relaxed/,
    add the stability columns to summary.csv (sorted by e_above_hull, unrelaxed last) and count the
    funnel."""
    import csv
    import io

    from pymatgen.core import Structure
    from tqdm import tqdm

    from wyckoffgpt import stability
    from wyckoffgpt.atomic import atomic_write
    from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex
    from wyckoffgpt.generation import resolve_model_path
    from wyckoffgpt.writer import CSV_FIELDS, SUMMARY_FILE, structure_text

    with open(out / SUMMARY_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    written = [row for row in rows if row["file"]]
    refs = stability.default_references(config=args.relax_config)
    with tqdm(total=len(written), unit="structure", file=sys.stderr, disable=None, desc="relaxing") as bar:
        found = stability.assess([Structure.from_file(out / row["file"]) for row in written], refs,
                                 args.relax_config, on_finished=bar.update)
    by_index = dict(zip((row["index"] for row in written), found))
    (out / "relaxed").mkdir(exist_ok=True)
    for row in rows:
        s = by_index.get(row["index"])
        row.update(stability.summary_fields(s))
        if s is not None and s.status == "relaxed":
            atomic_write(out / "relaxed" / (Path(row["file"]).stem + ".cif"), structure_text(s.structure, "cif"))
    rows.sort(key=lambda row: (row["e_above_hull"] == "", float(row["e_above_hull"] or 0), int(row["index"])))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS + stability.SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / SUMMARY_FILE, buf.getvalue())
    index_path = resolve_model_path(args.model) / INDEX_FILE
    index = FingerprintIndex.load(index_path) if index_path.exists() else None
    return stability.funnel(n_sampled, len(written), found, index, args.relax_config.stable_threshold)


def main(argv: list[str] | None = None) -> int:
    # Deprecation notices between pymatgen and its own dependencies (e.g. older pymatgen on newer monty)
    # are for their developers; on this command's stderr they would bury its one-line messages.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"pymatgen\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pymatgen\.")
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
