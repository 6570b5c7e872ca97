"""Model staging in helical's layout, and loading helical's Geneformer with no network."""

from __future__ import annotations

import hashlib
import http.server
import json
import pickle
import socket
import tarfile
import threading

import pytest

from helixflow.errors import HelixflowError
from helixflow.model_files import (
    GENEFORMER_MODELS,
    ModelFiles,
    helical_geneformer,
    stage_architecture,
    stage_download,
    stage_from_path,
)


def test_model_table_matches_helical():
    from helical.models.geneformer import GeneformerConfig

    helical_map = GeneformerConfig().model_map
    assert set(GENEFORMER_MODELS) == set(helical_map)
    for name, facts in GENEFORMER_MODELS.items():
        assert facts["version"] == helical_map[name]["model_version"]
        assert facts["input_size"] == helical_map[name]["input_size"]
        assert facts["special_tokens"] == helical_map[name]["special_token"]


def test_tiny_model_has_real_layout(tiny_v1, tiny_v2):
    assert (tiny_v1.model_dir / "pytorch_model.bin").is_file()  # v1 ships .bin weights
    assert (tiny_v2.model_dir / "model.safetensors").is_file()
    for files in (tiny_v1, tiny_v2):
        for name in ("config.json", "training_args.bin"):
            assert (files.model_dir / name).is_file()
        tokens, medians, mapping = files.load_dictionaries()
        assert tokens["<pad>"] == 0 and tokens["<mask>"] == 1
        genes = [key for key in tokens if not key.startswith("<")]
        assert set(genes) == set(medians) and all(mapping[g] == g for g in genes)
        # As Geneformer's ensembl_mapping_dict: upper-case gene symbols map to Ensembl ids too.
        symbols = [key for key in mapping if not key.startswith("ENS")]
        assert len(symbols) == len(genes) and mapping["SYN1"] == genes[0] and all(mapping[s] in medians for s in symbols)
    assert "<cls>" in tiny_v2.load_dictionaries()[0] and "<cls>" not in tiny_v1.load_dictionaries()[0]


def test_helical_loads_staged_model_without_network(tiny_v1, monkeypatch):
    """helical's own Downloader would HEAD S3 for every file: any connection attempt fails here."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    model = helical_geneformer(tiny_v1, batch_size=4)
    assert model.model.config.hidden_size == 128
    assert attempts == []


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(HelixflowError, match="not staged.*helixflow model stage"):
        ModelFiles(tmp_path, "gf-6L-10M-i2048").check()


def test_architecture_staging_uses_real_config(tmp_path):
    files = ModelFiles(tmp_path, "gf-6L-10M-i2048")
    stage_architecture(files, "gf-6L-10M-i2048")
    config = json.loads((files.model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (6, 256, 25426)
    assert len(files.load_dictionaries()[0]) == 25426
    with pytest.raises(HelixflowError, match="no architecture config"):
        stage_architecture(files, "gf-99L")


def test_stage_from_archive_and_folder(tiny_v1, tmp_path):
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(tiny_v1.version_dir, arcname="v1")
    target = ModelFiles(tmp_path / "staged", tiny_v1.model_name)
    stage_from_path(target, archive)
    target.check()
    assert (target.model_dir / "pytorch_model.bin").read_bytes() == (tiny_v1.model_dir / "pytorch_model.bin").read_bytes()
    with pytest.raises(HelixflowError, match="not a Geneformer model folder"):
        stage_from_path(ModelFiles(tmp_path / "other", tiny_v1.model_name), tmp_path / "staged")


@pytest.fixture()
def model_server(tiny_v1):
    """Serve the tiny model's files over HTTP on loopback, laid out like helical's bucket."""
    root = tiny_v1.prefix / ".cache" / "helical" / "models"
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", root
    server.shutdown()


def test_download_verifies_checksums(tiny_v1, model_server, tmp_path):
    url, root = model_server
    manifest = {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in tiny_v1.relative_paths}
    good = ModelFiles(tmp_path / "good", tiny_v1.model_name)
    stage_download(good, base_url=url, sha256=manifest)
    assert pickle.loads(good.token_dictionary.read_bytes()) == tiny_v1.load_dictionaries()[0]

    manifest[tiny_v1.relative_paths[-1]] = "0" * 64
    bad = ModelFiles(tmp_path / "bad", tiny_v1.model_name)
    with pytest.raises(HelixflowError, match="checksum mismatch"):
        stage_download(bad, base_url=url, sha256=manifest)
    assert not bad.model_dir.exists()
