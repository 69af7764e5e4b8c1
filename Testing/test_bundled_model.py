"""The bundled model: safe to load, small, carded with the numbers it was measured at, and the default of
`noduleai detect`; its recorded result on the real radiomics lung1 lesion is reproduced here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RADIOMICS_IMAGE, require

from noduleai import DISCLAIMER
from noduleai.assessment import nodule_hit
from noduleai.checkpoint import bundled_model_path, load_model
from noduleai.cli import main
from noduleai.detect import Candidate
from noduleai.recipe import BUNDLED_MODEL_NAME, BUNDLED_PREPROCESS, lesion_of_label
from noduleai.records import NoduleRecord


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    assert path is not None, "no bundled model in Resources/Models"
    model, info = load_model(path)
    return path, model, info


def test_bundled_model_is_small_safe_and_carded(bundled):
    path, model, info = bundled
    assert path.stat().st_size <= 20 * 2**20
    assert info.name == BUNDLED_MODEL_NAME and info.task == "patch"
    assert info.preprocess_config == BUNDLED_PREPROCESS
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert payload["info"]["name"] == BUNDLED_MODEL_NAME
    card = path.with_suffix(".md").read_text()
    for text in (DISCLAIMER, "## Intended use", "## Limits", "without real LIDC pixels", "lesion insertion",
                 "classical blob baseline", "noduleai build-model"):
        assert text.lower() in card.lower(), text
    detection = info.metrics["detection"]
    assert f"| {detection['insertion_test']['cpm']:.3f} |" in card  # the card shows the recorded CPM
    assert {r["case"] for r in detection["real"]} >= {"LIDC-IDRI-0001_12", "radiomics-lung1"}


def test_detect_uses_the_bundled_model_by_default_and_reproduces_its_lung1_result(bundled, tmp_path):
    _, _, info = bundled
    code = main(["-q", "detect", str(require(RADIOMICS_IMAGE)), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    report = json.loads((tmp_path / "lung1_image_report.json").read_text())
    assert report["model"]["name"] == BUNDLED_MODEL_NAME and report["disclaimer"] == DISCLAIMER
    recorded = next(r for r in info.metrics["detection"]["real"] if r["case"] == "radiomics-lung1")
    centre, diameter = lesion_of_label(require(RADIOMICS_IMAGE).with_name("lung1_label.nrrd"))
    candidates = [Candidate(c["rank"], tuple(c["position_lps"]), tuple(c["position_ras"]), c["probability"],
                            c["diameter_mm"]) for c in report["candidates"]]
    hit = nodule_hit(candidates, NoduleRecord(centre, diameter))
    # The shipped evaluation listed candidates down to P >= 0.02, the default stops at 0.1; the lesion
    # (recorded rank 1, P 0.97 for v1) is above both, so it must be found again at the same rank and P.
    assert recorded["probability"] is not None and recorded["probability"] >= 0.1
    assert hit["rank"] == recorded["rank"]
    assert hit["probability"] == pytest.approx(recorded["probability"], abs=1e-4)
