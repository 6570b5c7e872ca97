"""scGPT: a synthetic model staged in helical's layout, and tokens equal to what helical feeds its model."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from helixflow.errors import HelixflowError
from helixflow.scgpt.embedding import embed_token_table, load_scgpt_encoder
from helixflow.scgpt.files import ARCHITECTURES, SPECIAL_TOKENS, ScGPTFiles, helical_scgpt, stage_synthetic
from helixflow.scgpt.tokenization import ARROW_SCHEMA, ScGPTTokenizer, map_symbols, tokenize_chunk
from helixflow.tokenization import open_tokens


@pytest.fixture(scope="module")
def tiny_scgpt(tmp_path_factory) -> ScGPTFiles:
    files = ScGPTFiles(tmp_path_factory.mktemp("scgpt"))
    stage_synthetic(files)
    return files


@pytest.fixture(scope="module")
def helical_model(tiny_scgpt):
    return helical_scgpt(tiny_scgpt, batch_size=24)


def helical_model_inputs(model, adata: ad.AnnData, *, max_length: int | None = None) -> list[tuple[list, list]]:
    """Per cell, the gene ids and values helical's ``get_embeddings`` passes to its transformer, padding removed.

    The transformer's ``_encode`` is wrapped to record its inputs, so the whole path of
    ``process_data``, its ``Dataset``, ``DataCollator`` and ``DataLoader`` runs as helical runs it.
    """
    recorded = []
    encode = model.model._encode

    def record(genes, values, **kwargs):
        recorded.append((genes.clone(), values.clone()))
        return encode(genes, values, **kwargs)

    default_length = model.config["MAX_LENGTH"]
    model.config["MAX_LENGTH"] = max_length or default_length
    model.model._encode = record
    try:
        model.get_embeddings(model.process_data(adata.copy(), gene_names="gene_symbol"))
    finally:
        del model.model._encode
        model.config["MAX_LENGTH"] = default_length
    pad = model.vocab["<pad>"]
    cells = []
    for genes, values in recorded:
        for cell_genes, cell_values in zip(genes, values):
            real = cell_genes != pad
            cells.append((cell_genes[real].tolist(), cell_values[real].tolist()))
    return cells


def test_staged_model_has_helicals_layout(tiny_scgpt):
    folder = tiny_scgpt.prefix / ".cache" / "helical" / "models" / "scgpt" / "scGPT_CP"
    assert sorted(path.name for path in folder.iterdir()) == ["args.json", "best_model.pt", "vocab.json"]
    vocabulary = tiny_scgpt.load_vocabulary()
    assert list(vocabulary)[-3:] == list(SPECIAL_TOKENS) and vocabulary["SYN1"] == 0
    assert tiny_scgpt.load_architecture()["embsize"] == 32


def test_real_architecture_is_helicals_default():
    from helical.models.scgpt import scGPTConfig

    defaults = scGPTConfig().config
    assert all(defaults[key] == value for key, value in ARCHITECTURES["real"].items())


def test_helical_loads_staged_model_without_network(tiny_scgpt, network_attempts):
    """helical's Downloader would reach S3, and its loader silently skips weights of the wrong shape."""
    model = helical_scgpt(tiny_scgpt, batch_size=4)
    staged = torch.load(tiny_scgpt.weights, weights_only=True)
    loaded = model.model.state_dict()
    assert network_attempts == []
    assert staged.keys() == loaded.keys() and all(torch.equal(staged[key], loaded[key]) for key in staged)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(HelixflowError, match="not staged.*helixflow model stage"):
        ScGPTFiles(tmp_path).load_vocabulary()


def test_tokens_equal_helicals(tiny_scgpt, helical_model, dataset, tmp_path):
    """Every cell's gene ids and bins equal helical's, <cls> first with the pad value.

    helical reseeds its binning draws and its sampling permutation for every cell, so a
    cell's tokens do not depend on its batch: helical's batches of 24 compare cell by cell,
    and the chunk's first 192 cells stand for all (helical's CPU forward pass is the slow part).
    """
    out = tmp_path / "tokens.arrow"
    assert tokenize_chunk(dataset, tiny_scgpt, out, block_cells=256) == 600
    table = open_tokens(out)
    assert table.schema == ARROW_SCHEMA and ARROW_SCHEMA.field("binned_values").type == pa.list_(pa.int16())
    ours = list(zip(table.column("input_ids").to_pylist(), table.column("binned_values").to_pylist()))
    theirs = helical_model_inputs(helical_model, ad.read_h5ad(dataset)[:192])
    assert ours[:192] == theirs
    assert table.column("length").to_pylist() == [len(ids) for ids, _ in ours]


def test_long_cells_sampled_as_helical_samples(tiny_scgpt, helical_model, dataset):
    """Cells longer than the maximum length keep the genes helical's seeded permutation keeps."""
    adata = ad.read_h5ad(dataset)[:60].copy()
    tokenizer = ScGPTTokenizer(tiny_scgpt, adata.var, gene_column="gene_symbol")
    tokenizer.max_length = 64
    batch = tokenizer.encode(adata.X)
    assert set(batch.column("length").to_pylist()) == {64}
    ours = list(zip(batch.column("input_ids").to_pylist(), batch.column("binned_values").to_pylist()))
    assert ours == helical_model_inputs(helical_model, adata, max_length=64)


