"""Checkpoints: round trip with metadata; wrong, corrupt, foreign and malicious files are refused."""

from __future__ import annotations

import os

import pytest
import torch

from noduleai.checkpoint import CheckpointError, ModelInfo, load_model, save_model
from noduleai.preprocess import PATCH_PREPROCESS


def _info() -> ModelInfo:
    return ModelInfo(arch="resnet10_3d", task="patch", input_size=(32, 32, 32), preprocess=PATCH_PREPROCESS.to_dict(),
                     width=0.125, small_input=True, metrics={"test": {"auc": 0.9}}, name="unit")


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    info = _info()
    model = info.build()
    path = tmp_path / "m.pt"
    save_model(path, model, info)
    loaded, back = load_model(path)
    assert back == info
    assert back.preprocess_config == PATCH_PREPROCESS
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not loaded.training


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_callable_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "noduleai-model", "info": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(path)


def test_corrupt_foreign_and_wrong_files_are_refused(tmp_path):
    info = _info()
    good = tmp_path / "good.pt"
    save_model(good, info.build(), info)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_model(truncated)
    bare = tmp_path / "bare.pt"
    torch.save(info.build().state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a NoduleAI checkpoint"):
        load_model(bare)
    other = tmp_path / "other.pt"
    payload = torch.load(good, weights_only=True)
    payload["info"]["arch"] = "resnet18_3d"  # weights no longer fit the architecture
    torch.save(payload, other)
    with pytest.raises(CheckpointError, match="do not describe a valid model"):
        load_model(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    state = tmp_path / "state.pt"
    torch.save({"format": "noduleai-training-state"}, state)
    with pytest.raises(CheckpointError, match="expected 'noduleai-model'"):
        load_model(state)
