"""Exact conditioning: a formula, a Wyckoff prototype or a sequence prompt is in every sample, also
from a random-weight model (the grammar guarantees it, not training); bad specs are one-line errors."""
from __future__ import annotations

import importlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scripts import load_script

from wyckoffgpt.grammar import Conditions, Limits, SequenceParser, check_conditions
from wyckoffgpt.vocab import default_vocab

VOCAB = default_vocab()


@pytest.fixture(scope="module")
def generator(model_dir):
    from wyckoffgpt import CrystalGenerator

    return CrystalGenerator.from_pretrained(model_dir, device="cpu")


def cell_counts(parser: SequenceParser) -> Counter:
    counts = Counter()
    for site in parser.sites:
        counts[site.element] += site.position.multiplicity
    return counts


def random_walk(rng: np.random.Generator, limits: Limits, cond: Conditions) -> SequenceParser:
    """Uniform choice among allowed tokens: finds any dead end the grammar leaves."""
    parser = SequenceParser(VOCAB, limits, cond)
    while not parser.done:
        allowed = np.flatnonzero(parser.allowed_mask())
        assert len(allowed), f"dead end after {len(parser.sites)} sites in sg {parser.group and parser.group.number}"
        tok = int(rng.choice(allowed))
        val = math.nan
        if tok in VOCAB.value_ids:
            lo, hi = parser.value_bounds(tok)
            val = float(rng.uniform(lo, min(hi, 1.0 if VOCAB.tokens[tok] in "xyz" else 15.0)))
        parser.feed(tok, val)
    return parser


FORMULAS = [  # (elements by Z, atoms per formula unit, formula units, limits)
    (("Al", "Ca", "Cu"), (1, 2, 2), None, Limits()),
    (("Al", "Ca", "Cu"), (1, 2, 2), (1, 2, 4), Limits()),
    (("O", "Ti", "Sr"), (3, 1, 1), None, Limits(6, 40)),
    (("Li", "O", "P", "Fe"), (1, 4, 1, 1), (1, 2), Limits(8, 28)),
    (("Si",), (1,), (3,), Limits(2, 3)),
]


@pytest.mark.parametrize("case", FORMULAS, ids=lambda c: "".join(f"{e}{n}" for e, n in zip(c[0], c[1])) + str(c[3]))
def test_grammar_random_walks_hit_the_formula_exactly_and_never_dead_end(case):
    elements, formula, units, limits = case
    cond = Conditions(None, elements, None, formula, units)
    check_conditions(VOCAB, cond, limits)
    rng = np.random.default_rng(0)
    for _ in range(60):
        parser = random_walk(rng, limits, cond)
        counts = cell_counts(parser)
        k = counts[elements[0]] // formula[0]
        assert [counts[e] for e in elements] == [k * n for n in formula]
        assert units is None or k in units
        assert sum(counts.values()) <= limits.max_atoms and len(parser.sites) <= limits.max_sites


def test_formula_no_space_group_can_hold_is_rejected():
    cond = Conditions(None, ("Al", "Ca", "Cu"), None, (1, 2, 2), (1,))
    with pytest.raises(ValueError, match="cannot hold Ca2AlCu2"):
        check_conditions(VOCAB, Conditions(None, cond.elements, 225, cond.formula, (1,)))  # 4a is 225's smallest
    with pytest.raises(ValueError, match="does not fit"):
        check_conditions(VOCAB, cond, Limits(24, 4))


def test_generated_samples_all_have_exactly_the_formula_with_a_random_model(generator):
    for formula, units in (("Ca2AlCu2", (1, 2)), ("SrTiO3", (1, 2)), ("Fe2O3", None)):
        results = generator.generate(12, formula=formula, formula_units=units, seed=1, check_unique=False)
        assert len(results) == 12
        assert all(r.structure is not None for r in results)
        assert {r.structure.composition.reduced_formula for r in results} == {formula}
        if units:
            ratio = {r.structure.composition.get_reduced_formula_and_factor()[1] for r in results}
            assert ratio <= set(units)


