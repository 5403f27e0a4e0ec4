"""Stability screening of crystals: CHGNet relaxation, connectivity, and energy above the data's hull.

The funnel a generated structure goes through (`assess`):

1. relaxed with CHGNet (FIRE on positions and cell, ASE's FrechetCellFilter, through CHGNet's
   `StructOptimizer`) until the largest force is below `fmax` or `max_steps` are spent; a run that
   hits the cap is `not_converged`, a cell that grew or shrank by more than `max_volume_ratio` is
   `exploded` / `collapsed`;
2. checked for connectivity: atoms closer than `bond_factor` x the sum of their covalent radii are
   bonded (periodic images included), and all atoms of the cell must form one connected network
   (the Matra-Genoa test); otherwise `disconnected`;
3. scored: formation energy per atom from the CHGNet energy minus CHGNet elemental references
   (optionally after MaterialsProject2020Compatibility corrections), and its distance to the
   convex hull of the training data (`DataHull`).

The hull: each data row gives its own formation energy and, from its MP `e_above_hull`, the energy
of MP's hull at its composition (`formation_energy_per_atom - e_above_hull`). With the elements at
0 this is MP's hull exactly at every composition the data contain; between them MP's true hull can
only be lower, so distances there are optimistic.

CHGNet is an optional extra (`pip install "wyckoffgpt[relax]"`); only the relaxation needs it, and it
is imported on first use. Elemental references and per-system hull vertices are cached on disk in
`cache_dir()`, keyed by the CHGNet version and the data file's hash.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure

from .atomic import atomic_write

INSTALL_HINT = 'CHGNet is needed for relaxation: pip install "wyckoffgpt[relax]"'
# relax_status values; only "relaxed" structures get an energy above hull.
STATUSES = ("relaxed", "not_converged", "exploded", "collapsed", "disconnected", "error")


class RelaxUnavailable(ImportError):
    """CHGNet is not installed; the message says how to install it."""


@dataclass
class RelaxConfig:
    """Settings of the relaxation and of the stability verdict.

    fmax: force threshold of convergence, eV/Å (CHGNet's and MatterGen's default 0.1).
    max_steps: FIRE steps before a run is given up as `not_converged`.
    max_volume_ratio: a relaxed cell whose volume changed by more than this factor (either way)
        is `exploded` (grew) or `collapsed` (shrank).
    bond_factor: atoms closer than this times the sum of their covalent radii (Cordero, via ASE)
        are bonded, for the connectivity test (1.5 as in the Matra-Genoa paper).
    corrections: apply MaterialsProject2020Compatibility to CHGNet energies before taking formation
        energies. Off by default: the calibration (benchmarks/stability_calibration.py, BENCHMARKS.md)
        finds CHGNet 0.3.0's energies already on the scale of the data's MP2020-corrected formation
        energies (it was trained on corrected energies), and correcting them again moves oxides far off.
    stable_threshold: e_above_hull at or below which a structure counts as stable, eV/atom.
    """

    fmax: float = 0.1
    max_steps: int = 300
    max_volume_ratio: float = 3.0
    bond_factor: float = 1.5
    corrections: bool = False
    stable_threshold: float = 0.1

    def __post_init__(self) -> None:
        if not self.fmax > 0:
            raise ValueError(f"fmax must be > 0 eV/Å, got {self.fmax}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.max_volume_ratio > 1:
            raise ValueError(f"max_volume_ratio must be > 1, got {self.max_volume_ratio}")
        if not self.bond_factor > 0:
            raise ValueError(f"bond_factor must be > 0, got {self.bond_factor}")


@dataclass
class StabilityResult:
    """What the funnel found for one structure.

    status: one of STATUSES. energy_per_atom: CHGNet energy of the relaxed cell, eV/atom (uncorrected).
    e_form_per_atom / e_above_hull: eV/atom, only for status "relaxed" (None otherwise).
    rmsd: RMS displacement from input to relaxed structure, Å (pymatgen StructureMatcher's
    normalised RMS times (V/N)^(1/3) of the relaxed cell; None when the matcher finds no match).
    connected: the connectivity test's answer (None when the relaxation failed before it)."""

    status: str
    structure: Structure | None = None
    energy_per_atom: float | None = None
    steps: int = 0
    rmsd: float | None = None
    connected: bool | None = None
    seconds: float = 0.0
    e_form_per_atom: float | None = None
    e_above_hull: float | None = None
    error: str | None = None

    @property
    def relaxed(self) -> bool:
        return self.status in ("relaxed", "disconnected")

    def to_dict(self) -> dict:
        """JSON-ready form (the structure as pymatgen's dict), e.g. one line of a resumable log."""
        from monty.json import jsanitize  # numpy scalars (CHGNet's site properties) to plain numbers

        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["structure"] = None if self.structure is None else self.structure.as_dict()
        return jsanitize(d)

    @classmethod
    def from_dict(cls, d: dict) -> StabilityResult:
        fields = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        if fields.get("structure") is not None:
            fields["structure"] = Structure.from_dict(fields["structure"])
        return cls(**fields)


