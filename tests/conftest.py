import warnings
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SLICE = DATA / "mp_slice.csv.gz"


@pytest.fixture(scope="session")
def slice_records():
    """(record, structure) pairs of the bundled Materials Project slice (all seven crystal systems)."""
    from wyckoffgpt.structure_io import iter_records, parse_structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(r, parse_structure(r)) for r in iter_records(SLICE)]


@pytest.fixture(scope="session")
def tokenizer():
    from wyckoffgpt import CrystalTokenizer

    return CrystalTokenizer()
