"""Sample quality and validation NLL of a model, for the model card.

    python benchmarks/quality.py [--model DIR] [--data DATASET_DIR] [--n 1000] [--temperatures 0.7 1.0 1.3]
                                 [--ehull none low high] [--max-retries 4] [--raw] [--charge-check ionic]
                                 [--ablation-model DIR] [--reference PATH] [--out report.json]

For each model, temperature and stability condition (`none`: unconditional), n samples are drawn with
the generator's default sampler (clash retries up to --max-retries; see wyckoffgpt/sampling.py) and,
with --raw, again without retries and without the charge check (the model's samples as drawn). The
sampler's charge check (`--charge-check`, default the generator's "ionic"; see
wyckoffgpt.chemistry.CHARGE_CHECKS) sends compositions that fail it back too. Fractions are of all n samples for
the first three columns and of the distance-valid samples for the rest:
  seq_valid       the sequence decodes to a structure
  dist_valid      decoded, and no two atoms closer than 0.7 Å
  smact           composition passes SMACT (charge neutrality + electronegativity); training-set
                  rate beside it
  sg_consistent   spglib finds the space group the sequence states
  unique          matches no earlier sample (StructureMatcher, within the same reduced formula)
  novel           matches no training crystal (StructureMatcher against the fingerprint index,
                  within the same reduced formula), or none of --reference's crystals
  proto_low       stability proxy: the canonical prototype (formula, space group, Wyckoff
                  letter/element multiset) occurs among low-e_hull training crystals; compare
                  `low` and `high` rows
The counting is `wyckoffgpt.metrics.sample_set_metrics`, as in temperature sweeps; the JSON rows also
hold its distribution statistics against the reference (Wasserstein distances of density and number
of elements, shares per crystal system) and the rate of samples distance-valid at 0.5 Å.
Validation NLL (nats) of the val split, per kind of target: discrete token cross-entropy (also
split by token class), and the value heads' NLL per coordinate, length and angle; an MSE-head
model reports its mean squared error in the regressed variable instead.

The fingerprint index is MODEL/fingerprints.npz, else --index, else built from --data's train split.
--data defaults to the dataset the model was trained on (training_summary.json). A markdown table
is printed, then one JSON line (the full report, also written to --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from wyckoffgpt import metrics  # noqa: E402
from wyckoffgpt.chemistry import CHARGE_CHECKS, passes_charge_check, smact_valid  # noqa: E402
from wyckoffgpt.descriptions import prototype_key, structure_prototype  # noqa: E402
from wyckoffgpt.fingerprints import INDEX_FILE, FingerprintIndex, build_fingerprint_index  # noqa: E402
from wyckoffgpt.generation import CrystalGenerator, GeneratedCrystal, resolve_model_path  # noqa: E402
from wyckoffgpt.sampling import SamplingConfig  # noqa: E402

SAMPLE_COLUMNS = ("seq_valid", "dist_valid", "smact", "sg_consistent", "unique", "novel", "proto_low")


def sample_metrics(results: list[GeneratedCrystal], gen: CrystalGenerator, index: FingerprintIndex,
                   reference: metrics.ReferenceSet) -> dict:
    t0 = time.perf_counter()
    m = metrics.sample_set_metrics(results, reference)
    t1 = time.perf_counter()
    valid = [results[k] for k in m.valid_index]
    # Canonical re-encoding: the key of the crystal actually produced, in the same canonical form
    # the training keys were built from; the sampled sequence's own key if it cannot be encoded.
    keys = [structure_prototype(r.structure, gen.tokenizer)
            or prototype_key(gen.tokenizer.parse(r.sequence)) for r in valid]
    proto = metrics.low_prototype_flags(keys, index)
    row = m.row()
    out = {
        "n": m.n,
        "n_dist_valid": m.valid,
        "seq_valid": row["decoded"],
        "dist_valid": row["valid"],
        "smact": row["smact_valid"],
        **{k: row[k] for k in ("sg_consistent", "unique", "novel", "unique_novel")},
        "proto_low": metrics.fraction(proto),
        "sampled_low": metrics.fraction([r.sequence.tokens[1] == "ehull:low" for r in results]),
        "dist_valid_0.5": row["dist_valid_0.5"],
        **{k: v for k, v in row.items() if k.startswith(("wasserstein_", "share_", "crystal_system_"))},
    }
    out["seconds_metrics"] = round(t1 - t0, 1)
    out["seconds_proto"] = round(time.perf_counter() - t1, 1)
    return out


# Token classes for splitting the discrete cross-entropy by what the model is predicting.
def _token_classes(vocab) -> tuple[np.ndarray, list[str]]:
    names = ["stability", "arity", "element", "spacegroup", "wyckoff", "value_slot", "eos", "other"]
    table = np.full(len(vocab), names.index("other"), dtype=np.int64)
    for ids, name in ((vocab.stability_ids, "stability"), (vocab.arity_ids.values(), "arity"),
                      (vocab.element_ids.values(), "element"), (vocab.sg_ids.values(), "spacegroup"),
                      (vocab.orbit_ids.values(), "wyckoff"), (vocab.value_ids, "value_slot"), ([vocab.eos_id], "eos")):
        table[list(ids)] = names.index(name)
    return table, names


@torch.no_grad()
def validation_nll(gen: CrystalGenerator, data_dir: str, batch_size: int = 64) -> dict:
    from wyckoffgpt.composition import feature_function
    from wyckoffgpt.data import SequenceDataset, collate
    from wyckoffgpt.training import LossSums

    model, vocab = gen.model, gen.vocab
    ds = SequenceDataset(data_dir, "val")
    if ds.meta["vocab_hash"] != vocab.hash:
        raise SystemExit(f"dataset {data_dir} uses another vocabulary than the model")
    table, names = _token_classes(vocab)
    table = torch.from_numpy(table)
    features = feature_function(vocab, getattr(model.config, "composition_slots", 0))
    sums = LossSums.zeros(dtype=torch.float64)
    class_sum = torch.zeros(len(names), dtype=torch.float64)
    class_n = torch.zeros(len(names), dtype=torch.float64)
    for lo in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(lo, min(lo + batch_size, len(ds)))], vocab.pad_id, features)
        out = model(**{k: v.to(gen.device) for k, v in batch.items()}, compute_loss=True)
        sums = sums + LossSums.of(out, torch.float64).to("cpu")
        target = batch["input_ids"][:, 1:]
        logits = out.logits[:, :-1].float().cpu()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        real = target != vocab.pad_id
        cls = table[target][real]
        class_sum += torch.zeros(len(names), dtype=torch.float64).index_add_(0, cls, ce[real].double())
        class_n += torch.bincount(cls, minlength=len(names)).double()
    means = {k: None if math.isnan(v) else v for k, v in sums.means().items()}  # a split without angles has none
    value = "nll" if model.config.continuous_head == "mixture" else "mse"
    return {
        "split": "val", "sequences": len(ds), "value_loss": value, "loss": means["loss"], "token_ce": means["token"],
        f"coord_{value}": means["coord"], f"length_{value}": means["length"], f"angle_{value}": means["angle"],
        "token_ce_by_class": {n: class_sum[k].item() / class_n[k].item() for k, n in enumerate(names) if class_n[k]},
    }


def training_reference(index: FingerprintIndex) -> dict:
    high = ~index.low_ehull
    return {
        "split": "train", "crystals": len(index),
        "smact": metrics.fraction([smact_valid(f) for f in index.formulas()]),
        # What the default charge check would turn away among real crystals.
        "ionic_check": metrics.fraction([passes_charge_check(f, "ionic") for f in index.formulas()]),
        # How often the proxy fires for known high-e_hull crystals: the proxy's floor.
        "proto_low_of_high_entries": metrics.fraction([index.prototype(i) in index.low_prototypes
                                                       for i in np.flatnonzero(high)]),
    }


def evaluate_model(name: str, folder: str, args, index: FingerprintIndex, reference: metrics.ReferenceSet,
                   data_dir: str | None) -> dict:
    gen = CrystalGenerator.from_pretrained(folder, device=args.device, cpu_threads=1)
    rows = []
    # Each setting with the default sampler and, with --raw, again without clash retries (same seed).
    settings = [(ti, t, ci, e, r) for ti, t in enumerate(args.temperatures) for ci, e in enumerate(args.ehull)
                for r in [args.max_retries] + ([0] if args.raw and args.max_retries else [])]
    for ti, temperature, ci, ehull, retries in settings:
        t0 = time.perf_counter()
        # Over the model's recommended settings (its guidance of an asked class), as users sample.
        config = gen.sampling_config(temperature=temperature, seed=args.seed + 100 * ti + ci,
                                     batch_size=args.batch_size, max_retries=retries,
                                     charge_check=args.charge_check if retries else "off")
        results = gen.generate(args.n, ehull=None if ehull == "none" else ehull, config=config, check_unique=False)
        t_sample = time.perf_counter() - t0
        applied = gen.guided_config(gen.conditions(ehull=None if ehull == "none" else ehull), None, config)
        row = {"model": name, "temperature": temperature, "ehull": ehull, "max_retries": retries,
               "guidance": applied.guidance, "guidance_contrast": config.guidance_contrast,
               "charge_check": args.charge_check if retries else "off",
               **sample_metrics(results, gen, index, reference), "seconds_sample": round(t_sample, 1),
               "mean_retries": float(np.mean([r.retries for r in results]))}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  {name} T={temperature} ehull={ehull} retries<={retries}: " + ", ".join(
            f"{c} {row[c]:.3f}" for c in SAMPLE_COLUMNS if row[c] is not None) + f" ({row['seconds']} s)",
            file=sys.stderr, flush=True)
        rows.append(row)
    nll = validation_nll(gen, data_dir) if data_dir else None
    return {"name": name, "folder": str(folder), "continuous_head": gen.model.config.continuous_head,
            "parameters": sum(p.numel() for p in gen.model.parameters()), "samples": rows, "validation": nll}


def markdown(report: dict) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    num = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    ref = report["training"]
    lines = ["| model | T | ehull | retries | seq-valid | dist-valid | SMACT | SG-consistent | unique | novel | "
             "proto-low |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        for r in m["samples"]:
            retries = f"≤{r['max_retries']} ({r['mean_retries']:.2f})" if r["max_retries"] else "0 (raw)"
            retries += f", {r['charge_check']}" if r.get("charge_check", "off") != "off" else ""
            lines.append(f"| {m['name']} | {r['temperature']} | {r['ehull']} | {retries} | "
                         + " | ".join(pct(r[c]) for c in SAMPLE_COLUMNS) + " |")
    lines.append(f"| training set (train split) | | | | | | {pct(ref['smact'])} | | | | "
                 f"{pct(ref['proto_low_of_high_entries'])} (high-e_hull entries) |")
    lines += ["", f"Percent; n = {report['n']} samples per row. seq-valid, dist-valid and SMACT are of all samples; "
              "SG-consistent, unique, novel and proto-low of the distance-valid ones. retries: the sampler's "
              "limit on sending a clashing sample back to the site where the clash begins, or a sample whose "
              "composition fails the charge check (named after it) back to the start (mean per sample in "
              f"brackets); 0 (raw): the model's samples as drawn, no retries and no charge check. "
              f"{pct(ref.get('ionic_check'))} % of the training crystals pass the ionic charge check.", ""]
    val = [m for m in report["models"] if m["validation"]]
    if val:
        classes = list(val[0]["validation"]["token_ce_by_class"])
        lines += ["| model (val split) | head | loss | token CE | coord | length | angle | "
                  + " | ".join(f"CE {c}" for c in classes) + " |",
                  "|---" * (7 + len(classes)) + "|"]
        for m in val:
            v = m["validation"]
            k = v["value_loss"]
            cells = [v["loss"], v["token_ce"], v[f"coord_{k}"], v[f"length_{k}"], v[f"angle_{k}"]]
            cells += [v["token_ce_by_class"].get(c) for c in classes]
            head = f"{m['continuous_head']} ({k.upper()})"
            lines.append(f"| {m['name']} | {head} | " + " | ".join(map(num, cells)) + " |")
        lines += ["", "Nats per target token (token CE) and per value (mixture head: NLL in the modelled variable "
                  "incl. its Jacobian, so per natural unit); an MSE head reports its squared error instead."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--data", help="tokenized dataset folder: val split for the NLL, train split for an index")
    p.add_argument("--index", help="fingerprint index file (default: MODEL/fingerprints.npz)")
    p.add_argument("--reference", help="novelty and distribution statistics against this set instead of the index: "
                                       "a prepared dataset folder (train split), a CSV of CIFs, a folder of .cif files")
    p.add_argument("--n", type=int, default=1000, help="samples per setting")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.3])
    p.add_argument("--ehull", nargs="+", default=["none", "low", "high"], choices=["none", "low", "high"])
    p.add_argument("--ablation-model", help="an MSE-head model folder, measured the same way")
    default = SamplingConfig()
    p.add_argument("--max-retries", type=int, default=default.max_retries,
                   help=f"clash retries of the sampler (default {default.max_retries}, the library default)")
    p.add_argument("--raw", action="store_true", help="also measure every setting without clash retries")
    p.add_argument("--charge-check", choices=list(CHARGE_CHECKS), default=default.charge_check,
                   help=f"the sampler's charge check (default: {default.charge_check}, the generator's default); "
                        "off: clash retries only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", help="torch device for sampling and NLL (default: cuda if available, else cpu)")
    p.add_argument("--no-nll", action="store_true", help="skip the validation NLL")
    p.add_argument("--out", help="write the JSON report here too")
    args = p.parse_args(argv)
    # pymatgen warns on every formula with a noble gas (no Pauling electronegativity); harmless here.
    warnings.filterwarnings("ignore", message="No Pauling electronegativity")
    torch.set_num_threads(1)  # sampling steps are small ops; more threads cost more than they gain on CPU
    start = time.perf_counter()
    args.model = str(resolve_model_path(args.model))

    data_dir = args.data
    if data_dir is None:
        summary = Path(args.model) / "training_summary.json"
        if summary.is_file():
            data_dir = json.loads(summary.read_text()).get("train_config", {}).get("data_dir")
    if data_dir and not Path(data_dir).is_dir():
        data_dir = None
    if data_dir is None and not args.no_nll:
        print("no dataset (--data): the validation NLL is skipped", file=sys.stderr)

    index_path = Path(args.index) if args.index else Path(args.model) / INDEX_FILE
    index_source = str(index_path)
    with tempfile.TemporaryDirectory() as tmp:
        if not index_path.is_file():
            if not data_dir:
                raise SystemExit(f"no fingerprint index at {index_path}: pass --index or --data")
            print(f"no index at {index_path}; building one from {data_dir} (train split)", file=sys.stderr)
            index_source = f"built from {data_dir} (train split)"
            index_path = build_fingerprint_index(data_dir, Path(tmp) / INDEX_FILE)
        index = FingerprintIndex.load(index_path)  # read fully into memory: the temp file may go

    try:
        reference = (metrics.load_reference(args.reference) if args.reference
                     else metrics.ReferenceSet.from_index(index, f"fingerprint index {index_source} "
                                                                 f"({len(index)} training crystals)"))
    except ValueError as e:
        raise SystemExit(f"quality.py: {e}") from None
    report = {"command": "python " + shlex.join(sys.argv), "date": datetime.date.today().isoformat(),
              "n": args.n, "index": {**index.meta, "path": index_source}, "reference": reference.name, "data": data_dir,
              "training": training_reference(index), "models": []}
    nll_data = None if args.no_nll else data_dir
    report["models"].append(evaluate_model("model", args.model, args, index, reference, nll_data))
    if args.ablation_model:
        report["models"].append(evaluate_model("ablation", args.ablation_model, args, index, reference, nll_data))
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
