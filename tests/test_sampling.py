"""Grammar-constrained sampling: no dead ends, 100 % decodable samples, conditioning, filters, seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from random_model import save_random_model

from wyckoffgpt.decode import check_structure, min_distance, to_structure
from wyckoffgpt.duplicates import find_duplicates
from wyckoffgpt.grammar import Conditions, DecodeError, Limits, SequenceParser, check_conditions, parse
from wyckoffgpt.sampling import forced_prefix
from wyckoffgpt.vocab import default_vocab

VOCAB = default_vocab()

CONDITIONS = [
    Conditions(),
    Conditions("ehull:low"),
    Conditions(None, ("Al", "Ca", "Cu")),
    Conditions("ehull:high", ("O",), 225),
    Conditions(None, None, 2),  # triclinic: three free angles
    Conditions(None, ("H", "Li", "O", "Fe", "Cu"), 1),
]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    from wyckoffgpt import CrystalGenerator

    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    return CrystalGenerator.from_pretrained(save_random_model(tmp_path_factory.mktemp("model")), device="cpu")


def random_walk(rng: np.random.Generator, limits: Limits, cond: Conditions) -> tuple[list[int], list[float]]:
    """Uniform choice among allowed tokens, values anywhere in their bounds: the harshest sampler."""
    parser = SequenceParser(VOCAB, limits, cond)
    ids, values = [], []
    while not parser.done:
        allowed = np.flatnonzero(parser.allowed_mask())
        assert len(allowed), f"dead end after {[VOCAB.tokens[i] for i in ids]}"
        tok = int(rng.choice(allowed))
        val = math.nan
        if tok in VOCAB.value_ids:
            lo, hi = parser.value_bounds(tok)
            val = float(rng.uniform(lo, min(hi, 1.0 if VOCAB.tokens[tok] in "xyz" else 15.0)))
        parser.feed(tok, val)
        ids.append(tok)
        values.append(val)
    return ids, values


@pytest.mark.parametrize("limits", [Limits(), Limits(3, 8), Limits(1, 4)], ids=str)
def test_random_walks_never_dead_end_and_always_decode(limits):
    rng = np.random.default_rng(0)
    for cond in CONDITIONS:
        try:
            check_conditions(VOCAB, cond, limits)
        except ValueError:
            continue
        for _ in range(40):
            ids, values = random_walk(rng, limits, cond)
            desc = parse(VOCAB, ids, values)
            assert len(desc.sites) <= limits.max_sites
            assert sum(s.position.multiplicity for s in desc.sites) <= limits.max_atoms
            if cond.elements:
                assert tuple(desc.elements) == cond.elements
                assert {s.element for s in desc.sites} == set(cond.elements)
            if cond.spacegroup:
                assert desc.group.number == cond.spacegroup
            if cond.stability:
                assert desc.stability == cond.stability
            keys = [(site.position.index, VOCAB.element_z[VOCAB.element_ids[site.element]]) for site in desc.sites]
            assert keys == sorted(keys)  # canonical site order
            to_structure(desc)  # the cell always exists


def test_constrained_parser_accepts_real_sequences_and_rejects_masked_tokens(tokenizer):
    rocksalt = Structure.from_spacegroup(225, Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    seq = tokenizer.encode(rocksalt, e_above_hull=0.0)
    parser = SequenceParser(VOCAB, Limits(), Conditions("ehull:low", ("Na", "Cl"), 225))
    for tok, val in zip(seq.ids.tolist(), seq.values.tolist()):
        assert parser.allowed_mask()[tok]
        parser.feed(tok, val)
    assert parser.done
    wrong = SequenceParser(VOCAB, Limits(), Conditions("ehull:high"))
    wrong.feed(VOCAB.bos_id)
    with pytest.raises(DecodeError, match="excluded"):
        wrong.feed(VOCAB.token_to_id["ehull:low"])


def test_fixed_positions_at_most_once_and_eos_only_when_complete():
    parser = SequenceParser(VOCAB, Limits(), Conditions(None, ("Na", "Cl"), 225))
    for tok in ["<bos>", "ehull:low", "n:2", "Na", "Cl", "sg:225"]:
        parser.feed(VOCAB.token_to_id[tok])
    pos_a = VOCAB.group(225).by_letter["a"].orbit
    parser.feed(VOCAB.token_to_id[pos_a])
    parser.feed(VOCAB.token_to_id["Na"])
    mask = parser.allowed_mask()
    assert not mask[VOCAB.token_to_id[pos_a]]  # 4a has no free parameter: used up
    assert not mask[VOCAB.token_to_id["a"]]  # Cl not placed yet: no lattice, no eos
    assert not mask[VOCAB.eos_id]


def test_sites_keep_the_canonical_order_of_encoded_crystals(slice_records, tokenizer):
    # Every encoded crystal is in the order the sampler enforces (Wyckoff letter, then Z).
    for record, structure in slice_records[:120]:
        seq = tokenizer.encode(structure, record.e_above_hull)
        parser = SequenceParser(VOCAB, Limits())
        for tok, val in zip(seq.ids.tolist(), seq.values.tolist()):
            parser.feed(tok, val)  # raises if the mask excludes a token
    # O-Ti-Ba in Pm-3m. After Ti on 1b, no site on 1a (an earlier letter).
    g = VOCAB.group(221)
    parser = SequenceParser(VOCAB, Limits(), Conditions(None, ("O", "Ti", "Ba"), 221))
    for tok in ["<bos>", "ehull:low", "n:3", "O", "Ti", "Ba", "sg:221", g.by_letter["b"].orbit, "Ti"]:
        parser.feed(VOCAB.token_to_id[tok])
    assert not parser.allowed_mask()[VOCAB.token_to_id[g.by_letter["a"].orbit]]
    # Ba on the repeatable 6e, then 6e again: only elements at least as heavy as Ba may follow there
    # (O, still missing, must go to a later position).
    for tok in [g.by_letter["e"].orbit, "Ba"]:
        parser.feed(VOCAB.token_to_id[tok])
    parser.feed(VOCAB.token_to_id["x"], 0.2)
    parser.feed(VOCAB.token_to_id[g.by_letter["e"].orbit])
    mask = parser.allowed_mask()
    assert mask[VOCAB.token_to_id["Ba"]] and not mask[VOCAB.token_to_id["O"]] and not mask[VOCAB.token_to_id["Ti"]]


def test_impossible_conditions_are_refused():
    with pytest.raises(ValueError, match="cannot hold 8 elements"):
        check_conditions(VOCAB, Conditions(None, ("H", "Li", "Be", "B", "C", "N", "O", "F"), 230), Limits(24, 160))
    with pytest.raises(ValueError, match="not in 1-230"):
        check_conditions(VOCAB, Conditions(spacegroup=231))
    with pytest.raises(ValueError, match="increasing atomic number"):
        check_conditions(VOCAB, Conditions(elements=("O", "H")))


@pytest.mark.parametrize("kwargs", [
    {},
    {"elements": ["Cu", "al", "Ca"], "ehull": "low"},
    {"ehull": "high", "spacegroup": 194},
    {"elements": ["Si", "O"], "spacegroup": 1},
], ids=["unconditional", "elements", "ehull+sg", "triclinic"])
def test_random_model_samples_all_decode(generator, kwargs):
    results = generator.generate(24, seed=1, batch_size=12, check_unique=False, **kwargs)
    assert len(results) == 24
    assert all(r.structure is not None for r in results), [r.error for r in results if r.error]
    for r in results:
        if "elements" in kwargs:
            expected = {e.capitalize() for e in kwargs["elements"]}
            assert {el.symbol for el in r.structure.composition.elements} == expected
        if "spacegroup" in kwargs:
            assert r.spacegroup == kwargs["spacegroup"]
        if "ehull" in kwargs:
            assert r.sequence.tokens[1] == f"ehull:{kwargs['ehull']}"
        assert ("too_close" in r.flags) == (r.min_distance < 0.7)


def test_same_seed_same_samples_and_cache_matches_recompute(generator):
    from wyckoffgpt.sampling import Sampler

    a = generator.generate(6, seed=7, batch_size=6, check_unique=False)
    b = generator.generate(6, seed=7, batch_size=6, check_unique=False)
    c = generator.generate(6, seed=8, batch_size=6, check_unique=False)
    assert [x.sequence for x in a] == [x.sequence for x in b]
    assert [x.sequence for x in a] != [x.sequence for x in c]
    runs = []
    for use_cache in (True, False):
        parsers = [SequenceParser(VOCAB, Limits(6, 40)) for _ in range(4)]
        runs.append(Sampler(generator.model, use_cache=use_cache, min_distance=0, charge_check="off").sample(
            parsers, generator=torch.Generator().manual_seed(3)))
    for ids_a, ids_b in zip(runs[0].ids, runs[1].ids):
        assert np.array_equal(ids_a, ids_b)


def test_a_sampling_config_and_keyword_overrides_give_the_same_samples(generator):
    from wyckoffgpt.sampling import SamplingConfig

    config = SamplingConfig(temperature=0.8, top_p=0.95, batch_size=4, seed=2, charge_check="off")
    by_config = generator.generate(6, config=config, check_unique=False)
    by_keywords = generator.generate(6, temperature=0.8, top_p=0.95, batch_size=4, seed=2, charge_check="off",
                                     check_unique=False)
    overridden = generator.generate(6, config=config.replace(temperature=1.0), temperature=0.8, check_unique=False)
    assert [str(r.sequence) for r in by_config] == [str(r.sequence) for r in by_keywords] == \
        [str(r.sequence) for r in overridden]
    assert all(r.temperature == 0.8 for r in by_config)
    with pytest.raises(TypeError, match="temprature"):
        generator.generate(2, temprature=0.8)


@pytest.mark.parametrize("bad, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"batch_size": 2.5}, "batch size must be a positive integer"),
    ({"seed": 2**63}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"min_distance": -1}, "minimum distance must be a finite number of Å >= 0"),
    ({"max_retries": True}, "max_retries must be a non-negative integer"),
    ({"charge_check": "strict"}, "charge check must be one of ionic, smact, off"),
    ({"symprec": 0}, "symprec must be a finite number of Å > 0"),
    ({"guidance": -1}, "guidance must be a finite number >= 0"),
    ({"guidance_contrast": "none"}, "guidance contrast must be one of opposite, unknown"),
])
def test_sampling_config_names_each_bad_setting(bad, message):
    from wyckoffgpt.sampling import SamplingConfig
    from wyckoffgpt.structure_io import InputError

    with pytest.raises(InputError, match=message):
        SamplingConfig(**bad)
    with pytest.raises(InputError, match=message):
        SamplingConfig().replace(**bad)  # a changed copy is checked too


def test_top_p_and_temperature(generator):
    from wyckoffgpt.generation import InputError

    results = generator.generate(4, seed=0, temperature=0.5, top_p=0.9, check_unique=False)
    assert all(r.structure is not None for r in results)
    with pytest.raises(InputError):
        generator.generate(4, temperature=0.0)


def test_min_distance_includes_own_images_and_coincident_atoms():
    rocksalt = Structure.from_spacegroup(225, Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert min_distance(rocksalt) == pytest.approx(2.82)
    # One atom in a skewed cell: its nearest image is along a - b (1.0 Å), shorter than a, b and c.
    lone = Structure(Lattice.from_parameters(5.0, 5.0, 6.0, 90, 90, 11.478), ["Fe"], [[0, 0, 0]])
    assert min_distance(lone) == pytest.approx(1.0, abs=1e-3)
    overlapping = Structure(Lattice.cubic(4.0), ["Fe", "Fe"], [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    assert min_distance(overlapping) == 0.0
    across_boundary = Structure(Lattice.cubic(4.0), ["Fe", "Fe"], [[0.01, 0.5, 0.5], [0.99, 0.5, 0.5]])
    assert min_distance(across_boundary) == pytest.approx(0.08)
    check = check_structure(across_boundary, 221)
    assert "too_close" in check.flags
    check = check_structure(rocksalt, 225)
    assert check.flags == [] and check.detected_spacegroup == 225
    assert check_structure(rocksalt, 221).flags == ["spacegroup_mismatch"]


def test_duplicates_found_by_structure_matching():
    a = Structure.from_spacegroup(225, Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    b = a.copy()
    b.translate_sites(list(range(len(b))), [0.1, 0.2, 0.3])
    c = Structure.from_spacegroup(221, Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert find_duplicates([a, None, c, b]) == [None, None, None, 0]


def _parsed(text: str):
    from wyckoffgpt import CrystalSequence

    seq = CrystalSequence.from_string(text)
    return parse(default_vocab(), seq.ids, seq.values)


def test_separating_length_is_the_smallest_clash_free_cell_length():
    from wyckoffgpt.decode import separating_length

    # Rock salt squeezed to a = 2 Å: Na-Cl at a/2 = 1 Å. The clash-free a for 1.2 Å is 2.4 Å exactly.
    desc = _parsed("<bos> ehull:low n:2 Na Cl sg:225 w22a Na w22b Cl a=2.0 <eos>")
    floor = separating_length(desc.group, desc.sites, desc.lattice, "a", 1.2)
    assert floor == pytest.approx(2.4)
    # Tetragonal: two atoms stacked along c clash; c lifts them apart, and the returned c is minimal.
    axis = default_vocab().group(99).by_letter["a"].orbit  # (0, 0, z) of P4mm
    desc = _parsed(f"<bos> ehull:low n:1 Cu sg:99 {axis} Cu z=0.0 {axis} Cu z=0.1 a=3.0 c=3.0 <eos>")
    c = separating_length(desc.group, desc.sites, desc.lattice, "c", 0.7)
    stretched = to_structure(desc)
    assert c == pytest.approx(7.0, rel=1e-3)
    assert min_distance(Structure(Lattice.tetragonal(3.0, c * 1.0001), stretched.species, stretched.frac_coords)) >= 0.7
    assert min_distance(Structure(Lattice.tetragonal(3.0, c * 0.99), stretched.species, stretched.frac_coords)) < 0.7
    # Two atoms on the same c axis line at the same height: no c can separate them.
    desc = _parsed(f"<bos> ehull:low n:1 Cu sg:99 {axis} Cu z=0.3 {axis} Cu z=0.3 a=3.0 c=3.0 <eos>")
    assert separating_length(desc.group, desc.sites, desc.lattice, "c", 0.7) is None


def _fed_parser(text: str) -> SequenceParser:
    from wyckoffgpt import CrystalSequence

    seq = CrystalSequence.from_string(text)
    parser = SequenceParser(VOCAB)
    for t, v in zip(seq.ids.tolist(), seq.values.tolist()):
        parser.feed(t, v)
    return parser


def test_clashing_sample_resumes_at_the_site_that_completes_the_clash():
    from wyckoffgpt.decode import close_pairs
    from wyckoffgpt.sampling import resume_point

    axis = VOCAB.group(99).by_letter["a"].orbit  # (0, 0, z) of P4mm
    # Sites 0 and 2 sit 0.3 Å apart; site 1 is far from both: resample from site 2 (token 11).
    p = _fed_parser(f"<bos> ehull:low n:1 Cu sg:99 {axis} Cu z=0.0 {axis} Cu z=0.5 {axis} Cu z=0.05 a=3.0 c=6.0 <eos>")
    assert p.site_starts == [5, 8, 11] and p.lattice_start == 14
    assert close_pairs(to_structure(p.description()), 0.7).tolist() == [[0, 2]]
    assert resume_point(p, 0.7) == 11
    assert resume_point(p, 0.2) is None  # 0.3 Å apart: no clash below that threshold
    # A cell shorter than the threshold clashes every atom with its own image: only the lattice goes.
    p = _fed_parser(f"<bos> ehull:low n:1 Cu sg:99 {axis} Cu z=0.0 a=0.5 c=6.0 <eos>")
    assert resume_point(p, 0.7) == p.lattice_start


def test_retries_resample_clashing_rows_and_keep_cache_equal_to_recompute(generator):
    from wyckoffgpt.sampling import Sampler

    runs = []
    for use_cache in (True, False):
        parsers = [SequenceParser(VOCAB, Limits(6, 40)) for _ in range(12)]
        runs.append(Sampler(generator.model, use_cache=use_cache, max_retries=3, charge_check="off").sample(
            parsers, generator=torch.Generator().manual_seed(5)))
    # Resampled rows run left-padded in later rounds; with the cache they must match full recomputation.
    assert runs[0].retries == runs[1].retries and sum(runs[0].retries) > 0
    for ids_a, ids_b in zip(runs[0].ids, runs[1].ids):
        assert np.array_equal(ids_a, ids_b)
    for ids, values, retries in zip(runs[0].ids, runs[0].values, runs[0].retries):
        structure = to_structure(parse(VOCAB, ids, values))
        # A row still clashing used up every retry; a row that was retried ended where it did because
        # its last attempt was clash-free or out of retries.
        assert min_distance(structure) >= 0.7 or retries == 3


def test_retries_raise_the_distance_valid_fraction(generator):
    raw = generator.generate(48, seed=3, batch_size=16, check_unique=False, max_retries=0)
    retried = generator.generate(48, seed=3, batch_size=16, check_unique=False, max_retries=4)
    assert all(r.retries == 0 for r in raw)
    assert sum(r.valid for r in retried) > sum(r.valid for r in raw)
    assert all(r.valid or r.retries == 4 for r in retried)


@pytest.mark.parametrize("check", ["ionic", "smact"])
def test_charge_check_resamples_sites_and_writes_only_crystals_that_pass(generator, check):
    from wyckoffgpt.chemistry import passes_charge_check, smact_valid

    # Li-Fe-O from a random model: many compositions are not charge-neutral as first drawn.
    kwargs = dict(elements=["Li", "Fe", "O"], seed=4, batch_size=16, check_unique=False, max_retries=4)
    plain = generator.generate(32, charge_check="off", **kwargs)
    checked = generator.generate(32, charge_check=check, **kwargs)
    assert all(r.charge_balanced == smact_valid(r.structure.composition) for r in plain + checked)
    assert not any("not_charge_balanced" in r.flags for r in plain)
    passing = [passes_charge_check(r.structure.composition, check) for r in checked]
    assert sum(passing) > sum(passes_charge_check(r.structure.composition, check) for r in plain)
    for r, ok in zip(checked, passing):
        # Written (valid) crystals pass; the rest used up their retries and are flagged.
        assert not r.valid or ok
        assert ok or ("not_charge_balanced" in r.flags and r.retries == 4)


def test_ionic_charge_check_is_the_default_and_leaves_intermetallics_alone(generator):
    from wyckoffgpt.chemistry import passes_charge_check

    kwargs = dict(seed=5, batch_size=16, check_unique=False)
    default = generator.generate(16, elements=["Li", "Fe", "O"], **kwargs)
    assert all(passes_charge_check(r.structure.composition, "ionic") for r in default if r.valid)
    # Er-Si: no anion former, so no composition is sent back, SMACT-valid or not.
    silicides = generator.generate(16, elements=["Er", "Si"], max_retries=0, **kwargs)
    assert not any("not_charge_balanced" in r.flags for r in silicides)
    with pytest.raises(ValueError, match="charge check must be one of ionic, smact, off"):
        generator.generate(1, charge_check="strict")


def test_model_saved_in_half_precision_samples_in_float32(tmp_path):
    from wyckoffgpt import CrystalGenerator, WyckoffGPTModel

    folder = save_random_model(tmp_path / "model")
    WyckoffGPTModel.from_pretrained(folder).half().save_pretrained(folder)  # e.g. shrunk after GPU training
    gen = CrystalGenerator.from_pretrained(folder, device="cpu")
    assert {p.dtype for p in gen.model.parameters()} == {torch.float32}
    assert all(r.structure is not None for r in gen.generate(8, seed=0, batch_size=8, check_unique=False))


def test_guidance_is_off_at_one_and_the_cache_matches_recompute_under_guidance(generator):
    from wyckoffgpt.sampling import Sampler

    def texts(results):
        return [str(r.sequence) for r in results]

    plain = generator.generate(6, ehull="low", seed=4, batch_size=6, check_unique=False)
    assert texts(generator.generate(6, ehull="low", seed=4, batch_size=6, guidance=1.0, check_unique=False)) == \
        texts(plain)
    guided = generator.generate(6, ehull="low", seed=4, batch_size=6, guidance=3.0, check_unique=False)
    assert texts(guided) != texts(plain)
    assert all(r.sequence.tokens[1] == "ehull:low" for r in guided)  # the contrast rows never leak out
    runs = []
    for use_cache in (True, False):
        parsers = [SequenceParser(VOCAB, Limits(6, 40), Conditions("ehull:high")) for _ in range(8)]
        runs.append(Sampler(generator.model, use_cache=use_cache, max_retries=2, charge_check="off",
                            guidance=2.5, guidance_contrast="unknown").sample(
            parsers, generator=torch.Generator().manual_seed(5)))
    # Rows leave the batch and come back for retries: the contrast half of the cache must follow.
    assert runs[0].retries == runs[1].retries
    for ids_a, ids_b in zip(runs[0].ids, runs[1].ids):
        assert np.array_equal(ids_a, ids_b)


@pytest.mark.parametrize("contrast, other", [("opposite", "ehull:high"), ("unknown", "ehull:unknown")])
def test_guided_logits_are_contrast_plus_w_times_the_difference(generator, contrast, other):
    from wyckoffgpt.sampling import Sampler, _Rows, contrast_token_map

    w = 2.5
    sampler = Sampler(generator.model, guidance=w, guidance_contrast=contrast, charge_check="off")
    parser = SequenceParser(VOCAB, Limits(), Conditions("ehull:low", ("Na", "Cl")))
    prompt = forced_prefix(parser)
    mapping = contrast_token_map(VOCAB, contrast)
    rows = _Rows([list(prompt)], [[math.nan] * len(prompt)], [parser], [0], len(prompt), None, mapping)
    live = sampler._open_round([0], rows)
    guided, _, _ = sampler._forward(live, None, mapping)
    swapped = torch.tensor([[VOCAB.tokens.index(other) if VOCAB.tokens[t] == "ehull:low" else t for t in prompt]])
    with torch.no_grad():
        cond = generator.model(live.ids, live.vals, composition=live.comp).logits[:, -1].float()
        alt = generator.model(swapped, live.vals, composition=live.comp).logits[:, -1].float()
    assert torch.allclose(guided, alt + w * (cond - alt), atol=1e-4)
    assert not torch.allclose(cond, alt)  # the stability token matters to this (random) model


@pytest.mark.parametrize("ehull, same_as", [("ehull:low", "unknown"), ("ehull:high", "opposite")])
def test_unknown_for_low_draws_low_as_against_unknown_and_high_as_against_low(generator, ehull, same_as):
    from wyckoffgpt.sampling import Sampler, contrast_token_map

    ids = {t: VOCAB.tokens.index(t) for t in ("ehull:low", "ehull:high", "ehull:unknown")}
    assert contrast_token_map(VOCAB, "unknown-for-low") == {ids["ehull:low"]: ids["ehull:unknown"],
                                                           ids["ehull:high"]: ids["ehull:low"]}

    def draw(contrast):
        parsers = [SequenceParser(VOCAB, Limits(6, 40), Conditions(ehull)) for _ in range(6)]
        sampler = Sampler(generator.model, guidance=3.0, guidance_contrast=contrast, charge_check="off")
        return [ids.tolist() for ids in sampler.sample(parsers, generator=torch.Generator().manual_seed(3)).ids]

    # The stability model's recommended setting: its `low` samples are exactly those measured against
    # ehull:unknown, its `high` ones those measured against the other class.
    assert draw("unknown-for-low") == draw(same_as)


def test_recommended_guidance_applies_to_an_asked_class_only(tmp_path):
    from wyckoffgpt import CrystalGenerator
    from wyckoffgpt.sampling import SamplingConfig

    folder = save_random_model(tmp_path / "model")
    recommended = SamplingConfig(guidance=3.0, guidance_contrast="unknown")
    assert recommended.save_pretrained(folder).read_text().strip() == \
        '{\n  "guidance": 3.0,\n  "guidance_contrast": "unknown"\n}'
    gen = CrystalGenerator.from_pretrained(folder, device="cpu")
    assert gen.sampling_defaults == recommended

    def texts(**kw):
        return [str(r.sequence) for r in gen.generate(6, seed=2, batch_size=6, check_unique=False, **kw)]

    # Asked for a class: the model's guidance, the same as passing it; a config passed replaces it.
    assert texts(ehull="low") == texts(ehull="low", config=recommended)
    assert texts(ehull="low") != texts(ehull="low", config=SamplingConfig())
    # Unconditional: the class is drawn, not asked for, and samples stay the model's own distribution.
    assert texts() == texts(config=SamplingConfig())


@pytest.mark.parametrize("dropout, init_from, refused", [
    (0.0, None, True), (0.15, None, False),
    (0.0, "bundled", False),  # fine-tuned from the bundled model, which learnt it
    (0.0, "wyckoffgpt-mp-small", True),  # fine-tuned from the bundled alternative, which never learnt it either
    (0.0, "base-with-dropout", False),  # fine-tuned from a local model that learnt it
    (0.0, "someone/hub-model", False),  # a base that cannot be looked at: not refused
])
def test_guidance_against_unknown_is_refused_for_a_model_that_never_learnt_that_token(tmp_path, dropout, init_from,
                                                                                       refused):
    import json

    from wyckoffgpt import CrystalGenerator
    from wyckoffgpt.structure_io import InputError

    if init_from == "base-with-dropout":
        base = tmp_path / "base"
        base.mkdir()
        (base / "training_summary.json").write_text(json.dumps({"train_config": {"stability_dropout": 0.15}}))
        init_from = str(base)
    folder = save_random_model(tmp_path / "model")
    (folder / "training_summary.json").write_text(
        json.dumps({"train_config": {"stability_dropout": dropout, "init_from": init_from}}))
    gen = CrystalGenerator.from_pretrained(folder, device="cpu")
    guided = {"ehull": "low", "guidance": 3.0, "guidance_contrast": "unknown", "seed": 0}
    if refused:  # neither it nor its base learnt stability_dropout: `unknown` means nothing to it
        with pytest.raises(InputError, match="stability_dropout"):
            gen.generate(2, **guided)
        with pytest.raises(InputError, match="stability_dropout"):  # its low arm is guided against unknown
            gen.generate(2, **guided | {"guidance_contrast": "unknown-for-low"})
    else:  # trained with it, fine-tuned from a model that was, or from one that cannot be looked at
        assert len(gen.generate(2, **guided)) == 2
    # Without an asked class guidance does not apply, so there is nothing to refuse.
    assert len(gen.generate(2, guidance=3.0, guidance_contrast="unknown", seed=0)) == 2
