"""Which atom counts per element the Wyckoff positions of a space group can still hold.

The grammar uses this to sample an exact formula: after every site, the atoms each element still
needs must be a sum of multiplicities of the positions still available. In canonical site order
(position index, then atomic number; see grammar.py) the positions still available after a site on
position i are those after i, each fixed one (no free parameter) at most once and shared between
the elements, each repeatable one any number of times; position i itself is available again only
when it is repeatable, and only to elements of atomic number >= that site's.

`min_sites` answers with the fewest sites that complete the counts (inf: impossible), so the site
limit is checked too. The fixed positions are few per group (at most 6 of one multiplicity), so
an exact search over how many of each multiplicity each element takes is cheap; what remains per
element is an unbounded coin change over the repeatable multiplicities.
"""
from __future__ import annotations

import math
from functools import cache
from itertools import product

from .vocab import SpaceGroupTable


@cache
def _fewest_coins(denominations: tuple[int, ...], cap: int) -> tuple[float, ...]:
    """best[c]: fewest multiplicities (with repetition) from `denominations` summing to c, c <= cap."""
    best = [0.0] + [math.inf] * cap
    for c in range(1, cap + 1):
        best[c] = min((best[c - d] + 1 for d in denominations if d <= c), default=math.inf)
    return tuple(best)


class StoichiometryBudget:
    """Exact reachability of per-element atom counts on the positions of one space group."""

    def __init__(self, group: SpaceGroupTable):
        positions = group.positions  # ITA order: positions[i].index == i
        self.mults = [p.multiplicity for p in positions]
        self.repeatable = [p.repeatable for p in positions]
        n = len(positions)
        # Slot i + 1 describes what lies after a site on position i (slot 0: before any site).
        self._later_repeatable = [tuple(sorted({m for m, r in zip(self.mults[i + 1:], self.repeatable[i + 1:]) if r}))
                                  for i in range(-1, n)]
        self._later_fixed = []
        for i in range(-1, n):
            counts: dict[int, int] = {}
            for m, r in zip(self.mults[i + 1:], self.repeatable[i + 1:]):
                if not r:
                    counts[m] = counts.get(m, 0) + 1
            self._later_fixed.append(tuple(sorted(counts.items())))
        self._cache: dict[tuple, float] = {}

    def min_sites(self, after: int, last_z: int, remaining: tuple[tuple[int, int], ...]) -> float:
        """Fewest further sites that place exactly `remaining` ((Z, atoms) per element, atoms > 0)
        after a site of atomic number `last_z` on position `after` (-1, -1: before any site); inf
        when no choice of positions holds these counts."""
        key = (after, last_z, remaining)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fixed = self._later_fixed[after + 1]
        mults = [m for m, _ in fixed]
        cap = max((c for _, c in remaining), default=0)
        later = self._later_repeatable[after + 1]
        again = (self.mults[after],) if after >= 0 and self.repeatable[after] else ()
        memo: dict[tuple, float] = {}

        def best(k: int, avail: tuple[int, ...]) -> float:
            if k == len(remaining):
                return 0.0
            if (k, avail) in memo:
                return memo[(k, avail)]
            z, need = remaining[k]
            coins = _fewest_coins(tuple(sorted(set(later + (again if z >= last_z else ())))), cap)
            result = math.inf
            for use in product(*(range(min(a, need // m) + 1) for m, a in zip(mults, avail))):
                rest = need - sum(u * m for u, m in zip(use, mults))
                if rest < 0 or coins[rest] == math.inf:
                    continue
                sites = sum(use) + coins[rest]
                if sites < result:
                    result = min(result, sites + best(k + 1, tuple(a - u for a, u in zip(avail, use))))
            memo[(k, avail)] = result
            return result

        cost = best(0, tuple(a for _, a in fixed))
        self._cache[key] = cost
        return cost
