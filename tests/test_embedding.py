"""Embeddings equal helical's get_embeddings on the same model and cells; gather streams chunks into one file."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from helixflow.embedding import EMBEDDING_KEY, embed_tokens, gather_embeddings, load_encoder
from helixflow.geneformer_models import model_facts
from helixflow.model_files import helical_geneformer
from helixflow.tokenization import open_tokens, tokenize_chunk
from test_split import mixed_obs


def ours(files, tokens_path, batch_size=16, precision="fp32"):
    table = open_tokens(tokens_path)
    model = load_encoder(files, torch.device("cpu"))
    special = model_facts(files.model_name)["special_tokens"]
    return embed_tokens(model, table.column("input_ids").combine_chunks(), table.column("length").to_numpy(),
                        batch_size=batch_size, special_tokens=special, device=torch.device("cpu"), precision=precision)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_embeddings_equal_helicals(version, tiny_v1, tiny_v2, dataset, tmp_path):
    files = tiny_v1 if version == "v1" else tiny_v2
    tokens = tmp_path / "tokens.arrow"
    tokenize_chunk(dataset, files, tokens)
    geneformer = helical_geneformer(files, batch_size=10)
    cells = ad.read_h5ad(dataset)[:120].copy()
    expected = geneformer.get_embeddings(geneformer.process_data(cells, gene_names="ensembl_id"))
    actual = ours(files, tokens)[:120]
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_batching_does_not_change_embeddings(tiny_v1, dataset, tmp_path):
    tokens = tmp_path / "tokens.arrow"
    tokenize_chunk(dataset, tiny_v1, tokens)
    np.testing.assert_allclose(ours(tiny_v1, tokens, batch_size=1)[:60], ours(tiny_v1, tokens, batch_size=64)[:60], atol=1e-5)


def test_bf16_is_close_to_fp32(tiny_v1, dataset, tmp_path):
    tokens = tmp_path / "tokens.arrow"
    tokenize_chunk(dataset, tiny_v1, tokens)
    full, half = ours(tiny_v1, tokens)[:40], ours(tiny_v1, tokens, precision="bf16")[:40]
    cosine = (full * half).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() > 0.99
    assert not np.allclose(full, half, atol=1e-6)  # bf16 really ran


def test_cells_without_genes_get_nan(tiny_v1):
    model = load_encoder(tiny_v1, torch.device("cpu"))
    ids = [np.array([5, 6, 7], dtype=np.int32), np.array([], dtype=np.int32)]
    out = embed_tokens(model, ids, np.array([3, 0]), batch_size=4, special_tokens=False, device=torch.device("cpu"))
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_gather_streams_chunks_into_what_anndata_concat_gives(tmp_path):
    chunks, parts = [], []
    for index, (n_cells, categories) in enumerate([(7, ("a", "b", "c")), (5, ("a", "b", "c")), (6, ("c", "d"))]):
        obs = mixed_obs(n_cells, offset=10 * index, categories=categories)
        part = ad.AnnData(X=sp.csr_matrix((n_cells, 0), dtype=np.float32), obs=obs,
                          obsm={EMBEDDING_KEY: np.random.default_rng(index).random((n_cells, 4), dtype=np.float32)})
        chunks.append(tmp_path / f"chunk-{index:05d}.h5ad")
        part.write_h5ad(chunks[-1])
        parts.append(part)
    assert gather_embeddings(chunks, tmp_path / "all.h5ad", {"chunks": 3}) == 18
    gathered, expected = ad.read_h5ad(tmp_path / "all.h5ad"), ad.concat(parts)
    pd.testing.assert_frame_equal(gathered.obs, expected.obs, check_categorical=False)
    assert list(gathered.obs["cell_type"].cat.categories) == ["a", "b", "c", "d"]  # a new category is added
    np.testing.assert_array_equal(gathered.obsm[EMBEDDING_KEY], expected.obsm[EMBEDDING_KEY])
    assert gathered.shape == (18, 0) and gathered.uns["helixflow"] == {"chunks": 3}
