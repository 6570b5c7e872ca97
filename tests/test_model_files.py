"""Model staging in helical's layout, and loading helical's Geneformer with no network."""

from __future__ import annotations

import hashlib
import http.server
import json
import pickle
import shutil
import tarfile
import threading

import numpy as np
import pytest

from helixflow.cli import main
from helixflow.errors import HelixflowError
from helixflow.geneformer_models import GENEFORMER_MODELS
from helixflow.model_files import (
    DICTIONARY_VALUE_KINDS,
    ModelFiles,
    helical_geneformer,
    stage_architecture,
    stage_download,
    stage_from_path,
)
from helixflow.profiles import DEFAULT_PROFILES_DIR
from helixflow.safe_pickle import load_plain_dict


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


def test_helical_loads_staged_model_without_network(tiny_v1, network_attempts):
    """helical's own Downloader would HEAD S3 for every file: any connection attempt fails here."""
    model = helical_geneformer(tiny_v1, batch_size=4)
    assert model.model.config.hidden_size == 128
    assert network_attempts == []


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


class _RunsCode:
    """Unpickled by plain pickle, this writes a marker file: what a hostile dictionary does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _model_folder(tiny_v1, folder, **replaced):
    """A copy of the tiny model's ``geneformer/v1`` folder with some dictionaries replaced."""
    shutil.copytree(tiny_v1.version_dir, folder)
    for name, content in replaced.items():
        (folder / name).write_bytes(pickle.dumps(content))
    return folder


def test_pickle_that_would_run_code_is_refused(tiny_v1, tmp_path):
    marker = tmp_path / "code-ran"
    hostile = {"<pad>": 0, "<mask>": 1, "ENSG00000000001": _RunsCode(marker)}
    pickle.loads(pickle.dumps(hostile))  # plain pickle runs it: the test pickle is real
    assert marker.exists()
    marker.unlink()

    source = _model_folder(tiny_v1, tmp_path / "handed", **{"token_dictionary.pkl": hostile})
    target = ModelFiles(tmp_path / "staged", tiny_v1.model_name)
    with pytest.raises(HelixflowError, match=r"token_dictionary\.pkl: refused to load: the pickle asks for builtins\.exec"):
        stage_from_path(target, source)
    assert not marker.exists()
    assert not target.version_dir.exists() or not any(target.version_dir.iterdir())  # nothing staged


def test_cli_stage_refuses_hostile_archive(tiny_v1, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    source = _model_folder(tiny_v1, tmp_path / "v1", **{"ensembl_mapping_dict.pkl": {"SYN1": _RunsCode(marker)}})
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(source, arcname="v1")
    models = tmp_path / "models"
    assert main(["model", "stage", "--profile", "tiny", "--models-dir", str(models), "--from", str(archive)]) == 2
    assert "ensembl_mapping_dict.pkl: refused to load: the pickle asks for builtins.exec" in capsys.readouterr().err
    assert not marker.exists()
    assert not list(models.rglob("*.pkl")) and not list(models.rglob("config.json"))


def test_hand_placed_hostile_dictionary_is_refused_before_helical(tiny_v1, tmp_path):
    """helical's tokenizer pickle.loads the staged paths itself: helixflow checks them first."""
    marker = tmp_path / "code-ran"
    staged = ModelFiles(tmp_path / "cache", tiny_v1.model_name)
    shutil.copytree(tiny_v1.prefix, staged.prefix)
    staged.gene_median_dictionary.write_bytes(pickle.dumps({"ENSG00000000001": _RunsCode(marker)}))
    with pytest.raises(HelixflowError, match=r"gene_median_dictionary\.pkl: refused to load"):
        helical_geneformer(staged, batch_size=4)
    assert not marker.exists()


def test_hostile_weights_are_refused_by_transformers(tiny_v1, tmp_path):
    """v1 weights are torch pickles; transformers loads them with weights_only=True."""
    import torch

    marker = tmp_path / "code-ran"
    staged = ModelFiles(tmp_path / "cache", tiny_v1.model_name)
    shutil.copytree(tiny_v1.prefix, staged.prefix)
    torch.save({"bert.embeddings.word_embeddings.weight": _RunsCode(marker)}, staged.model_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        helical_geneformer(staged, batch_size=4)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("token_dictionary.pkl", {"<pad>": 0, "G": np.array([1])}, r"asks for numpy\._core\.multiarray\._reconstruct"),
        ("gene_median_dictionary.pkl", {"G": np.str_("1.0")}, r"numpy\.dtype\('U3'.*not numeric"),
        ("gene_median_dictionary.pkl", {"G": np.float32(1.5), "H": "2.0"}, r"maps 'H' to '2\.0' \(str\); values must be of kind number"),
        ("token_dictionary.pkl", [("<pad>", 0)], "holds a list, not a dictionary"),
        ("ensembl_mapping_dict.pkl", {7: "G"}, "key 7 of type int"),
    ],
)
def test_dictionaries_beyond_plain_data_are_refused(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(HelixflowError, match=problem):
        load_plain_dict(path, value_kind=DICTIONARY_VALUE_KINDS[name])


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "G": 2})[:-3])
    with pytest.raises(HelixflowError, match="not a readable pickle"):
        load_plain_dict(path, value_kind="integer")


def test_real_shaped_dictionaries_load(tmp_path):
    """Geneformer's files: str -> int tokens, str -> float (numpy float32 in some releases) medians, str -> str mapping."""
    contents = {
        "token_dictionary.pkl": {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 2, "ENSG00000000005": np.int64(3)},
        "gene_median_dictionary.pkl": {"ENSG00000000003": np.float32(2.5), "ENSG00000000005": 0.75, "ENSG00000000419": np.float64(1)},
        "ensembl_mapping_dict.pkl": {"ENSG00000000003": "ENSG00000000003", "TSPAN6": "ENSG00000000003"},
    }
    for name, content in contents.items():
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            (tmp_path / name).write_bytes(pickle.dumps(content, protocol=protocol))
            loaded = load_plain_dict(tmp_path / name, value_kind=DICTIONARY_VALUE_KINDS[name])
            assert loaded == content and [type(v) for v in loaded.values()] == [type(v) for v in content.values()]


def test_cli_stage_checks_files_already_in_place(tiny_v1, tmp_path, capsys):
    """A profile with source: staged (files copied in by hand) gets the same check."""
    marker = tmp_path / "code-ran"
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    profile = (DEFAULT_PROFILES_DIR / "tiny.yaml").read_text()
    (profiles / "copied.yaml").write_text(profile.replace("name: tiny", "name: copied").replace("source: tiny", "source: staged"))
    staged = ModelFiles(tmp_path / "models" / "copied", tiny_v1.model_name)
    shutil.copytree(tiny_v1.prefix, staged.prefix)
    args = ["model", "stage", "--profile", "copied", "--models-dir", str(tmp_path / "models"), "--profiles-dir", str(profiles)]
    assert main(args) == 0
    staged.token_dictionary.write_bytes(pickle.dumps({"<pad>": _RunsCode(marker)}))
    assert main(args) == 2
    assert "token_dictionary.pkl: refused to load" in capsys.readouterr().err and not marker.exists()
