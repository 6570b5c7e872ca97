"""Model families: each model in one family, each adapter providing the whole interface, profiles light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helixflow.errors import HelixflowError
from helixflow.families import FAMILIES, FamilyAdapter, load_family, model_family
from helixflow.profiles import list_profiles, load_profile

ADAPTER_FUNCTIONS = [name for name in vars(FamilyAdapter) if not name.startswith("_")]


def test_each_model_belongs_to_one_family():
    models = [model for family in FAMILIES.values() for model in family.models]
    assert len(models) == len(set(models))
    assert len({family.embedding_key for family in FAMILIES.values()}) == len(FAMILIES)
    with pytest.raises(HelixflowError, match="not a model helixflow knows; known models: geneformer: .*; scgpt: best_model"):
        model_family("gf-99L")


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_each_adapter_provides_the_interface(family):
    adapter = load_family(family.models[0])
    assert ADAPTER_FUNCTIONS and all(callable(getattr(adapter, name, None)) for name in ADAPTER_FUNCTIONS)


def test_each_family_has_a_shipped_profile():
    assert {load_profile(name)["family"] for name in list_profiles()} == set(FAMILIES)


def test_profiles_and_families_stay_light():
    """The Airflow DAG imports them without the model stack."""
    code = ("import sys, helixflow.profiles, helixflow.families; "
            "print(sorted(m for m in ('torch', 'anndata', 'numpy', 'transformers') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
