"""Does the stability token deliver? `--ehull low` against `high` and unconditioned, per chemical system.

    python benchmarks/conditioning.py [--model DIR] [--systems Al-Ca-Cu Ce-In-Pd Li-Co-O Sr-Ti-O]
                                      [-n 50] [--temperature 1.0] [--guidance W ...]
                                      [--guidance-contrast opposite|unknown|unknown-for-low] [--no-unconditioned] [--seed 0 ...]
                                      [--workers 2] [--log conditioning.jsonl] [--out conditioning.json]

    python benchmarks/conditioning.py --systems Al-Ca-Cu -n 20 --guidance 1 3   # off, and guidance 3
    python benchmarks/conditioning.py -n 20 --guidance 1 2 4 --guidance-contrast unknown   # a model trained with
                                                                                   # stability_dropout
    python benchmarks/conditioning.py --systems Al-Ca-Cu -n 24 --seed 0 1 2   # three draws of 24, pooled
The default is the model's recommended guidance (its sampling_config.json): what generate.py does.

For each chemical system, n samples per stability class (`low`, `high`, and `none`: the model picks
the class itself) are drawn with that system's elements, relaxed with CHGNet and scored against the
training data's hull (benchmarks/screening.py says how; --log makes a killed run resumable). Per
system and class: the funnel, the median e_above_hull of the relaxed and connected samples, their
share within 0.1 eV/atom and the S.U.N. rate, with 95 % Wilson intervals. The verdict per system:
does `low` give a lower median than `high`, and a share within 0.1 eV/atom at least 1.5x that of
`high`? A markdown table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse

import screening

from wyckoffgpt.generation import resolve_model_path
from wyckoffgpt.sampling import GUIDANCE_CONTRASTS, SamplingConfig, contrast_of

# The main command's system (no ternary of it in data/) and three ternaries of the test split of
# `prepare.py --split system --seed 0`, which the bundled model never saw: an intermetallic, a
# battery oxide and a perovskite.
SYSTEMS = ("Al-Ca-Cu", "Ce-In-Pd", "Li-Co-O", "Sr-Ti-O")


def arm_name(system: str, ehull: str, w: float, contrast: str = "opposite") -> str:
    # The class's own contrast is in the name so that a log of one contrast never resumes a run of
    # another, and an arm drawn alike under two settings ("unknown-for-low"'s low arm is "unknown"'s)
    # is relaxed once.
    if w == 1:
        return f"{system}/{ehull}"
    contrast = contrast_of(contrast, ehull) if ehull in ("low", "high") else contrast
    return f"{system}/{ehull}/w{w:g}" + ("" if contrast == "opposite" else f"-vs-{contrast}")


def arms(system: str, weights: list[float], contrast: str = "opposite",
         unconditioned: bool = True) -> list[tuple[str, str | None, float | None]]:
    """(name, ehull, guidance) of one system's arms: low and high at each guidance weight, and none
    (the model draws the class; guidance does not apply) unless `unconditioned` is False."""
    out = [(arm_name(system, c, w, contrast), c, w) for w in weights for c in ("low", "high")]
    return out + ([(f"{system}/none", None, None)] if unconditioned else [])


def verdicts(report: dict, systems: list[str], weights: list[float], contrast: str = "opposite") -> dict[str, dict]:
    """Per system and guidance weight: low's median below high's, and low's within-0.1 share >= 1.5x high's."""
    out = {}
    for system, w in ((s, w) for s in systems for w in weights):
        low, high = (report["conditions"][arm_name(system, c, w, contrast)] for c in ("low", "high"))
        m_low, m_high = low["median_e_above_hull"], high["median_e_above_hull"]
        s_low, s_high = low["within_0.1_of_scored"], high["within_0.1_of_scored"]
        out[arm_name(system, "low/high", w, contrast)] = {"lower_median": None if m_low is None or m_high is None else m_low < m_high,
                       "share_ratio": None if not s_high or s_low is None else s_low / s_high,
                       "share_1.5x": None if s_low is None or s_high is None else s_low > 0 and s_low >= 1.5 * s_high}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    screening.add_arguments(p, 50, "samples per system and class")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), help="chemical systems, elements joined by '-'")
    p.add_argument("--guidance", type=float, nargs="+", metavar="W",
                   help="classifier-free guidance weights of the stability token (SamplingConfig.guidance): "
                        "low and high are drawn at each (default: the model's recommended weight, its "
                        "sampling_config.json, else 1: off)")
    p.add_argument("--guidance-contrast", choices=GUIDANCE_CONTRASTS,
                   help="stability token of the guidance's contrast sequence (SamplingConfig.guidance_contrast; "
                        "default: the model's); 'unknown' needs a model trained with stability_dropout")
    p.add_argument("--no-unconditioned", action="store_true",
                   help="skip the `none` arm (it is context, not part of the verdict; a third of the relaxations)")
    args = p.parse_args()
    recommended = SamplingConfig.from_pretrained(resolve_model_path(args.model))
    args.guidance = args.guidance or [recommended.guidance]
    contrast = args.guidance_contrast = args.guidance_contrast or recommended.guidance_contrast
    conditions = [screening.Condition(name, tuple(system.split("-")), ehull, w, None if w is None else contrast)
                  for system in args.systems
                  for name, ehull, w in arms(system, args.guidance, contrast, not args.no_unconditioned)]
    report = screening.run_from_args(args, "conditioning", conditions, systems=args.systems, guidance=args.guidance,
                                     guidance_contrast=contrast)
    report["verdicts"] = verdicts(report, args.systems, args.guidance, contrast)
    print(screening.table(report))
    print()
    print("| system / guidance | low median < high median | within-0.1 share low / high | >= 1.5x |")
    print("| --- | --- | --- | --- |")
    for system, v in report["verdicts"].items():
        if v["share_ratio"] is not None:
            ratio = f"{v['share_ratio']:.2f}"
        else:
            ratio = "high has none" if v["share_1.5x"] else ""
        print(f"| {system} | {v['lower_median']} | {ratio} | {v['share_1.5x']} |")
    screening.emit(report, args.out)


if __name__ == "__main__":
    main()
