"""Stability funnel: the data's hull, the connectivity test, CHGNet relaxation and its failure counts."""
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from wyckoffgpt import stability as st

ROOT = Path(__file__).resolve().parents[1]
NB_PD = Path(__file__).resolve().parent / "data" / "mp_nb_pd.csv.gz"  # the data's 4 Nb-Pd rows


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WYCKOFFGPT_CACHE", str(tmp_path / "cache"))


def write_csv(path: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    lines = ["material_id,formula,e_above_hull,formation_energy_per_atom,cif"]
    lines += [f"{mid},{formula},{ehull},{e_form}," for mid, formula, ehull, e_form in rows]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


# -- the hull (no CHGNet) --------------------------------------------------------------------------

def test_hull_from_data_points_has_the_known_answer(tmp_path):
    # Al-Cu: AlCu on the hull at -0.2; AlCu3 computed at -0.05 but 0.1 above MP's hull, so MP's hull
    # at AlCu3 is -0.15 (a phase the data do not hold).
    csv = write_csv(tmp_path / "d.csv.gz", [("m1", "Al1Cu1", 0.0, -0.2), ("m2", "Al1Cu3", 0.1, -0.05),
                                            ("m3", "Al4", 0.0, 0.0)])
    hull = st.DataHull.from_csv(csv)
    assert hull.e_above_hull("AlCu3", -0.05) == pytest.approx(0.1)  # MP's own answer comes back
    assert hull.e_above_hull("AlCu3", -0.10) == pytest.approx(0.05)
    assert hull.e_above_hull("AlCu", -0.3) == pytest.approx(-0.1)  # below the hull shows as negative
    # Without AlCu (the material itself), the hull at AlCu is the line from AlCu3's hull point
    # (-0.15 at x_Al = 0.25) to Al (0 at 1): -0.1 at x_Al = 0.5.
    assert hull.e_above_hull("AlCu", -0.2, exclude=[hull.row("m1")]) == pytest.approx(-0.1)
    # An unstable row's hull point is another material's: it stays unless strict.
    assert hull.e_above_hull("AlCu3", -0.05, exclude=[hull.row("m2")]) == pytest.approx(0.1)
    # strict: AlCu3's hull point goes too, and the hull there is the Cu-AlCu line (-0.1).
    assert hull.e_above_hull("AlCu3", -0.05, exclude=[hull.row("m2")], strict=True) == pytest.approx(0.05)
    # The elements are at 0 even where the data hold none of them (Cu here).
    assert hull.e_above_hull("Cu", 0.02) == pytest.approx(0.02)
    # A second read comes from the cache and answers the same.
    again = st.DataHull.from_csv(csv)
    assert again.e_above_hull("AlCu3", -0.10) == pytest.approx(0.05)


# -- connectivity (no CHGNet) ----------------------------------------------------------------------

def test_connectivity_on_hand_made_cells():
    fcc = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert st.is_connected(fcc) and st.is_connected(nacl)
    # Two Cu layers 7 Å apart: each layer is connected to itself through the periodic images only.
    slab = Structure(Lattice.tetragonal(2.5, 14.0), ["Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert st.bond_graph_components(slab) == 2 and not st.is_connected(slab)
    # A Cl2 molecule far from a Na chain: bonded within each, not between.
    mixed = Structure(Lattice.orthorhombic(3.0, 12.0, 12.0), ["Na", "Cl", "Cl"],
                      [[0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5 + 2.0 / 12]])
    assert st.bond_graph_components(mixed) == 2
    # The bond factor is what decides: at 7 Å apart the layers bond only with an absurd factor.
    assert st.is_connected(slab, bond_factor=3.0)


def test_import_needs_no_chgnet():
    code = "import sys, wyckoffgpt, wyckoffgpt.stability; assert 'chgnet' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_generate_relax_without_chgnet_is_one_line(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, runpy; sys.modules['chgnet'] = None; "
            f"sys.argv = ['generate.py', '--relax', '-n', '2', '--out', {str(out)!r}]; "
            "runpy.run_path('generate.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and 'pip install "wyckoffgpt[relax]"' in p.stderr
    assert not out.exists()


# -- CHGNet ----------------------------------------------------------------------------------------

def test_stable_structures_of_a_small_system_sit_on_the_hull_without_them():
    pytest.importorskip("chgnet")
    import pandas as pd

    hull = st.DataHull.from_csv(NB_PD)
    refs = st.ElementalReferences(hull, NB_PD)
    rows = pd.read_csv(NB_PD)
    structures = [Structure.from_str(c, fmt="cif") for c in rows.cif]
    results = st.relax_many(structures, workers=1)
    assert [r.status for r in results] == ["relaxed"] * 4
    for (_, row), r in zip(rows.iterrows(), results):
        own = [hull.row(row.material_id)]
        e_form = refs.formation_energy_per_atom(r.structure, r.energy_per_atom, corrections=False)
        # Measured: CHGNet's formation energies of these four are within 0.016 eV/atom of MP's.
        assert e_form == pytest.approx(row.formation_energy_per_atom, abs=0.03)
        estimate = hull.e_above_hull(r.structure.composition, e_form, exclude=own)
        # What MP's own energy gives against the same hull (without the row).
        reference = hull.e_above_hull(r.structure.composition, row.formation_energy_per_atom, exclude=own)
        assert estimate == pytest.approx(reference, abs=0.03)
        if row.e_above_hull == 0:
            assert estimate <= 0.05  # a stable material comes out stable


def test_bad_relaxations_are_counted_not_raised():
    pytest.importorskip("chgnet")
    close = Structure(Lattice.cubic(3.0), ["Cu", "Cu"], [[0, 0, 0], [0.5 / 3.0, 0, 0]])  # atoms 0.5 Å apart
    slab = Structure(Lattice.tetragonal(2.5, 14.0), ["Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    lone = Structure(Lattice.cubic(10.0), ["Cu"], [[0, 0, 0]])  # no neighbour within CHGNet's cutoff
    config = st.RelaxConfig(max_steps=40)
    results = st.relax_many([close, slab, lone], config, workers=1)
    assert all(r.status in st.STATUSES for r in results)
    assert results[1].status in ("disconnected", "not_converged")
    assert results[1].status == "disconnected" or results[1].steps == config.max_steps
    assert results[0].status != "relaxed" or results[0].structure.distance_matrix[0, 1] > 1.5
    counts = st.funnel_counts(results)
    assert counts["connected"] <= counts["relaxed"] <= 3
    fields = [st.summary_fields(r) for r in results]
    assert all(f["relax_status"] in st.STATUSES and f["e_above_hull"] == "" for f in fields)


def test_relax_config_is_validated():
    with pytest.raises(ValueError, match="fmax"):
        st.RelaxConfig(fmax=0)
    with pytest.raises(ValueError, match="max_steps"):
        st.RelaxConfig(max_steps=0)
    assert np.isclose(st.RelaxConfig().bond_factor, 1.5)


def test_streamed_results_survive_a_json_log():
    """iter_assess's scored results go through a JSON line (the resumable logs of the screening
    benchmarks) and come back with the same verdict."""
    pytest.importorskip("chgnet")
    import json

    import pandas as pd

    hull = st.DataHull.from_csv(NB_PD)
    refs = st.ElementalReferences(hull, NB_PD)
    structure = Structure.from_str(pd.read_csv(NB_PD).cif[0], fmt="cif")
    [(position, result)] = list(st.iter_assess([structure], refs, st.RelaxConfig(max_steps=100), workers=1))
    back = st.StabilityResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert position == 0 and result.e_above_hull is not None
    assert (back.status, back.steps, back.connected) == (result.status, result.steps, result.connected)
    assert back.e_above_hull == pytest.approx(result.e_above_hull)
    assert back.structure.composition == result.structure.composition
    assert np.allclose(back.structure.lattice.matrix, result.structure.lattice.matrix)


KILLED_PARENT = """
import multiprocessing as mp, os, sys
from wyckoffgpt.stability import _exit_with_parent


def watch(parent, ready):
    ready.set()
    _exit_with_parent(parent, 0.1)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=watch, args=(os.getpid(), ready))
    child.start()
    assert ready.wait(60)  # the child runs (a child still starting up would die with its parent anyway)
    print(child.pid, flush=True)
    os._exit(0)  # killed outright: nothing shuts the child down
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_relaxation_workers_exit_when_their_parent_is_killed(tmp_path):
    import time

    script = tmp_path / "parent.py"
    script.write_text(KILLED_PARENT)
    out = tmp_path / "pid"
    with out.open("w") as f:  # a file, not a pipe: the child would hold a pipe open and be waited for
        subprocess.run([sys.executable, str(script)], stdout=f, timeout=60, cwd=Path(__file__).resolve().parents[1])
    pid = int(out.read_text().split()[0])

    def running() -> bool:
        try:
            return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running()
