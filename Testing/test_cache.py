"""The preprocessing cache: the same arrays as detection's preprocessing, reuse, rebuild, skips, workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import RADIOMICS_IMAGE, require

from noduleai.cache import build_cache, load_cache
from noduleai.io import read_ct
from noduleai.preprocess import PATCH_PREPROCESS, PreprocessConfig, preprocess_ct
from noduleai.records import CaseRecord, load_manifest
from noduleai.synthetic import write_phantom_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_phantom_cohort(tmp_path_factory.mktemp("phantoms"), 3, seed=3, size_xyz=(64, 56, 40))


def test_cache_holds_exactly_the_shared_preprocessing(cohort, tmp_path):
    entries, skipped = build_cache(cohort, PATCH_PREPROCESS, tmp_path, progress=False)
    assert not skipped and len(entries) == 3
    direct = preprocess_ct(read_ct(cohort[0].image_path), PATCH_PREPROCESS)
    assert np.allclose(entries[0].load(), direct.array, atol=1e-3)  # float16 storage
    assert np.array_equal(entries[0].load_mask(), direct.mask_array)
    assert entries[0].reference_image().GetOrigin() == pytest.approx(direct.image.GetOrigin())
    # Nodule centres are stored in cached voxel coordinates and land on nodule tissue, denser than
    # the -860 HU parenchyma (0.1) even for ground-glass nodules (-650 HU: 0.25).
    for entry in entries:
        for n in entry.nodules:
            assert entry.load()[tuple(int(round(v)) for v in n["zyx"])] > 0.2


def test_valid_entries_are_reused_stale_and_corrupt_ones_rebuilt(cohort, tmp_path):
    entries, _ = build_cache(cohort, PATCH_PREPROCESS, tmp_path, progress=False)
    stamps = {e.case_id: os.path.getmtime(e.array_path) for e in entries}
    again, _ = build_cache(cohort, PATCH_PREPROCESS, tmp_path, progress=False)
    assert {e.case_id: os.path.getmtime(e.array_path) for e in again} == stamps
    # Corrupt one array: truncated file -> rebuilt.
    victim = again[1]
    with open(victim.array_path, "r+b") as handle:
        handle.truncate(100)
    rebuilt, _ = build_cache(cohort, PATCH_PREPROCESS, tmp_path, progress=False)
    assert rebuilt[1].load().shape == tuple(victim.shape)
    # Other preprocessing parameters -> every entry is stale.
    other = PreprocessConfig(spacing_mm=(2.0, 2.0, 2.0))
    coarse, _ = build_cache(cohort, other, tmp_path, progress=False)
    assert all(e.config_hash != entries[0].config_hash for e in coarse)
    assert coarse[0].shape[0] < entries[0].shape[0]
    assert len(load_cache(tmp_path)) == 3


def test_bad_cases_are_skipped_with_reasons_and_workers_agree(cohort, tmp_path):
    broken = tmp_path / "broken.nrrd"
    broken.write_bytes(require(RADIOMICS_IMAGE).read_bytes()[:5000])
    cases = cohort + [CaseRecord("broken", "broken", str(broken), 0)]
    entries, skipped = build_cache(cases, PATCH_PREPROCESS, tmp_path / "a", workers=2, progress=False)
    assert [e.case_id for e in entries] == [c.case_id for c in cohort]
    assert skipped[0][0] == "broken" and str(broken) in skipped[0][1]
    assert (tmp_path / "a" / "skipped.csv").read_text().count("broken") >= 1
    serial, _ = build_cache(cohort, PATCH_PREPROCESS, tmp_path / "b", workers=1, progress=False)
    for a, b in zip(entries, serial):
        assert np.array_equal(a.load(), b.load())


def test_manifest_round_trip(cohort):
    manifest = load_manifest(os.path.join(os.path.dirname(cohort[0].image_path), "manifest.json"))
    assert [c.case_id for c in manifest] == [c.case_id for c in cohort]
    assert manifest[0].nodules == cohort[0].nodules


def test_keyed_work_is_reused_only_for_the_inputs_that_made_it(tmp_path):
    """A resumable stage's folder survives a rerun with the same inputs and is wiped when they changed (or
    when nothing says what made it); a keyed record is read back only under its own key."""
    from noduleai.files import content_key, keyed_folder, read_keyed, write_json_atomic

    key = content_key({"cases": ["a", "b"], "epochs": 4})
    assert key == content_key({"epochs": 4, "cases": ["a", "b"]})  # the same inputs in another order
    assert key != content_key({"cases": ["a", "c"], "epochs": 4})
    run = keyed_folder(tmp_path / "run", key)
    (run / "last.pt").write_text("progress")
    assert (keyed_folder(tmp_path / "run", key) / "last.pt").read_text() == "progress"  # resumed
    assert not (keyed_folder(tmp_path / "run", content_key("other")) / "last.pt").exists()  # stale: wiped
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "last.pt").write_text("unknown inputs")
    assert not (keyed_folder(tmp_path / "legacy", key) / "last.pt").exists()
    write_json_atomic({"key": key, "mined": {"a": [[1.0, 2.0, 3.0]]}}, tmp_path / "mined.json")
    assert read_keyed(tmp_path / "mined.json", key)["mined"] == {"a": [[1.0, 2.0, 3.0]]}
    assert read_keyed(tmp_path / "mined.json", content_key("other")) is None
    assert read_keyed(tmp_path / "absent.json", key) is None
