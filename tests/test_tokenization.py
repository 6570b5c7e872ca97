"""Rank-value encoding equals helical's TranscriptomeTokenizer on the same cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helixflow.errors import HelixflowError
from helixflow.tokenization import CellTokenizer, open_tokens, read_symbol_map, tokenize_chunk


def helical_tokens(files, adata, special_token: bool, input_size: int) -> list[list[int]]:
    from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer

    tokenizer = TranscriptomeTokenizer(
        model_input_size=input_size, special_token=special_token,
        gene_median_file=files.gene_median_dictionary, token_dictionary_file=files.token_dictionary,
        gene_mapping_file=files.ensembl_mapping,
    )
    cells, _ = tokenizer.tokenize_anndata(adata.copy())
    dataset = tokenizer.create_dataset(cells, None)
    return [list(ids) for ids in dataset["input_ids"]]


def assert_same_up_to_ties(ours: list[list[int]], theirs: list[list[int]]) -> None:
    """Equal, except that exactly tied genes may come in another order."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert len(a) == len(b) and sorted(a) == sorted(b)
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same >= 0.95 * len(ours)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_tokens_equal_helicals(version, tiny_v1, tiny_v2, dataset, tmp_path):
    files = tiny_v1 if version == "v1" else tiny_v2
    out = tmp_path / "tokens.arrow"
    assert tokenize_chunk(dataset, files, out) == 600
    ours = [list(ids) for ids in open_tokens(out).column("input_ids").to_pylist()]
    theirs = helical_tokens(files, ad.read_h5ad(dataset), version == "v2", 2048 if version == "v1" else 4096)
    assert_same_up_to_ties(ours, theirs)
    if version == "v2":
        tokens = files.load_dictionaries()[0]
        assert all(ids[0] == tokens["<cls>"] and ids[-1] == tokens["<eos>"] for ids in ours)


def test_truncation_keeps_top_ranked_genes(tiny_v1, dataset):
    adata = ad.read_h5ad(dataset)
    tokenizer = CellTokenizer(tiny_v1, adata.var)
    tokenizer.max_genes = 50
    batch = tokenizer.encode(adata.X[:20])
    assert max(batch.column("length").to_pylist()) == 50
    full = CellTokenizer(tiny_v1, adata.var).encode(adata.X[:20])
    for short, long in zip(batch.column("input_ids").to_pylist(), full.column("input_ids").to_pylist()):
        assert short == long[:50]


def test_symbols_mapped_and_duplicates_summed(tiny_v1, dataset, tmp_path):
    adata = ad.read_h5ad(dataset)[:50].copy()
    ids = adata.var["ensembl_id"].to_numpy()
    table = tmp_path / "symbols.tsv"
    pd.DataFrame({"symbol": adata.var["gene_symbol"], "ensembl_id": ids}).to_csv(table, sep="\t", index=False)
    symbol_map = read_symbol_map(table)
    by_symbol = CellTokenizer(tiny_v1, adata.var, gene_id_column="gene_symbol", symbol_map=symbol_map).encode(adata.X)
    by_id = CellTokenizer(tiny_v1, adata.var).encode(adata.X)
    assert by_symbol.to_pylist() == by_id.to_pylist()

    # Two columns for one gene (e.g. two symbols of one Ensembl id) count as one gene, summed.
    var = adata.var.copy()
    var.iloc[1, var.columns.get_loc("ensembl_id")] = ids[0]
    merged = adata.X.copy().tolil()
    merged[:, 0] = adata.X[:, 0] + adata.X[:, 1]
    merged[:, 1] = 0
    doubled = CellTokenizer(tiny_v1, var).encode(adata.X)
    summed = CellTokenizer(tiny_v1, var).encode(sp.csr_matrix(merged), n_counts=np.asarray(adata.X.sum(1)).ravel())
    assert doubled.to_pylist() == summed.to_pylist()


def test_no_vocabulary_gene_is_an_error(tiny_v1, dataset):
    var = ad.read_h5ad(dataset, backed="r").var.copy()
    var["ensembl_id"] = [f"GENE{i}" for i in range(len(var))]
    with pytest.raises(HelixflowError, match="no gene of var\\['ensembl_id'\\].*vocabulary"):
        CellTokenizer(tiny_v1, var, gene_id_column="ensembl_id", path=dataset)
    with pytest.raises(HelixflowError, match="no gene id column 'gene_ids'"):
        CellTokenizer(tiny_v1, var, gene_id_column="gene_ids", path=dataset)