# -- cache -----------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$WYCKOFFGPT_CACHE, else $XDG_CACHE_HOME/wyckoffgpt, else ~/.cache/wyckoffgpt."""
    if os.environ.get("WYCKOFFGPT_CACHE"):
        return Path(os.environ["WYCKOFFGPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wyckoffgpt"


def file_hash(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


# -- connectivity ----------------------------------------------------------------------------------

def bond_graph_components(structure: Structure, bond_factor: float = 1.5) -> int:
    """Number of connected components of the periodic bond graph folded into the cell (the number
    of zero eigenvalues of its Laplacian): atoms i, j are bonded when some periodic images of them
    are closer than bond_factor x (r_cov(i) + r_cov(j))."""
    from ase.data import covalent_radii
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(structure)
    radii = np.array([covalent_radii[site.specie.Z] for site in structure])
    cutoff = bond_factor * 2 * radii.max()
    centers, neighbors, _, distances = structure.get_neighbor_list(cutoff)
    bonded = distances < bond_factor * (radii[centers] + radii[neighbors])
    graph = coo_matrix((np.ones(bonded.sum()), (centers[bonded], neighbors[bonded])), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


def is_connected(structure: Structure, bond_factor: float = 1.5) -> bool:
    """All atoms form one connected periodic network (see bond_graph_components)."""
    return bond_graph_components(structure, bond_factor) == 1


# -- relaxation ------------------------------------------------------------------------------------

def chgnet_version() -> str:
    """'chgnet <package version>/<model version>'; RelaxUnavailable when CHGNet is not installed."""
    try:
        import chgnet
    except ImportError:
        raise RelaxUnavailable(INSTALL_HINT) from None
    return f"chgnet-{chgnet.__version__}-model-0.3.0"


@lru_cache(maxsize=1)
def _optimizer():
    try:
        from chgnet.model import CHGNet, StructOptimizer
    except ImportError:
        raise RelaxUnavailable(INSTALL_HINT) from None
    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its version and device
        model = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
        return StructOptimizer(model=model, optimizer_class="FIRE", use_device="cpu", on_isolated_atoms="ignore")


def _rmsd(before: Structure, after: Structure) -> float | None:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    rms = StructureMatcher(primitive_cell=False).get_rms_dist(before, after)
    if rms is None:
        return None
    return float(rms[0] * (after.volume / len(after)) ** (1 / 3))


def relax(structure: Structure, config: RelaxConfig | None = None, relax_cell: bool = True) -> StabilityResult:
    """Relax one structure with CHGNet and run the failure checks; never raises for a bad structure
    (its status says what went wrong). No energy above hull yet: see `score`."""
    config = config or RelaxConfig()
    optimizer = _optimizer()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = optimizer.relax(structure, fmax=config.fmax, steps=config.max_steps, relax_cell=relax_cell,
                                  verbose=False, assign_magmoms=False)
    except Exception as exc:  # CHGNet / ASE fail in many ways on absurd inputs (no neighbours, NaN)
        return StabilityResult("error", error=f"{type(exc).__name__}: {exc}"[:200],
                               seconds=time.perf_counter() - t0)
    final: Structure = out["final_structure"]
    traj = out["trajectory"]
    # The observer records the start, every step, and once more at the end.
    steps = max(len(traj.energies) - 2, 0)
    energy = float(traj.energies[-1]) / len(final)
    result = StabilityResult("relaxed", structure=final, energy_per_atom=energy, steps=steps)
    ratio = final.volume / structure.volume
    if not math.isfinite(energy) or not math.isfinite(ratio):
        result.status, result.error = "error", "non-finite energy or cell"
    elif ratio > config.max_volume_ratio:
        result.status = "exploded"
    elif ratio < 1 / config.max_volume_ratio:
        result.status = "collapsed"
    elif steps >= config.max_steps:
        result.status = "not_converged"
    else:
        result.connected = is_connected(final, config.bond_factor)
        if not result.connected:
            result.status = "disconnected"
        result.rmsd = _rmsd(structure, final)
    result.seconds = time.perf_counter() - t0
    return result


def _init_worker(parent: int) -> None:
    import threading

    import torch

    torch.set_num_threads(1)  # one process per core beats threads inside CHGNet's small graphs
    warnings.simplefilter("ignore")
    # A parent killed outright (SIGTERM, SIGKILL) never shuts the pool down: without this the workers
    # outlive it, relaxing for nobody and holding ~0.7 GB each.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int, every: float = 2.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _relax_job(args: tuple[dict, dict]) -> StabilityResult:
    structure, config = args
    result = relax(Structure.from_dict(structure), RelaxConfig(**config))
    return result


def iter_relax(structures: Sequence[Structure], config: RelaxConfig | None = None,
               workers: int | None = None) -> Iterator[tuple[int, StabilityResult]]:
    """Relax structures in `workers` processes (default: all cores, each with one torch thread),
    yielding (position, result) as each one finishes."""
    config = config or RelaxConfig()
    chgnet_version()  # fail before starting processes
    workers = max(1, min(workers or os.cpu_count() or 1, len(structures)))
    if workers == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, s in enumerate(structures):
                yield i, relax(s, config)
        finally:
            torch.set_num_threads(before)
        return
    import multiprocessing

    # spawn: the caller may hold torch/OpenMP thread pools that do not survive fork.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_relax_job, (s.as_dict(), asdict(config))): i for i, s in enumerate(structures)}
        for f in as_completed(futures):
            yield futures[f], f.result()


def relax_many(structures: Sequence[Structure], config: RelaxConfig | None = None, workers: int | None = None,
               on_finished: Callable[[int], None] | None = None) -> list[StabilityResult]:
    """`iter_relax`'s results in input order; `on_finished(1)` is called as each one ends (a
    progress bar's update)."""
    results: list[StabilityResult | None] = [None] * len(structures)
    for i, r in iter_relax(structures, config, workers):
        results[i] = r
        if on_finished:
            on_finished(1)
    return results  # type: ignore[return-value]


# -- the data's hull -------------------------------------------------------------------------------

ON_HULL = 1e-6  # eV/atom: a row this close to MP's hull is on it


@dataclass
class DataHull:
    """Formation energies (eV/atom) at compositions, from a Materials Project CSV: each row's own
    energy and MP's hull energy at its composition. `ids` name the rows so that a row can be left
    out (a material is never on the reference hull of its own estimate)."""

    formulas: list[str]
    e_form: np.ndarray  # formation_energy_per_atom
    e_hull: np.ndarray  # formation_energy_per_atom - e_above_hull: MP's hull at this composition
    ids: list[str] = field(default_factory=list)
    source_hash: str = ""

    def __post_init__(self) -> None:
        self._elements = [frozenset(Composition(f).chemical_system.split("-")) for f in self.formulas]

    @classmethod
    def from_csv(cls, path: str | os.PathLike, use_cache: bool = True) -> DataHull:
        """Read `material_id, formula, e_above_hull, formation_energy_per_atom` (the data's columns);
        the table is cached by the file's hash (reading the CSV with its CIFs takes seconds)."""
        digest = file_hash(path)
        cached = cache_dir() / f"hull-table-{digest}.json"
        table = _read_json(cached) if use_cache else {}
        if not table:
            import pandas as pd

            df = pd.read_csv(path, usecols=["material_id", "formula", "e_above_hull", "formation_energy_per_atom"],
                             dtype={"material_id": str})
            df = df.dropna()
            table = {"ids": df.material_id.tolist(), "formulas": df.formula.tolist(),
                     "e_form": df.formation_energy_per_atom.tolist(),
                     "e_above_hull": df.e_above_hull.tolist()}
            if use_cache:
                _write_json(cached, table)
        e_form = np.asarray(table["e_form"], dtype=float)
        return cls(table["formulas"], e_form, e_form - np.asarray(table["e_above_hull"], dtype=float),
                   table["ids"], digest)

    def row(self, material_id: str) -> int:
        return self.ids.index(material_id)

    def entries(self, elements: Iterable[str], exclude: Iterable[int] = (), strict: bool = False) -> list:
        """PDEntries of the chemical system (every row whose elements are a subset of `elements`,
        each as its own energy and as MP's hull point), with the elements at 0.

        Rows `exclude` are the material being estimated: its own energy is left out, and so is its
        hull point when that is the material itself (e_above_hull 0); an unstable row's hull point
        stands for other materials (MP's ground state or decomposition at that composition) and
        stays, unless `strict` (then nothing of the row is used: what MP knows about that
        composition from elsewhere is lost too)."""
        from pymatgen.analysis.phase_diagram import PDEntry

        system = frozenset(elements)
        skip = set(exclude)
        out = [PDEntry(Composition(el), 0.0, name=el) for el in sorted(system)]
        for i, els in enumerate(self._elements):
            if not els <= system:
                continue
            comp = Composition(self.formulas[i])
            n = comp.num_atoms
            if i not in skip:
                out.append(PDEntry(comp, float(self.e_form[i]) * n, name=self.formulas[i]))
            if i not in skip or (not strict and self.e_form[i] - self.e_hull[i] > ON_HULL):
                out.append(PDEntry(comp, float(self.e_hull[i]) * n, name=f"hull:{self.formulas[i]}"))
        return out

    def phase_diagram(self, elements: Iterable[str], exclude: Iterable[int] = (), strict: bool = False):
        """pymatgen PhaseDiagram of the system (see `entries`); without `exclude` its vertices are
        cached on disk."""
        from pymatgen.analysis.phase_diagram import PhaseDiagram

        system = tuple(sorted(set(elements)))
        exclude = tuple(sorted(set(exclude)))
        if exclude:
            return PhaseDiagram(self.entries(system, exclude, strict))
        return _cached_phase_diagram(self, system)

    def e_above_hull(self, composition: Composition | str, e_form_per_atom: float, exclude: Iterable[int] = (),
                     strict: bool = False) -> float:
        """Distance (eV/atom) of a formation energy to the hull of its chemical system; negative
        when below it (PhaseDiagram with allow_negative=True)."""
        from pymatgen.analysis.phase_diagram import PDEntry

        comp = Composition(composition)
        pd_ = self.phase_diagram([el.symbol for el in comp.elements], exclude, strict)
        entry = PDEntry(comp, e_form_per_atom * comp.num_atoms)
        return float(pd_.get_e_above_hull(entry, allow_negative=True))


def _cached_phase_diagram(hull: DataHull, system: tuple[str, ...]):
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram

    key = (id(hull), system)
    if key in _PD_MEMO:
        return _PD_MEMO[key]
    path = cache_dir() / f"hulls-{hull.source_hash}" / f"{'-'.join(system)}.json" if hull.source_hash else None
    vertices = _read_json(path) if path else {}
    if vertices:
        pd_ = PhaseDiagram([PDEntry(Composition(f), e, name=f) for f, e in vertices["vertices"]])
    else:
        pd_ = PhaseDiagram(hull.entries(system))
        if path:
            _write_json(path, {"vertices": [[e.composition.formula, e.energy] for e in pd_.stable_entries]})
    _PD_MEMO[key] = pd_
    return pd_


_PD_MEMO: dict = {}


# -- formation energies ----------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _compatibility():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


def corrected_energy(structure: Structure, energy: float) -> float:
    """Total energy (eV) after MaterialsProject2020Compatibility's anion and GGA/GGA+U mixing
    corrections, treating the CHGNet energy as MP's (GGA+U with MP's U values where MP uses them)."""
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    compat = _compatibility()
    comp = structure.composition
    anion = max(comp.elements, key=lambda el: el.X).symbol
    hubbards = {el.symbol: compat.u_settings.get(anion, {}).get(el.symbol, 0) for el in comp.elements}
    hubbards = {k: v for k, v in hubbards.items() if v}
    params = {"run_type": "GGA+U" if hubbards else "GGA", "hubbards": hubbards or None, "software": "chgnet"}
    entry = ComputedStructureEntry(structure, energy, parameters=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = compat.process_entry(entry, clean=True, on_error="ignore")
    return float(processed.energy) if processed is not None else float("nan")


# Elements whose MP ground state is a molecular crystal of dimers: the dimer in a box stands in for
# it (ASE builds no crystal for them); the weak binding between molecules is left out.
DIATOMIC = frozenset({"H", "N", "O", "F", "Cl", "Br", "I"})
NOBLE_GASES = frozenset({"He", "Ne", "Ar", "Kr", "Xe", "Rn"})
BOX = 12.0  # Å, edge of the cubic box of a molecule or atom reference
# Bump when reference_structures changes, so that cached references are recomputed.
REFERENCE_RECIPE = 2


def reference_structures(element: str, data_rows: dict[str, tuple[Structure, float]] | None = None,
                         max_e_form: float = 0.05) -> tuple[Structure, float, str]:
    """The structure whose relaxed CHGNet energy defines `element`'s reference, its MP formation
    energy per atom (subtracted from that energy), and where it came from: the data's lowest-energy
    unary structure when its formation energy is within `max_e_form` eV/atom of 0; else a dimer
    (DIATOMIC) or an atom (NOBLE_GASES) in a box; else ASE's standard bulk structure; else fcc
    with the lattice constant of touching covalent spheres (Ga, Mn, Se, Pa, Pm, Pu: crude)."""
    from ase import Atoms
    from ase.build import bulk
    from ase.data import atomic_numbers, covalent_radii, reference_states
    from pymatgen.io.ase import AseAtomsAdaptor

    if data_rows and element in data_rows:
        structure, e_form = data_rows[element]
        if e_form <= max_e_form:
            return structure, e_form, "data"
    z = atomic_numbers[element]
    if element in DIATOMIC:
        d = 2 * covalent_radii[z]
        atoms = Atoms(element * 2, positions=[(0, 0, 0), (0, 0, d)], cell=[BOX] * 3, pbc=True)
        return AseAtomsAdaptor.get_structure(atoms), 0.0, "dimer-in-box"
    if element in NOBLE_GASES:
        return AseAtomsAdaptor.get_structure(Atoms(element, cell=[BOX] * 3, pbc=True)), 0.0, "atom-in-box"
    try:
        state = (reference_states[z] or {}).get("symmetry")
        return AseAtomsAdaptor.get_structure(bulk(element)), 0.0, f"ase-bulk-{state}"
    except Exception:  # ASE has no bulk builder for complex elements (alpha-Mn, Ga, Se, ...)
        pass
    a = 2 * math.sqrt(2) * covalent_radii[z]
    return AseAtomsAdaptor.get_structure(bulk(element, "fcc", a=a)), 0.0, "fcc-guess"


def data_unaries(csv_path: str | os.PathLike, hull: DataHull) -> dict[str, tuple[Structure, float]]:
    """Lowest-formation-energy unary structure per element of the data: {el: (structure, e_form)}."""
    import pandas as pd

    best: dict[str, int] = {}
    for i, f in enumerate(hull.formulas):
        comp = Composition(f)
        if len(comp.elements) == 1:
            el = comp.elements[0].symbol
            if el not in best or hull.e_form[i] < hull.e_form[best[el]]:
                best[el] = i
    wanted = {hull.ids[i]: el for el, i in best.items()}
    out = {}
    for chunk in pd.read_csv(csv_path, usecols=["material_id", "cif"], dtype={"material_id": str}, chunksize=4096):
        for mid, cif in zip(chunk.material_id, chunk.cif):
            if mid in wanted:
                el = wanted[mid]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[el] = (Structure.from_str(cif, fmt="cif"), float(hull.e_form[best[el]]))
    return out


class ElementalReferences:
    """CHGNet energies per atom of the elements' reference states, on the data's scale (a data
    unary's energy minus its MP formation energy), computed on first use and cached on disk."""

    def __init__(self, hull: DataHull, csv_path: str | os.PathLike | None, config: RelaxConfig | None = None):
        self.hull, self.csv_path = hull, csv_path
        self.config = config or RelaxConfig()
        key = f"{chgnet_version()}-refs{REFERENCE_RECIPE}-data-{hull.source_hash or 'none'}-fmax{self.config.fmax}"
        self.path = cache_dir() / f"elemental-references-{key}.json"
        self.values: dict[str, dict] = _read_json(self.path)
        self._unaries: dict | None = None

    def __getitem__(self, element: str) -> float:
        if element not in self.values:
            self.compute([element])
        return self.values[element]["energy_per_atom"]

    def compute(self, elements: Iterable[str]) -> None:
        missing = sorted(set(elements) - set(self.values))
        if not missing:
            return
        if self._unaries is None:
            self._unaries = data_unaries(self.csv_path, self.hull) if self.csv_path else {}
        for el in missing:
            structure, e_form, source = reference_structures(el, self._unaries)
            r = relax(structure, RelaxConfig(fmax=self.config.fmax, max_steps=1000),
                      relax_cell=not source.endswith("in-box"))
            if r.energy_per_atom is None:
                raise RuntimeError(f"CHGNet could not relax the {el} reference ({source}): {r.error}")
            self.values[el] = {"energy_per_atom": r.energy_per_atom - e_form, "source": source,
                               "status": r.status, "steps": r.steps}
        _write_json(self.path, self.values)

    def formation_energy_per_atom(self, structure: Structure, energy_per_atom: float, corrections: bool) -> float:
        comp = structure.composition
        self.compute(el.symbol for el in comp.elements)
        total = energy_per_atom * comp.num_atoms
        if corrections:
            total = corrected_energy(structure, total)
        refs = sum(amount * self[el.symbol] for el, amount in comp.items())
        return (total - refs) / comp.num_atoms


# -- the funnel ------------------------------------------------------------------------------------

def score(results: Sequence[StabilityResult], references: ElementalReferences, config: RelaxConfig | None = None,
          exclude: Sequence[Iterable[int]] | None = None) -> None:
    """Fill e_form_per_atom and e_above_hull of the results with status "relaxed" (in place);
    `exclude[i]` are data rows left out of result i's hull."""
    config = config or RelaxConfig()
    for i, r in enumerate(results):
        if r.status != "relaxed":
            continue
        r.e_form_per_atom = references.formation_energy_per_atom(r.structure, r.energy_per_atom, config.corrections)
        if math.isfinite(r.e_form_per_atom):
            r.e_above_hull = references.hull.e_above_hull(r.structure.composition, r.e_form_per_atom,
                                                          exclude[i] if exclude else ())


def iter_assess(structures: Sequence[Structure], references: ElementalReferences, config: RelaxConfig | None = None,
                workers: int | None = None) -> Iterator[tuple[int, StabilityResult]]:
    """`assess` as a stream: (position, relaxed, checked and scored result) as each one finishes,
    so that a long screening can be logged and resumed."""
    config = config or RelaxConfig()
    for i, r in iter_relax(structures, config, workers):
        score([r], references, config)
        yield i, r


def assess(structures: Sequence[Structure], references: ElementalReferences, config: RelaxConfig | None = None,
           workers: int | None = None, on_finished: Callable[[int], None] | None = None) -> list[StabilityResult]:
    """Relax, check and score structures: one StabilityResult each, in order."""
    config = config or RelaxConfig()
    results = relax_many(structures, config, workers, on_finished)
    score(results, references, config)
    return results


def funnel_counts(results: Sequence[StabilityResult], threshold: float = 0.1) -> dict[str, int]:
    """Counts of the relaxation stages: relaxed (converged, sane cell), connected, stable
    (e_above_hull <= threshold)."""
    relaxed = [r for r in results if r.relaxed]
    connected = [r for r in relaxed if r.connected]
    stable = [r for r in connected if r.e_above_hull is not None and r.e_above_hull <= threshold]
    return {"relaxed": len(relaxed), "connected": len(connected), "stable": len(stable)}


def default_references(data_csv: str | os.PathLike | None = None, config: RelaxConfig | None = None) -> ElementalReferences:
    """ElementalReferences against the hull of `data_csv` (default: the repository's training data)."""
    path = Path(data_csv) if data_csv else default_data_csv()
    return ElementalReferences(DataHull.from_csv(path), path, config)


def default_data_csv() -> Path:
    """The training data, data/mp_structures.csv.gz of a checkout (not part of the installed package)."""
    path = Path(__file__).resolve().parents[1] / "data" / "mp_structures.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the Materials Project CSV the hull is built from")
    return path


# -- generated samples -----------------------------------------------------------------------------

SUMMARY_FIELDS = ["e_form_per_atom", "e_above_hull", "relax_steps", "relax_rmsd", "connected", "relax_status"]


def summary_fields(result: StabilityResult | None) -> dict[str, str]:
    """The summary.csv columns of one result (empty strings for a sample that was not relaxed)."""
    if result is None:
        return dict.fromkeys(SUMMARY_FIELDS, "")

    def num(x: float | None, fmt: str) -> str:
        return "" if x is None or not math.isfinite(x) else format(x, fmt)

    return {"e_form_per_atom": num(result.e_form_per_atom, ".4f"), "e_above_hull": num(result.e_above_hull, ".4f"),
            "relax_steps": str(result.steps), "relax_rmsd": num(result.rmsd, ".4f"),
            "connected": "" if result.connected is None else str(result.connected).lower(),
            "relax_status": result.status}


def funnel(n_sampled: int, n_valid: int, results: Sequence[StabilityResult], index=None,
           threshold: float = 0.1) -> dict[str, int]:
    """Counts of the whole funnel: sampled, valid, relaxed, connected, stable (e_above_hull <=
    threshold), unique (among the stable, StructureMatcher on the relaxed structures) and novel
    (matching no crystal of the FingerprintIndex `index`; omitted without one)."""
    from .metrics import novel_flags, unique_flags

    counts = {"sampled": n_sampled, "valid": n_valid, **funnel_counts(results, threshold)}
    stable = [r.structure for r in results if r.relaxed and r.connected and r.e_above_hull is not None
              and r.e_above_hull <= threshold]
    unique = [s for s, u in zip(stable, unique_flags(stable)) if u]
    counts["unique"] = len(unique)
    if index is not None:
        counts["novel"] = sum(novel_flags(unique, index))
    return counts
