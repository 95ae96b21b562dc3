"""``trust_remote_code``: a checkpoint whose config needs its own Python code is refused unless the
caller opts in; with the opt-in, the checkpoint's code runs (and the family check comes next)."""

import json

import pytest

from conftest import perturbed_copy, save, tiny_model
from weightpatch.errors import UnknownArchitectureError, WeightPatchError
from weightpatch.pair import load_pair

CONFIG_CODE = """
import os

from transformers import LlamaConfig

open(os.environ["WP_REMOTE_MARKER"], "w").close()  # proof that this file was executed


class RemoteConfig(LlamaConfig):
    model_type = "wp_remote"
"""


def remote_code_checkpoint(directory, model):
    """``model`` saved with a config of model_type ``wp_remote`` defined in the checkpoint's own
    ``configuration_remote.py`` (auto_map), as hub models with custom code are."""
    save(model, directory)
    (directory / "configuration_remote.py").write_text(CONFIG_CODE)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "wp_remote"
    config["auto_map"] = {"AutoConfig": "configuration_remote.RemoteConfig"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_remote_code_is_refused_by_default_and_runs_on_opt_in(tmp_path, monkeypatch):
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("WP_REMOTE_MARKER", str(marker))
    base = tiny_model("llama")
    dirs = (
        remote_code_checkpoint(tmp_path / "base", base),
        remote_code_checkpoint(tmp_path / "sft", perturbed_copy(base)),
    )
    with pytest.raises(WeightPatchError, match="cannot read a model config") as refused:
        load_pair(*dirs)
    assert "trust_remote_code" in str(refused.value) and not marker.exists()
    # opted in, the checkpoint's RemoteConfig is loaded: the next check is the family description
    with pytest.raises(UnknownArchitectureError, match="no architecture description for model_type 'wp_remote'"):
        load_pair(*dirs, trust_remote_code=True)
    assert marker.exists()
