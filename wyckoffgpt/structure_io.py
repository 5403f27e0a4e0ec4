"""Reading crystal structures from the inputs data preparation accepts.

A CSV with a `cif` column (optional `e_above_hull`, `material_id`), a folder of `.cif` files, or
an extended-XYZ file. Records are yielded lazily and parsed separately, so one bad row is a
counted skip, never the end of a run.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from pymatgen.core import Structure


@dataclass
class Record:
    key: str  # material_id, file name, or row/frame number
    cif: str | None  # CIF text, or None when `structure` is given directly
    e_above_hull: float | None
    structure: Structure | None = None


class InputError(ValueError):
    """Input that cannot be used, with a one-line message naming the problem: a file that cannot be
    read as a whole (missing, no cif column, empty), a model folder, a sampling setting. The one
    error type that the library raises for bad input and that the command lines turn into exit 2."""


def iter_records(path: str | Path, limit: int | None = None) -> Iterator[Record]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_dir():
        source = _iter_cif_folder(path)
    elif path.name.endswith((".xyz", ".extxyz")):
        source = _iter_extxyz(path)
    else:
        source = _iter_csv(path)
    for i, rec in enumerate(source):
        if limit is not None and i >= limit:
            return
        yield rec


def read_records(path: str | Path, keys: Collection[str]) -> dict[str, Record]:
    """The records of `path` whose key (material id) is in `keys`, in one pass over the file."""
    wanted = set(keys)
    return {rec.key: rec for rec in iter_records(path) if rec.key in wanted}


def _iter_csv(path: Path) -> Iterator[Record]:
    import pandas as pd

    try:
        chunks = pd.read_csv(path, chunksize=2048, dtype={"material_id": str})
        for chunk in chunks:
            if "cif" not in chunk.columns:
                raise InputError(f"{path}: no 'cif' column (columns: {', '.join(chunk.columns)})")
            ids = chunk["material_id"] if "material_id" in chunk.columns else chunk.index.astype(str)
            ehull = chunk["e_above_hull"] if "e_above_hull" in chunk.columns else [None] * len(chunk)
            for key, cif, e in zip(ids, chunk["cif"], ehull):
                e = None if e is None or (isinstance(e, float) and math.isnan(e)) else float(e)
                yield Record(str(key), cif if isinstance(cif, str) else None, e)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path} is not a readable CSV: {exc}") from None


def _iter_cif_folder(path: Path) -> Iterator[Record]:
    # Subfolders too: generate.py writes its structures in shards of 1,000 files.
    files = sorted(path.rglob("*.cif"))
    if not files:
        raise InputError(f"folder {path} holds no .cif files")
    for f in files:
        yield Record(f.stem, f.read_text(errors="replace"), None)


def _iter_extxyz(path: Path) -> Iterator[Record]:
    from ase.io import iread
    from pymatgen.io.ase import AseAtomsAdaptor

    try:
        for i, atoms in enumerate(iread(str(path), format="extxyz")):
            e = atoms.info.get("e_above_hull")
            yield Record(str(atoms.info.get("material_id", i)), None, None if e is None else float(e),
                         AseAtomsAdaptor.get_structure(atoms))
    except (ValueError, KeyError, IndexError, StopIteration) as exc:
        raise InputError(f"{path} is not a readable extxyz file: {exc}") from None


def parse_structure(rec: Record) -> Structure:
    """The record's structure; ValueError('unreadable CIF: ...') when it has none."""
    if rec.structure is not None:
        return rec.structure
    if not rec.cif:
        raise ValueError("unreadable CIF: empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on every rounded coordinate
        try:
            return Structure.from_str(rec.cif, fmt="cif")
        except Exception as exc:  # pymatgen raises many types for malformed CIF text
            raise ValueError(f"unreadable CIF: {type(exc).__name__}") from None
