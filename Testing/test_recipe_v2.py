"""Detector v2's leave-one-host-out protocol, run for real on two hosts with token training: no fold's
model sees its test host, no test lesion comes from a patient whose crops trained it, finished folds
are reused when nothing that made them changed (staleness: test_real_paste, test_candidate_net).
Slow (two hosts' cohorts, two folds, ~13 min on 2 cores)."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, require

from noduleai.crops import read_crop_index, split_by_patient
from noduleai.io import read_ct
from noduleai.real_cohort import load_real_host
from noduleai.recipe_v2 import (
    CROP_PARTS,
    RANKINGS,
    V2_SEED,
    V2Paths,
    build_v2_cohorts,
    fold_detector,
    held_out_explanations,
    leave_one_host_out,
    on_original_ct,
    original_case,
    reproduces,
    stored_per_fold,
    thick_slice_stress,
)


@pytest.mark.slow
def test_leave_one_host_out_keeps_hosts_and_patients_apart(tmp_path):
    require(SHARED_DATA / "lidc-nodule-crops")
    report = leave_one_host_out(SHARED_DATA, tmp_path, candidate_steps=2, epochs=1, hosts=["totalseg", "lung1"],
                                progress=False)
    assert set(report["folds"]) == {"totalseg", "lung1"}
    paths = V2Paths(tmp_path)
    parts = split_by_patient(read_crop_index(SHARED_DATA / "lidc-nodule-crops"), CROP_PARTS, V2_SEED)
    trained_on = {c.patient_id for c in parts["train"]} | {c.patient_id for c in parts["validation"]}
    for held_out, fold in report["folds"].items():
        assert held_out not in fold["training_hosts"] and fold["training_hosts"]
        test = json.loads((paths.cohort(held_out, "test") / "insertions.json").read_text())
        sources = {n["source_patient"] for lesions in test.values() for n in lesions}
        assert sources and not sources & trained_on
        manifest = json.loads((paths.cohort(held_out, "test") / "manifest.json").read_text())
        assert {c["patient_id"] for c in manifest} == {f"host:{held_out}"}
        assert fold["froc"]["scans"] == fold["test_cts"] == len(manifest)
        assert "temperature" in fold["calibration"] and 0.0 <= fold["calibration"]["operating_threshold"] <= 1.0
        assert set(fold["cpm_by_ranking"]) == set(RANKINGS) and fold["operating_point"]["scans"] == fold["test_cts"]
    # A finished fold's detector, rebuilt from its saved stages, gives its recorded result again (what the
    # thick-slice stress test relies on), and the thick slices are measured with the same protocol.
    real = {"lung1": load_real_host(SHARED_DATA, "lung1")}
    original = original_case(real["lung1"])
    fold = report["folds"]["lung1"]
    detector = fold_detector(paths, fold)
    assert detector.operating_threshold == fold["calibration"]["operating_threshold"]
    assert reproduces(fold["original_ct"], on_original_ct(detector, original,
                                                          detector.scored_proposals(read_ct(original.image_path))))
    cohorts, _ = build_v2_cohorts(SHARED_DATA, paths, ["totalseg", "lung1"], progress=False)
    stress = thick_slice_stress(paths, cohorts, real, {"lung1": fold}, (8.0,), progress=False)
    assert stress["lung1"]["8.0"]["froc"]["scans"] == fold["test_cts"]
    # The unseen real lesion as a reader sees it (detect with Grad-CAM): the same rank and P as the fold's
    # record, and where the heatmap peaks, by the hit rule.
    explained = held_out_explanations(paths, real, {"lung1": fold}, progress=False)
    row, recorded = explained["lung1"][0], fold["original_ct"]["real_lesions"][0]
    assert row["rank"] == recorded["rank"]
    assert row["heat_peak_distance_mm"] is not None
    assert row["heat_peak_inside"] == (row["heat_peak_distance_mm"] <= row["diameter_mm"] / 2)
    stamp = paths.fold_result("lung1").stat().st_mtime_ns
    again = leave_one_host_out(SHARED_DATA, tmp_path, candidate_steps=2, epochs=1, hosts=["totalseg", "lung1"],
                               progress=False)
    assert paths.fold_result("lung1").stat().st_mtime_ns == stamp  # unchanged inputs: the fold is reused
    assert again["folds"]["lung1"]["key"] == report["folds"]["lung1"]["key"]


def test_per_fold_records_are_stored_by_the_folds_keys_and_measured_again_when_stale(tmp_path):
    """What build-model stores per fold (thick-slice stress, held-out explanations) is reused only while the
    folds and settings that made it are unchanged; folds without a detector or without a record are left out."""
    paths = V2Paths(tmp_path)
    calls = []

    def measure(host, fold):
        calls.append(host)
        return None if host == "cptac" else {"measured": fold["key"]}

    folds = {"lidc0001": {"key": "k1", "calibration": {}}, "totalseg": {"key": "k2"},  # candidates only
             "cptac": {"key": "k3", "calibration": {}}}
    first = stored_per_fold(paths, "record.json", folds, [8.0], measure)
    assert first == {"lidc0001": {"measured": "k1"}} and calls == ["lidc0001", "cptac"]
    assert stored_per_fold(paths, "record.json", folds, [8.0], measure) == first and len(calls) == 2  # reused
    stored_per_fold(paths, "record.json", folds, [5.0], measure)  # another setting: measured again
    assert len(calls) == 4
    folds["lidc0001"]["key"] = "k1-retrained"
    again = stored_per_fold(paths, "record.json", folds, [5.0], measure)  # a fold changed: measured again
    assert again == {"lidc0001": {"measured": "k1-retrained"}} and len(calls) == 6
