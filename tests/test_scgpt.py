"""scGPT: a synthetic model staged in helical's layout and loaded by helical with no network."""

from __future__ import annotations

import socket

import pytest
import torch

from helixflow.errors import HelixflowError
from helixflow.scgpt.files import ARCHITECTURES, SPECIAL_TOKENS, ScGPTFiles, helical_scgpt, stage_synthetic


@pytest.fixture(scope="module")
def tiny_scgpt(tmp_path_factory) -> ScGPTFiles:
    files = ScGPTFiles(tmp_path_factory.mktemp("scgpt"))
    stage_synthetic(files)
    return files


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


def test_helical_loads_staged_model_without_network(tiny_scgpt, monkeypatch):
    """helical's Downloader would reach S3, and its loader silently skips weights of the wrong shape."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    model = helical_scgpt(tiny_scgpt, batch_size=4)
    staged = torch.load(tiny_scgpt.weights, weights_only=True)
    loaded = model.model.state_dict()
    assert attempts == []
    assert staged.keys() == loaded.keys() and all(torch.equal(staged[key], loaded[key]) for key in staged)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(HelixflowError, match="not staged.*helixflow model stage"):
        ScGPTFiles(tmp_path).load_vocabulary()
