"""User conditioning text -> grammar conditions: exact formulas, Wyckoff prototypes, sequence prompts.

    formula   "Ca2AlCu2"              reduced formula; the cell holds k formula units
    wyckoff   "225: Na 4a, Cl 4b"     space group, then comma-separated "<element> <position>" sites;
                                      a position is its letter with or without the multiplicity ("4a", "a")
    prompt    "<bos> ehull:low n:2 Na Cl sg:225 w22a Na"
                                      a prefix of a sequence in CrystalSequence text form (<bos> optional)

Each parser raises InputError with a one-line message naming the problem.
"""
from __future__ import annotations

import re

from pymatgen.core import Composition, Element

from .grammar import DecodeError, SequenceParser
from .tokenizer import CrystalSequence
from .vocab import Vocab


class ConditioningError(ValueError):
    """Conditioning text that cannot be used; the message says why."""


def parse_formula(text: str, vocab: Vocab) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Elements in increasing atomic number and their atoms per reduced formula unit."""
    raw = text.strip()
    if not re.fullmatch(r"(\(?[A-Z][a-z]?\d*\)?\d*)+", raw.replace(" ", "")):
        raise ConditioningError(f"formula {text!r} is not a chemical formula (e.g. Ca2AlCu2)")
    for symbol in re.findall(r"[A-Z][a-z]?", raw):
        if not Element.is_valid_symbol(symbol):
            raise ConditioningError(f"formula {text!r}: unknown element {symbol!r}")
    try:
        comp = Composition(raw)
    except (ValueError, KeyError) as e:
        raise ConditioningError(f"formula {text!r} is not a chemical formula ({e})") from None
    amounts = comp.get_el_amt_dict()
    if any(not float(n).is_integer() or n <= 0 for n in amounts.values()):
        raise ConditioningError(f"formula {text!r}: atom counts must be positive integers")
    missing = [e for e in amounts if e not in vocab.element_ids]
    if missing:
        raise ConditioningError(f"element {missing[0]} is not in the model's vocabulary")
    reduced = comp.reduced_composition.get_el_amt_dict()
    elements = tuple(vocab.by_z(reduced))
    return elements, tuple(int(reduced[e]) for e in elements)


def parse_formula_units(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4)."""
    try:
        units = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise ConditioningError(f"formula units {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not units or units[0] < 1:
        raise ConditioningError(f"formula units {text!r}: expected positive integers, e.g. 1,2,4")
    return units


def parse_wyckoff(text: str, vocab: Vocab) -> tuple[int, tuple[tuple[str, str], ...]]:
    """'225: Na 4a, Cl 4b' -> (225, (("a", "Na"), ("b", "Cl")))."""
    head, sep, body = text.partition(":")
    if not sep or not head.strip().isdigit():
        raise ConditioningError(f"Wyckoff spec {text!r}: expected '<space group>: <element> <position>, ...', "
                                f"e.g. '225: Na 4a, Cl 4b'")
    number = int(head)
    if number not in vocab.sg_ids:
        raise ConditioningError(f"Wyckoff spec {text!r}: space group {number} is not in 1-230")
    group = vocab.group(number)
    sites = []
    for part in body.split(","):
        m = re.fullmatch(r"\s*([A-Za-z]{1,2})\s+(\d*)([a-zA-Z])\s*", part)
        if not m:
            raise ConditioningError(f"Wyckoff spec {text!r}: site {part.strip()!r} is not '<element> <position>', "
                                    f"e.g. 'Na 4a'")
        symbol, mult, letter = m.group(1).capitalize(), m.group(2), m.group(3)
        if not Element.is_valid_symbol(symbol):
            raise ConditioningError(f"Wyckoff spec {text!r}: unknown element {m.group(1)!r}")
        if symbol not in vocab.element_ids:
            raise ConditioningError(f"element {symbol} is not in the model's vocabulary")
        pos = group.by_letter.get(letter)
        if pos is None:
            raise ConditioningError(f"Wyckoff spec {text!r}: space group {number} has no position {letter!r} "
                                    f"(it has {', '.join(f'{p.multiplicity}{p.letter}' for p in group.positions)})")
        if mult and int(mult) != pos.multiplicity:
            raise ConditioningError(f"Wyckoff spec {text!r}: position {letter} of space group {number} has "
                                    f"multiplicity {pos.multiplicity}, not {mult}")
        sites.append((letter, symbol))
    return number, tuple(sites)


def parse_prompt(text: str, vocab: Vocab) -> CrystalSequence:
    """A sequence prefix in CrystalSequence text form, <bos> added when missing (grammar not checked here)."""
    words = text.split()
    if words[:1] != ["<bos>"]:
        words = ["<bos>"] + words
    try:
        return CrystalSequence.from_string(" ".join(words), vocab)
    except DecodeError as e:
        raise ConditioningError(f"prompt: {e}") from None


def check_prompt(prompt: CrystalSequence, parser: SequenceParser) -> None:
    """Feed the prompt to the grammar alone, then to `parser` (fresh, with the sampling conditions
    and limits); ConditioningError naming the first bad token and why."""
    pairs = list(zip(prompt.ids.tolist(), prompt.values.tolist()))
    for check, what in ((SequenceParser(parser.vocab), "is not a valid sequence prefix"),
                        (parser, "cannot be completed under the conditions and limits")):
        try:
            for token_id, value in pairs:
                check.feed(int(token_id), value)
        except DecodeError as e:
            raise ConditioningError(f"prompt {what}: {e}") from None
