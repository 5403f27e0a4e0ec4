"""The default model shipped inside the package: found without flags, small, and it does the main job."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from pymatgen.core import Structure

from wyckoffgpt.generation import PRETRAINED_DIR, CrystalGenerator

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_model_folder_is_complete_and_lean():
    folders = [p.parent for p in PRETRAINED_DIR.glob("*/config.json")]
    assert len(folders) == 1
    names = {p.name for p in folders[0].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "fingerprints.npz"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing to unpickle
    assert sum(p.stat().st_size for p in folders[0].iterdir()) <= 40 * 2**20


def test_main_job_writes_only_the_requested_chemical_system(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--elements", "Al", "Ca", "Cu", "--ehull", "low",
                           "-n", "24", "--seed", "0", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    cifs = sorted(out.rglob("*.cif"))  # in shards of at most 1,000
    assert cifs, proc.stdout
    for cif in cifs:
        assert {el.symbol for el in Structure.from_file(cif).composition.elements} == {"Al", "Ca", "Cu"}
    with open(out / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 24


def test_generator_defaults_to_bundled_model_and_is_seeded():
    gen = CrystalGenerator.from_pretrained()
    first = [str(c.sequence) for c in gen.generate(8, temperature=1.0, seed=3)]
    again = [str(c.sequence) for c in gen.generate(8, temperature=1.0, seed=3)]
    assert first == again


def test_small_preset_builds_the_bundled_models_architecture():
    # The README's training command (`--model-preset small`) must reproduce the shipped model, not a
    # differently shaped one: same blocks, width, mixture, dropout and running-composition input.
    from wyckoffgpt.configuration_wyckoffgpt import WyckoffGPTConfig

    (folder,) = [p.parent for p in PRETRAINED_DIR.glob("*/config.json")]
    shipped = WyckoffGPTConfig.from_pretrained(folder)
    preset = WyckoffGPTConfig.from_preset("small")
    fields = ("n_layer", "n_head", "n_embd", "mlp_ratio", "n_mixture", "value_basis_size", "max_position_embeddings",
              "dropout", "composition_slots", "charge_feature", "continuous_head", "position_embedding")
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(shipped, f) for f in fields}