def test_cell_without_vocabulary_genes_is_cls_alone(tiny_scgpt, dataset):
    """helical fails on such a cell (numpy's max of an empty row); helixflow keeps it as <cls> alone."""
    adata = ad.read_h5ad(dataset)[:3].copy()
    counts = sp.csr_matrix(adata.X).tolil()
    counts[1, :] = 0
    batch = ScGPTTokenizer(tiny_scgpt, adata.var).encode(sp.csr_matrix(counts))
    cls = tiny_scgpt.load_vocabulary()["<cls>"]
    assert batch.column("input_ids").to_pylist()[1] == [cls]
    assert batch.column("binned_values").to_pylist()[1] == [-2]


def test_symbol_column_detected_and_checked(tiny_scgpt, dataset):
    var = ad.read_h5ad(dataset, backed="r").var.copy()
    vocabulary = tiny_scgpt.load_vocabulary()
    mapping = map_symbols(var, vocabulary)
    assert mapping.report["column"] == "var['gene_symbol']" and mapping.report["in_vocabulary"] == 1_600
    assert (mapping.token_of_column[-40:] == -1).all()  # the dataset's foreign genes
    with pytest.raises(HelixflowError, match="no gene of var_names.*scGPT vocabulary"):
        map_symbols(var, vocabulary, gene_column="index")
    with pytest.raises(HelixflowError, match="no gene column 'feature_name'"):
        map_symbols(var, vocabulary, gene_column="feature_name")


@pytest.mark.parametrize("mode", ["cell", "cls"])
def test_embeddings_equal_helicals_cell_by_cell(tiny_scgpt, helical_model, dataset, tmp_path, mode):
    """Batched embeddings equal helical's ``get_embeddings`` of each cell alone, within 1e-4 (fp32, CPU).

    helical's "cell" mean runs over its batch's padding too, so only a batch of one cell is
    free of its batch-mates; helixflow's mean runs over the cell's own genes in any batch.
    """
    cells = ad.read_h5ad(dataset)[:24].copy()
    cells.write_h5ad(tmp_path / "chunk.h5ad")
    tokenize_chunk(tmp_path / "chunk.h5ad", tiny_scgpt, tmp_path / "chunk.arrow")
    ours = embed_token_table(tiny_scgpt, open_tokens(tmp_path / "chunk.arrow"), batch_size=8,
                             device=torch.device("cpu"), mode=mode)
    helical_model.config.update(batch_size=1, emb_mode=mode)
    try:
        theirs = helical_model.get_embeddings(helical_model.process_data(cells.copy(), gene_names="gene_symbol"))
    finally:
        helical_model.config.update(batch_size=24, emb_mode="cell")
    assert ours.dtype == np.float32 and ours.shape == (24, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_checkpoint_of_another_shape_is_refused(tiny_scgpt, tmp_path):
    """helical's loader would keep random weights where shapes differ; helixflow's refuses the file."""
    files = ScGPTFiles(tmp_path)
    shutil.copytree(tiny_scgpt.model_dir, files.model_dir)
    args = json.loads(files.args.read_text())
    files.args.write_text(json.dumps({**args, "embsize": 64}))
    with pytest.raises(HelixflowError, match="does not fit the model's architecture"):
        load_scgpt_encoder(files, torch.device("cpu"))


def test_model_stage_command_stages_tiny_and_from_a_folder(tmp_path, capsys):
    """``helixflow model stage`` dispatches through the scGPT family: --tiny, then --from the staged folder."""
    from helixflow import cli

    assert cli.main(["model", "stage", "--profile", "scgpt-tiny", "--tiny", "--models-dir", str(tmp_path / "a")]) == 0
    staged = ScGPTFiles(tmp_path / "a" / "scgpt-tiny")
    assert cli.main(["model", "stage", "--profile", "scgpt-tiny", "--from", str(staged.model_dir),
                     "--models-dir", str(tmp_path / "b")]) == 0
    copy = ScGPTFiles(tmp_path / "b" / "scgpt-tiny")
    names = ["scgpt/scGPT_CP/args.json", "scgpt/scGPT_CP/best_model.pt", "scgpt/scGPT_CP/vocab.json"]
    assert list(copy.staged_paths()) == list(staged.staged_paths()) == names
    assert all(copy.staged_paths()[name].read_bytes() == staged.staged_paths()[name].read_bytes() for name in names)
    assert "staged scgpt model best_model (tiny)" in capsys.readouterr().out

    staged.weights.unlink()
    assert cli.main(["model", "stage", "--profile", "scgpt-tiny", "--from", str(staged.model_dir),
                     "--models-dir", str(tmp_path / "c")]) == 2
    assert "not an scGPT model folder: missing best_model.pt" in capsys.readouterr().err
