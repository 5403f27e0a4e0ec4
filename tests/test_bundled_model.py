"""The default model shipped inside the package: found without flags, small, and it does the main job."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pymatgen.core import Structure

from wyckoffgpt.generation import BUNDLED_MODEL, PRETRAINED_DIR, CrystalGenerator, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_model_folders_are_complete_lean_and_found_by_name():
    folders = [p.parent for p in PRETRAINED_DIR.glob("*/config.json")]
    assert resolve_model_path(None) == PRETRAINED_DIR / BUNDLED_MODEL in folders  # the default, without flags
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "fingerprints.npz"} <= names
        assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing to unpickle
        assert sum(p.stat().st_size for p in folder.iterdir()) <= 40 * 2**20
        assert resolve_model_path(folder.name) == folder  # `--model NAME` picks a bundled alternative


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

    shipped = WyckoffGPTConfig.from_pretrained(PRETRAINED_DIR / BUNDLED_MODEL)
    preset = WyckoffGPTConfig.from_preset("small")
    fields = ("n_layer", "n_head", "n_embd", "mlp_ratio", "n_mixture", "value_basis_size", "max_position_embeddings",
              "dropout", "composition_slots", "charge_feature", "continuous_head", "position_embedding")
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(shipped, f) for f in fields}


REMOTE_CODE_STEP = r"""
import json, sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
cfg = model.config
width = 2 * cfg.composition_slots + 2 + int(cfg.charge_feature) if cfg.composition_slots else 0
ids = torch.tensor([[cfg.bos_token_id, cfg.bos_token_id]])
kw = {"composition": torch.zeros(1, 1, width)} if width else {}
with torch.no_grad():
    first = model(ids[:, :1], use_cache=True, **kw)
    assert first.cache.get_seq_length() == 1
    second = model(ids[:, 1:], cache=first.cache, use_cache=True, **kw)
assert second.cache.get_seq_length() == 2
print(json.dumps({"class": type(model).__module__, "logits": second.logits[0, -1, :8].tolist(),
                  "wyckoffgpt_imported": any(m.split(".")[0] == "wyckoffgpt" for m in sys.modules)}))
"""


@pytest.mark.parametrize("name", sorted(p.parent.name for p in PRETRAINED_DIR.glob("*/config.json")))
def test_plain_transformers_loads_the_bundled_folder_without_this_package(tmp_path, name):
    # What a Hub user without wyckoffgpt installed runs: the code saved beside the weights must work on
    # the transformers they have, and give the library model's numbers.
    folder = PRETRAINED_DIR / name
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", REMOTE_CODE_STEP, str(folder)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules") and not remote["wyckoffgpt_imported"]

    import torch

    from wyckoffgpt.modeling_wyckoffgpt import WyckoffGPTModel

    model = WyckoffGPTModel.from_pretrained(folder).eval()
    cfg = model.config
    ids = torch.full((1, 2), cfg.bos_token_id)
    comp = torch.zeros(1, 2, 2 * cfg.composition_slots + 2 + int(cfg.charge_feature))
    with torch.no_grad():
        logits = model(ids, composition=comp).logits[0, -1, :8]
    torch.testing.assert_close(torch.tensor(remote["logits"]), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(p.parent.name for p in PRETRAINED_DIR.glob("*/config.json")))
def test_bundled_folder_recommends_only_settings_it_can_sample_with(name):
    # A folder's sampling_config.json is what `--model NAME --ehull low` uses without further flags:
    # guidance against ehull:unknown only where the model learnt that token, and a guided draw that
    # keeps the asked chemical system.
    gen = CrystalGenerator.from_pretrained(name)
    recommended = gen.sampling_defaults
    if recommended.guided and recommended.guidance_contrast != "opposite":
        assert gen.learned_unknown is True
    crystals = gen.generate(4, elements=["Al", "Ca", "Cu"], ehull="low", temperature=1.0, seed=0)
    assert crystals and all({el.symbol for el in c.structure.composition.elements} == {"Al", "Ca", "Cu"}
                            for c in crystals if c.structure is not None)


def test_stability_model_recommends_low_against_unknown_and_high_against_low():
    # Its card's conditioning table was measured at this setting; the default model recommends none.
    recommended = CrystalGenerator.from_pretrained("wyckoffgpt-mp-small-stability").sampling_defaults
    assert (recommended.guidance, recommended.guidance_contrast) == (6.0, "unknown-for-low")
    assert not CrystalGenerator.from_pretrained().sampling_defaults.guided