def test_wyckoff_sites_are_forced_verbatim(generator):
    results = generator.generate(6, wyckoff="225: Na 4a, Cl 4b", seed=0, check_unique=False, charge_check="off")
    for r in results:
        text = str(r.sequence)
        assert " sg:225 w22a Na w22b Cl a=" in text  # the forced sites and nothing else, then the cell
        assert r.structure.composition.reduced_formula == "NaCl"
    results = generator.generate(12, wyckoff="225: Na 4a, Cl 24e", complete_sites=True, seed=0, check_unique=False,
                                 charge_check="off")
    extra = 0
    for r in results:
        sites = [t for t in r.sequence.tokens if t.startswith("w")]
        tokens = r.sequence.tokens
        pairs = [(tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1) if tokens[i].startswith("w")]
        group = VOCAB.group(225)
        assert (group.by_letter["a"].orbit, "Na") in pairs and (group.by_letter["e"].orbit, "Cl") in pairs
        assert set(r.structure.composition.chemical_system.split("-")) == {"Na", "Cl"}
        extra += len(sites) > 2
    assert extra  # the random model does add sites when allowed


def test_prompt_is_continued_verbatim(generator):
    prompt = "<bos> ehull:low n:2 Na Cl sg:225 w22a Na w225k Cl x=0.25 z=0.125"
    results = generator.generate(5, prompt=prompt, seed=0, check_unique=False, charge_check="off")
    for r in results:
        assert str(r.sequence).startswith(prompt + " ")
        assert r.sequence.tokens[-1] == "<eos>"


def test_analogue_samples_are_substituted_back_into_the_requested_system(generator):
    from wyckoffgpt.analogues import analogue_slot
    from wyckoffgpt.generation import InputError

    results = generator.generate(16, elements=["Al", "Ca", "Cu"], ehull="low", seed=0, analogues=2,
                                 check_unique=False)
    assert all(set(r.structure.composition.chemical_system.split("-")) == {"Al", "Ca", "Cu"} for r in results)
    assert all(r.sequence.tokens[:6] == ["<bos>", "ehull:low", "n:3", "Al", "Ca", "Cu"] for r in results)
    drawn_here = [i for i in range(16) if analogue_slot(i, 0.5, 12) is None]
    assert drawn_here == list(range(0, 16, 2))  # share 0.5: every other sample
    # A cap of 2 per analogue: the 12 analogues' first two rounds take 24 of the odd indices, the rest are plain.
    capped = [analogue_slot(i, 0.5, 12, repeats=2) for i in range(60)]
    assert [capped.count(j) for j in range(12)] == [2] * 12 and capped[:4] == [None, 0, None, 1]
    assert all(slot is None for slot in capped[48:])
    with pytest.raises(InputError, match="analogue repeats must be a positive integer"):
        generator.generate(4, elements=["Al", "Ca", "Cu"], analogues=2, analogue_repeats=0)
    with pytest.raises(InputError, match="3 analogue substitutions in a system of 2 elements"):
        generator.generate(4, elements=["Al", "Cu"], analogues=2, analogue_source="known", analogue_substitutions=3)
    formula = generator.generate(8, formula="Ca2AlCu2", seed=1, analogues=2, check_unique=False)
    assert {r.structure.composition.reduced_formula for r in formula} == {"Ca2AlCu2"}


