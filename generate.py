"""Generate crystal structures with a trained WyckoffGPT model.

    python generate.py --elements Al Ca Cu --ehull low [-n 100] [--spacegroup 225] [--model DIR]

Writes one file per valid structure (decoded, no atoms closer than the distance threshold, composition
passing the charge check) to --out in subfolders of at most 1,000 files, plus summary.csv with every
sample and its flags (written as the samples are made; --resume continues a killed run), and prints a
short summary.
Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ["cif", "extxyz", "json"]  # wyckoffgpt.writer.FORMATS, without importing the library for --help


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
    p.add_argument("--format", choices=FORMATS, default="cif")
    p.add_argument("--single-process", action="store_true", dest="single_process",
                   help="decode, filter and write in the sampling process (default: in a second process "
                        "while sampling goes on, when more than one core is available)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (killed or stopped) from the rows it has written")
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
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out: the folder of the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (args.out is None or args.seed is None):
        raise UsageError("several processes (torchrun) need --out and --seed: one folder, one seed for all")
    if args.spacegroup is not None and not 1 <= args.spacegroup <= 230:
        raise UsageError(f"--spacegroup must be in 1-230, got {args.spacegroup}")
    if args.device is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:0, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine")


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

    from wyckoffgpt.generation import CrystalGenerator, InputError
    from wyckoffgpt.writer import RunError, RunSettings, Share, write_run

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        settings = RunSettings(args.n, args.elements, args.ehull, args.spacegroup, args.temperature, args.top_p,
                               args.seed, args.batch_size, args.min_distance,
                               **({} if args.max_retries is None else {"max_retries": args.max_retries}),
                               charge_check=args.charge_check, format=args.format, model=args.model)
        gen = CrystalGenerator.from_pretrained(args.model, device=args.device)
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

    print(f"seed {gen.last_seed}, T={args.temperature}, {elapsed:.1f} s")
    print(f"sampled {c.sampled}, decoded {c.decoded}, passed distance filter (>= {args.min_distance} Å) "
          f"{c.placed}, of these charge-balanced (SMACT) {c.balanced}")
    if c.unbalanced:
        print(f"{c.unbalanced} failed the charge check ({args.charge_check}) after their retries and were not "
              f"written (flag not_charge_balanced; --charge-check off keeps them)")
    if c.retried:
        print(f"{c.retried} samples were sent back to an earlier site and resampled "
              f"({c.retries} retries; the 'retries' column of summary.csv)")
    print(f"wrote {c.valid} {args.format} files (space-group consistent {c.consistent}, unique {c.unique}"
          + f", charge check {args.charge_check}) and summary.csv to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
