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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A random-weight tiny model folder (tests/random_model.py): what it samples is the grammar's doing."""
    import torch
    from random_model import save_random_model

    torch.set_num_threads(1)
    return save_random_model(tmp_path_factory.mktemp("model"))