def _knows_a_half_heusler(model_dir, tmp_path):
    """A copy of the random model whose training crystals are a half-Heusler of the first analogue
    system of Al-Cu-Li, twice: (generator, that analogue, the crystal, its sequence)."""
    import shutil

    from pymatgen.core import Lattice, Structure

    from wyckoffgpt import CrystalGenerator
    from wyckoffgpt.analogues import analogue_conditions
    from wyckoffgpt.data import write_dataset
    from wyckoffgpt.fingerprints import build_fingerprint_index
    from wyckoffgpt.tokenizer import CrystalTokenizer

    neighbour = analogue_conditions(Conditions("ehull:low", ("Li", "Al", "Cu")), 1, VOCAB)[0]
    trio = [neighbour.by if e == neighbour.replaced else e for e in ("Al", "Cu", "Li")]
    crystal = Structure.from_spacegroup("F-43m", Lattice.cubic(6.0), trio, [[0, 0, 0], [0.25, 0.25, 0.25], [0.5, 0.5, 0.5]])
    seq = CrystalTokenizer().encode(crystal, 0.0)
    data = tmp_path / "data"
    write_dataset(data, {"train": [(seq.ids, seq.values)] * 2}, {**VOCAB.model_fields(), "material_ids": {"train": ["n-1", "n-2"]}})
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    build_fingerprint_index(data, folder / "fingerprints.npz")
    return CrystalGenerator.from_pretrained(folder, device="cpu"), neighbour, crystal, seq


def test_known_analogues_force_the_neighbours_training_skeletons_substituted_back(model_dir, tmp_path):
    from wyckoffgpt import CrystalGenerator
    from wyckoffgpt.generation import InputError
    from wyckoffgpt.sampling import SamplingConfig

    gen, neighbour, _, seq = _knows_a_half_heusler(model_dir, tmp_path)
    known = SamplingConfig(analogues=1, analogue_source="known")
    skeletons = gen.analogues(gen.conditions(["Al", "Cu", "Li"], "low"), known)
    back = {neighbour.by: neighbour.replaced}
    expected = (216, tuple(sorted((site.position.letter, back.get(site.element, site.element))
                                  for site in gen.tokenizer.parse(seq).sites)))
    assert {e for _, e in expected[1]} == {"Al", "Cu", "Li"}
    # One skeleton however often it occurs.
    assert [(a.conditions.spacegroup, a.conditions.sites) for a in skeletons] == [expected]
    results = gen.generate(8, elements=["Al", "Cu", "Li"], ehull="low", seed=0, config=known, check_unique=False)
    assert all(set(r.structure.composition.chemical_system.split("-")) == {"Al", "Cu", "Li"} for r in results)
    # Every other sample forces the skeleton (its forced prompt is longer than the plain rows' in the
    # same batch); the model drew the cell.
    def skeleton(r):
        desc = gen.tokenizer.parse(r.sequence)
        return desc.group.number, sorted((site.position.letter, site.element) for site in desc.sites)

    assert all(skeleton(r) == (216, list(expected[1])) for r in results[1::2])
    assert any(skeleton(r)[0] != 216 for r in results[0::2])
    # A model folder without training crystals: one clear error at the call.
    with pytest.raises(InputError, match="known analogues need the model's training crystals"):
        CrystalGenerator.from_pretrained(model_dir, device="cpu").generate(2, elements=["Al", "Cu", "Li"], config=known)


def test_templates_put_the_neighbours_own_crystal_first_and_change_no_drawn_sample(model_dir, tmp_path):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from wyckoffgpt.generation import InputError
    from wyckoffgpt.sampling import SamplingConfig

    gen, neighbour, crystal, _ = _knows_a_half_heusler(model_dir, tmp_path)
    known = SamplingConfig(analogues=1, analogue_source="known", seed=3)
    drawn = gen.generate(8, elements=["Al", "Cu", "Li"], ehull="low", config=known, check_unique=False)
    templated = gen.generate(8, elements=["Al", "Cu", "Li"], ehull="low", config=known.replace(analogue_templates=True),
                             check_unique=False)
    # The one skeleton's first sample (index 1) is the training crystal with the element put back,
    # its cell and coordinates as they were; every other sample is the model's, as without templates.
    assert [i for i, r in enumerate(templated) if "template" in r.flags] == [1]
    substituted = crystal.copy()
    substituted.replace_species({neighbour.by: neighbour.replaced})
    first = templated[1].structure
    assert first.composition == substituted.composition and first.lattice.abc == pytest.approx(substituted.lattice.abc)
    assert StructureMatcher(scale=False).fit(first, substituted) and templated[1].sequence.tokens[1] == "ehull:low"
    assert all(a.sequence == b.sequence for k, (a, b) in enumerate(zip(drawn, templated)) if k != 1)
    with pytest.raises(InputError, match="analogue templates need the known analogue source"):
        SamplingConfig(analogues=1, analogue_templates=True)


