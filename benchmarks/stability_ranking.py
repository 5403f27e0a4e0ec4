"""Does the model know which of its own samples are stable? Its likelihood ratio against relaxed results.

    python benchmarks/stability_ranking.py --log conditioning.jsonl [--model DIR] [--systems ...]
                                           [-n 24] [--guidance W] [--guidance-contrast opposite|unknown|unknown-for-low]
                                           [--seed 0] [--out ranking.json]

A model conditioned on the stability token is also a classifier: by Bayes' rule
log p(low | x) - log p(high | x) = log p(x | low) - log p(x | high) + a constant. If that score ranked
a system's samples by their relaxed energy above hull, `--ehull low` could draw k candidates and keep
the best-scored one (a sequence-level form of guidance, at k times the sampling cost).

This measures it without relaxing anything: it redraws the samples of a finished
`benchmarks/conditioning.py` run (same model, systems, n, guidance and seed; the log is checked
sample by sample) and scores each relaxed, connected one with
`log p(x | class) - log p(x | contrast)` (tokens and values after the stability token; class: the
arm's, contrast: the other class and `unknown`). Per system and arm: the ROC AUC of the score for
"within 0.1 eV/atom of the hull" among that arm's samples (0.5: no information), and the share
within 0.1 eV/atom of all scored samples against that of the better-scored half (what keeping 1 of
2 would give). A markdown table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import screening
import torch
from conditioning import SYSTEMS, arms

from wyckoffgpt.composition import feature_function
from wyckoffgpt.data import collate
from wyckoffgpt.generation import CrystalGenerator, resolve_model_path
from wyckoffgpt.sampling import GUIDANCE_CONTRASTS, SamplingConfig

CLASSES = ("low", "high", "unknown")
STABLE = 0.1  # eV/atom, the conditioning benchmark's share


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a positive outscores a negative (ties count half); None without both."""
    pos, neg = score[positive], score[~positive]
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@torch.no_grad()
def class_log_likelihoods(gen: CrystalGenerator, sequence) -> dict[str, float]:
    """log p(x | stability class) for each class: the sequence's tokens and values after the
    stability token (the token itself is the prior, not the likelihood)."""
    vocab, model = gen.vocab, gen.model
    features = feature_function(vocab, getattr(model.config, "composition_slots", 0),
                                getattr(model.config, "charge_feature", False))
    values = torch.from_numpy(sequence.values.astype(np.float32))
    out = {}
    for c in CLASSES:  # one sequence per forward pass: the output's loss sums are per batch
        ids = sequence.ids.copy()
        ids[1] = vocab.token_to_id[f"ehull:{c}"]
        batch = {k: v.to(gen.device) for k, v in collate([(torch.from_numpy(ids), values)], vocab.pad_id, features).items()}
        o = model(**batch, compute_loss=True)
        prior = torch.nn.functional.cross_entropy(o.logits[0, :1].float(), batch["input_ids"][0, 1:2])
        out[c] = -float(o.loss_sum - prior)
    return out


def rank_arm(scored: list[tuple[float, dict[str, float]]], ehull: str) -> dict:
    """Figures of one arm: (e_above_hull, log-likelihoods) of its scored samples."""
    e = np.array([x for x, _ in scored])
    stable = e <= STABLE
    out = {"scored": len(e), f"within_{STABLE:g}": float(stable.mean()) if len(e) else None}
    for contrast in (c for c in CLASSES if c != ehull):
        # Score toward the arm's own class: a high arm keeps its least stable-looking samples.
        score = np.array([ll[ehull] - ll[contrast] for _, ll in scored])
        toward_low = score if ehull == "low" else -score
        top = np.argsort(-score, kind="stable")[: max(1, len(e) // 2)] if len(e) else []
        out[f"vs_{contrast}"] = {"auc_stable": roc_auc(toward_low, stable),
                                 f"within_{STABLE:g}_best_half": float(stable[top].mean()) if len(e) else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", required=True, help="JSONL log of a finished benchmarks/conditioning.py run")
    p.add_argument("--model", help="the model of that run (default: the bundled model)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    p.add_argument("-n", type=int, default=24, help="samples per arm of that run")
    p.add_argument("--guidance", type=float, default=1.0, help="the run's guidance weight")
    p.add_argument("--guidance-contrast", choices=GUIDANCE_CONTRASTS, default="opposite")
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    gen = CrystalGenerator.from_pretrained(args.model, device="cpu")
    conditions = [screening.Condition(name, tuple(system.split("-")), ehull, w,
                                      None if w is None else args.guidance_contrast)
                  for system in args.systems
                  for name, ehull, w in arms(system, [args.guidance], args.guidance_contrast, False)]
    samples = screening.draw(gen, conditions, args.n, args.temperature, args.seed)
    records = screening.read_log(Path(args.log))
    report = {"benchmark": "stability_ranking", "date": time.strftime("%Y-%m-%d"),
              "model": str(resolve_model_path(args.model)), "log": args.log, "n": args.n,
              "guidance": args.guidance, "guidance_contrast": args.guidance_contrast, "arms": {}}
    pooled: list[tuple[float, dict[str, float]]] = []
    for c in conditions:
        scored = []
        for i, s in enumerate(samples[c.name]):
            r = records.get((c.name, i))
            if not s.valid or r is None:
                continue
            if r["formula"] != s.structure.composition.reduced_formula:
                sys.exit(f"{args.log}: sample {i} of {c.name} was {r['formula']}, now "
                         f"{s.structure.composition.reduced_formula}: another draw (model, n, seed or guidance)")
            if r["status"] == "relaxed" and r.get("connected") and r.get("e_above_hull") is not None:
                scored.append((r["e_above_hull"], class_log_likelihoods(gen, s.sequence)))
        report["arms"][c.name] = rank_arm(scored, c.ehull)
        pooled += scored
    # Over every arm: does the score tell the arms' stable samples from their unstable ones?
    report["pooled_auc_stable"] = roc_auc(np.array([ll["low"] - ll["high"] for _, ll in pooled]),
                                          np.array([e <= STABLE for e, _ in pooled]))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print("| arm | scored | within 0.1 | AUC vs other class | best half | AUC vs unknown | best half |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for name, a in report["arms"].items():
        other = a["vs_high"] if "vs_high" in a else a["vs_low"]
        unk = a["vs_unknown"]
        print(f"| {name} | {a['scored']} | {fmt(a['within_0.1'])} | {fmt(other['auc_stable'])} | "
              f"{fmt(other['within_0.1_best_half'])} | {fmt(unk['auc_stable'])} | {fmt(unk['within_0.1_best_half'])} |")
    print(f"pooled over all arms: AUC {fmt(report['pooled_auc_stable'])}")
    screening.emit(report, args.out)


if __name__ == "__main__":
    main()
