"""The helical Geneformer models helixflow knows: facts only, no model stack (the Airflow DAG reads them)."""

from __future__ import annotations

from helixflow.errors import HelixflowError

# Mirrors helical 2.2.0 GeneformerConfig.model_map (a test keeps the two in step): the version
# folder, the model's input size and whether cells carry <cls>/<eos> tokens.
GENEFORMER_MODELS: dict[str, dict] = {
    "gf-6L-10M-i2048": {"version": "v1", "input_size": 2048, "special_tokens": False},
    "gf-12L-40M-i2048": {"version": "v1", "input_size": 2048, "special_tokens": False},
    "gf-12L-40M-i2048-CZI-CellxGene": {"version": "v1", "input_size": 2048, "special_tokens": False},
    "gf-12L-38M-i4096": {"version": "v2", "input_size": 4096, "special_tokens": True},
    "gf-12L-38M-i4096-CLcancer": {"version": "v2", "input_size": 4096, "special_tokens": True},
    "gf-20L-151M-i4096": {"version": "v2", "input_size": 4096, "special_tokens": True},
    "gf-12L-104M-i4096": {"version": "v3", "input_size": 4096, "special_tokens": True},
    "gf-12L-104M-i4096-CLcancer": {"version": "v3", "input_size": 4096, "special_tokens": True},
    "gf-18L-316M-i4096": {"version": "v3", "input_size": 4096, "special_tokens": True},
}


def model_facts(model_name: str) -> dict:
    """Return version, input size and special-token use of a helical Geneformer model."""
    try:
        return GENEFORMER_MODELS[model_name]
    except KeyError:
        known = ", ".join(GENEFORMER_MODELS)
        raise HelixflowError(model_name, f"not a helical Geneformer model; known models: {known}") from None