def test_two_substitutions_add_the_skeletons_of_systems_two_elements_away_ranked_after_one(tmp_path):
    from pymatgen.core import Lattice, Structure

    from wyckoffgpt.analogues import known_skeletons, nearest_elements, substituted_systems
    from wyckoffgpt.data import write_dataset
    from wyckoffgpt.fingerprints import FingerprintIndex, build_fingerprint_index
    from wyckoffgpt.generation import InputError
    from wyckoffgpt.sampling import SamplingConfig
    from wyckoffgpt.tokenizer import CrystalTokenizer

    elements = ("Li", "Al", "Cu")
    systems = list(substituted_systems(elements, 2, VOCAB, substitutions=2))
    assert len(systems) == 3 * 2 + 3 * 2 * 2  # one of three replaced (2 choices), or two of them (2 x 2)
    for rank, back, system in systems:
        assert len(set(system) - set(elements)) == len(back) and set(back.values()) <= set(elements)
        assert (rank < 2) == (len(back) == 1)  # every one-element replacement ranks first
    # The only training crystal: a half-Heusler with Li and Al both replaced by their nearest elements.
    far = {e: nearest_elements(e, [c for c in VOCAB.element_ids if c not in elements], 1)[0] for e in ("Li", "Al")}
    trio = [far.get(e, e) for e in ("Al", "Cu", "Li")]
    crystal = Structure.from_spacegroup("F-43m", Lattice.cubic(6.0), trio, [[0, 0, 0], [0.25, 0.25, 0.25], [0.5, 0.5, 0.5]])
    seq = CrystalTokenizer().encode(crystal, 0.0)
    write_dataset(tmp_path / "data", {"train": [(seq.ids, seq.values)]}, {**VOCAB.model_fields(), "material_ids": {"train": ["n-1"]}})
    index = FingerprintIndex.load(build_fingerprint_index(tmp_path / "data", tmp_path / "fp.npz"), VOCAB)
    cond = Conditions("ehull:low", tuple(VOCAB.by_z(elements)))
    assert known_skeletons(cond, 2, index) == []  # one element away: nothing known
    (found,) = known_skeletons(cond, 2, index, substitutions=2)
    assert found.conditions.spacegroup == 216 and {e for _, e in found.conditions.sites} == set(elements)
    with pytest.raises(InputError, match="need the known analogue source"):
        SamplingConfig(analogues=2, analogue_substitutions=2)


def test_analogue_systems_are_one_element_away_and_nearest_in_mendeleev_number(generator):
    from wyckoffgpt.sampling import SamplingConfig

    found = generator.analogues(generator.conditions(["Al", "Cu", "Gd"], "low"), SamplingConfig(analogues=2))
    assert len(found) == 6
    assert {(a.replaced, a.by) for a in found if a.replaced == "Gd"} == {("Gd", "Tb"), ("Gd", "Sm")}
    for a in found:
        assert len(set(a.conditions.elements) & {"Al", "Cu", "Gd"}) == 2 and a.by in a.conditions.elements


BAD = {
    "formula unparseable": ({"formula": "Ca2AlCu2x"}, "not a chemical formula"),
    "formula unknown element": ({"formula": "Xx2O"}, "unknown element"),
    "formula impossible": ({"formula": "Ca2AlCu2", "formula_units": [1], "spacegroup": 225}, "cannot hold"),
    "formula units not integers": ({"formula": "NaCl", "formula_units": ["two"]}, "positive integers"),
    "wyckoff malformed": ({"wyckoff": "225 Na 4a"}, "expected '<space group>:"),
    "wyckoff bad site": ({"wyckoff": "225: Na 4a Cl 4b"}, "is not '<element> <position>'"),
    "wyckoff unknown position": ({"wyckoff": "225: Na 4q"}, "has no position 'q'"),
    "wyckoff wrong multiplicity": ({"wyckoff": "225: Na 8a"}, "multiplicity 4"),
    "wyckoff fixed twice": ({"wyckoff": "225: Na 4a, Cl 4a"}, "one site only"),
    "analogues without a system": ({"analogues": 2}, "analogues need a chemical system"),
    "analogues with a prompt": ({"analogues": 2, "elements": ["Na", "Cl"], "prompt": "<bos> ehull:low n:2 Na Cl"},
                                "analogues need a chemical system"),
    "prompt ungrammatical": ({"prompt": "<bos> ehull:low n:2 Cl Na"}, "increasing atomic number"),
    "prompt unknown token": ({"prompt": "<bos> ehull:low n:1 Zz"}, "unknown token"),
    "prompt against conditions": ({"prompt": "<bos> ehull:low n:1 Na", "elements": ["Cl"]}, "cannot be completed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_conditioning_raises_at_call_time(name, generator):
    from wyckoffgpt.generation import InputError

    kwargs, expected = BAD[name]
    with pytest.raises(InputError, match=expected):
        generator.iter_generate(3, **kwargs)  # no next(): the call itself checks




def test_cli_formula_writes_only_that_formula(model_dir, tmp_path, capsys):
    from pymatgen.core import Structure

    out = tmp_path / "out"
    code = load_script("generate.py").main(["--model", str(model_dir), "--out", str(out), "--formula", "Ca2AlCu2",
                            "--formula-units", "1,2", "-n", "6", "--seed", "0"])
    capsys.readouterr()
    assert code == 0
    files = sorted(out.glob("*/*.cif"))  # in shards
    assert files
    assert {Structure.from_file(f).composition.reduced_formula for f in files} == {"Ca2AlCu2"}


def test_csp_summary_counts_first_candidate_for_k1_and_best_match_for_k():
    csp = load_script("benchmarks/csp.py")
    rows = [{"rms": [None, 0.2, 0.1], "seconds": 1.0, "match_seconds": 0.1, "valid": 3, "formula_exact": True},
            {"rms": [0.3, None, None], "seconds": 3.0, "match_seconds": 0.1, "valid": 2, "formula_exact": True},
            {"rms": [None, None, None], "seconds": 2.0, "match_seconds": 0.1, "valid": 0, "formula_exact": True}]
    s = csp.summarize(rows, 3)
    assert s["match_rate_k1"] == pytest.approx(1 / 3) and s["match_rate_k3"] == pytest.approx(2 / 3)
    assert s["rms_k1"] == pytest.approx(0.3) and s["rms_k3"] == pytest.approx((0.1 + 0.3) / 2)
    assert s["seconds_per_formula"] == pytest.approx(2.0)


def test_guided_arms_name_their_contrast_so_one_log_never_resumes_the_other(monkeypatch):
    from scripts import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # conditioning.py imports its sibling screening.py
    conditioning = load_script("benchmarks/conditioning.py")
    opposite = {name for name, *_ in conditioning.arms("Al-Ca-Cu", [1, 3])}
    unknown = {name for name, *_ in conditioning.arms("Al-Ca-Cu", [1, 3], "unknown")}
    # Unguided arms do not depend on the contrast, so they are shared; guided ones never are.
    assert opposite & unknown == {"Al-Ca-Cu/low", "Al-Ca-Cu/high", "Al-Ca-Cu/none"}
    assert {"Al-Ca-Cu/low/w3", "Al-Ca-Cu/high/w3"} <= opposite
    assert {"Al-Ca-Cu/low/w3-vs-unknown", "Al-Ca-Cu/high/w3-vs-unknown"} <= unknown
    # --no-unconditioned drops only the `none` arm, which the verdict does not use.
    assert unknown - {name for name, *_ in conditioning.arms("Al-Ca-Cu", [1, 3], "unknown", False)} == {"Al-Ca-Cu/none"}


def test_conditioning_verdict_needs_low_to_have_stable_samples_at_all(monkeypatch):
    from scripts import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    conditioning = load_script("benchmarks/conditioning.py")

    def report(low, high):
        arm = lambda median, share: {"median_e_above_hull": median, "within_0.1_of_scored": share}  # noqa: E731
        return {"conditions": {"X-Y-Z/low": arm(*low), "X-Y-Z/high": arm(*high)}}

    def verdict(low, high):
        return conditioning.verdicts(report(low, high), ["X-Y-Z"], [1.0])["X-Y-Z/low/high"]

    assert verdict((0.01, 0.6), (0.1, 0.3)) == {"lower_median": True, "share_ratio": 2.0, "share_1.5x": True}
    assert verdict((0.01, 0.4), (0.1, 0.3))["share_1.5x"] is False
    assert verdict((0.3, 0.2), (0.2, 0.0))["share_1.5x"] is True  # some stable against none
    assert verdict((0.3, 0.0), (0.2, 0.0))["share_1.5x"] is False  # none against none separates nothing


def test_stability_ranking_keeps_the_arm_s_best_scored_half_and_scores_a_perfect_ranking_auc_1(monkeypatch):
    from scripts import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ranking = load_script("benchmarks/stability_ranking.py")
    # Four samples; the model's low-vs-high log-likelihood ratio falls as e_above_hull rises.
    e = [0.0, 0.05, 0.2, 0.3]
    scored = [(x, {"low": -x, "high": 0.0, "unknown": -x / 2}) for x in e]
    low = ranking.rank_arm(scored, "low")
    assert low["within_0.1"] == 0.5
    assert low["vs_high"] == {"auc_stable": 1.0, "within_0.1_best_half": 1.0}
    # A high arm keeps the samples that look least stable: the ones a user of --ehull high asked for.
    high = ranking.rank_arm(scored, "high")
    assert high["vs_low"] == {"auc_stable": 1.0, "within_0.1_best_half": 0.0}
    # An inverted score is an AUC of 0, not of 1: the benchmark must show a wrong ranking as wrong.
    inverted = [(x, {"low": x, "high": 0.0, "unknown": 0.0}) for x in e]
    assert ranking.rank_arm(inverted, "low")["vs_high"]["auc_stable"] == 0.0


def test_a_larger_n_extends_a_screening_draw_so_a_finished_log_resumes(generator, monkeypatch):
    from scripts import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    screening = importlib.import_module("screening")
    arm = [screening.Condition("Al-Ca-Cu/low", ("Al", "Ca", "Cu"), "low")]
    k = screening.BLOCK + 2
    small = screening.draw(generator, arm, k, 1.0, 0)["Al-Ca-Cu/low"]
    large = screening.draw(generator, arm, 2 * screening.BLOCK + 1, 1.0, 0)["Al-Ca-Cu/low"]
    # Relaxing is the costly part: growing -n must keep the samples already relaxed.
    assert len(large) == 2 * screening.BLOCK + 1
    assert [str(s.sequence) for s in large[:k]] == [str(s.sequence) for s in small]


def test_several_seeds_pool_independent_draws_in_order(generator, monkeypatch):
    from scripts import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    screening = importlib.import_module("screening")
    arm = [screening.Condition("Al-Ca-Cu/low", ("Al", "Ca", "Cu"), "low")]
    n = 3
    pooled = screening.draw(generator, arm, n, 1.0, [0, 1])["Al-Ca-Cu/low"]
    alone = [screening.draw(generator, arm, n, 1.0, s)["Al-Ca-Cu/low"] for s in (0, 1)]
    # `--seed 0 1` is the runs `--seed 0` and `--seed 1` side by side: their relaxations can be pooled.
    assert [str(s.sequence) for s in pooled] == [str(s.sequence) for s in alone[0] + alone[1]]
    assert [str(s.sequence) for s in alone[0]] != [str(s.sequence) for s in alone[1]]
