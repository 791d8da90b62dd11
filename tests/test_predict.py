"""From a fitted run to verdicts on new images: the bundle every run writes, ``ad.predict``, and their parity."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import QUICK, TINY

from ad.bundle import METADATA, TENSORS, load_bundle
from ad.data import make_mvtec_layout
from ad.errors import ADError
from ad.predict import main as predict_main
from ad.predict import predict
from ad.predictions import read_predictions


@pytest.mark.parametrize("method", sorted(QUICK))
def test_predict_reproduces_the_runs_own_test_scores(method, fitted, tmp_path):
    run_dir = fitted(method)
    expected = read_predictions(run_dir / "predictions.csv")
    out, summary = predict(str(run_dir), [row["path"] for row in expected], tmp_path / "out")
    got = read_predictions(out / "predictions.csv")
    assert [row["path"] for row in got] == [row["path"] for row in expected]
    run_scores = np.array([float(row["score"]) for row in expected])
    new_scores = np.array([float(row["score"]) for row in got])
    np.testing.assert_allclose(new_scores, run_scores, rtol=1e-5, atol=1e-7 * np.abs(run_scores).max())
    assert [row["label"] for row in got] == [row["label"] for row in expected]
    assert summary["scored"] == len(expected) and summary["failed"] == 0
    meta = json.loads((run_dir / "model" / METADATA).read_text())
    assert meta["method"]["class"].startswith("ad.models.") and meta["training"]["n_val"] == 2
    assert ("anomalous_area" in got[0]) == (meta["produces_maps"] and meta["thresholds"]["pixel"] is not None)


def test_run_writes_thresholds_and_operating_point(fitted):
    run_dir = fitted("padim")
    results = json.loads((run_dir / "metrics.json").read_text())
    for key in ("image_threshold", "pixel_threshold", "image_precision", "image_recall", "image_false_reject_rate",
                "image_false_accept_rate", "pixel_F1", "pixel_IoU", "image_threshold_frr_bound", "image_AUROC"):
        assert key in results, key
    rows = read_predictions(run_dir / "predictions.csv")
    assert {"path", "score", "label", "target", "defect"} <= set(rows[0])
    flagged = [float(r["score"]) >= results["image_threshold"] for r in rows]
    assert [int(r["label"]) for r in rows] == [int(f) for f in flagged]
    bad = [r for r in rows if r["target"] == "1"]
    assert results["image_recall"] == pytest.approx(np.mean([r["label"] == "1" for r in bad]))


def test_loading_a_bundle_never_unpickles(fitted, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bundle must load without pickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    bundle = load_bundle(fitted("padim"))
    assert bundle.image_threshold is not None and bundle.model.weights_source == "random"
    assert sorted(p.name for p in (fitted("padim") / "model").iterdir()) == [METADATA, TENSORS]


@pytest.fixture
def bundle_copy(fitted, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(fitted("padim") / "model", copy)
    return copy


def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / METADATA).read_text())
    change(meta)
    (folder / METADATA).write_text(json.dumps(meta))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / TENSORS).write_bytes((f / TENSORS).read_bytes()[:-100]), "checksum"),
    (lambda f: (f / TENSORS).unlink(), "missing"),
    (lambda f: (f / METADATA).write_text("{not json"), "not a readable bundle"),
    (lambda f: edit_meta(f, lambda m: m["method"].update({"class": "os.system"})), "not one of ad.models"),
    (lambda f: edit_meta(f, lambda m: m["method"].update({"class": "ad.bundle.Bundle"})), "not one of ad.models"),
    (lambda f: edit_meta(f, lambda m: m["method"].update({"class": "ad.models.base.TrainableModel"})), "do not fit"),
    (lambda f: edit_meta(f, lambda m: m.update({"format_version": 99})), "format 99"),
    (lambda f: edit_meta(f, lambda m: m["tensors"].update({"file": "../x.safetensors"})), "not a file name"),
    (lambda f: edit_meta(f, lambda m: m.pop("thresholds")), "'thresholds' is missing"),
])
def test_a_damaged_bundle_is_one_clear_error(bundle_copy, damage, message):
    damage(bundle_copy)
    with pytest.raises(ADError, match=message):
        load_bundle(bundle_copy)


def test_predict_command_names_unreadable_images_and_scores_the_rest(fitted, tmp_path, capsys):
    rows = read_predictions(fitted("padim") / "predictions.csv")
    folder = tmp_path / "new"
    folder.mkdir()
    for row in rows[:3]:
        shutil.copy(row["path"], folder / f"{Path(row['path']).parent.name}_{Path(row['path']).name}")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    status = predict_main([str(fitted("padim")), str(folder), "--out", str(out), "--save-maps"])
    captured = capsys.readouterr()
    assert status == 1
    assert "broken.png" in captured.err
    assert captured.out.startswith("3 images scored") and str(out / "predictions.csv") in captured.out
    assert len(read_predictions(out / "predictions.csv")) == 3
    assert len(list((out / "maps").glob("*.png"))) == 3 and len(list((out / "masks").glob("*.png"))) == 3


@pytest.mark.parametrize(("inputs", "message"), [
    (["empty"], "folder has no images"),
    (["nowhere"], "no such file or folder"),
    (["*.jpg"], "no images match"),
])
def test_predict_with_nothing_to_score_writes_nothing(fitted, tmp_path, capsys, monkeypatch, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    status = predict_main([str(fitted("padim")), *inputs, "--out", "out"])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_predict_with_a_missing_bundle_is_one_line(tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert predict_main([str(tmp_path / "run"), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or folder" in err[0]


def test_a_folder_of_good_images_alone_fits_calibrates_and_flags(tmp_path):
    """The first promise of the README: only good images, one command to fit, one to flag new images."""
    make_mvtec_layout(tmp_path / "data", "widget", n_train=12, n_test_good=4, n_test_defect=4, image_size=64, seed=0)
    good = tmp_path / "data" / "widget" / "train" / "good"
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "ad.launch", *TINY, "dataset=folder", f"dataset.normal_dir={good}",
               "tracking=none", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((run_dir / "metrics.json").read_text())
    assert "image_AUROC" not in results and "pixel_AUROC" not in results  # not measurable: absent, not faked
    assert results["image_threshold"] > 0 and 0 <= results["image_false_reject_rate"] <= 1
    flagged = subprocess.run([sys.executable, "-m", "ad.predict", str(run_dir),
                              str(tmp_path / "data" / "widget" / "test"), "--out", str(tmp_path / "verdicts")],
                             capture_output=True, text=True, timeout=600)
    assert flagged.returncode == 0, flagged.stderr[-2000:]
    assert flagged.stdout.startswith("8 images scored")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_predict_runs_an_exported_detector_without_torch(fmt, fitted, tmp_path):
    """An exported file gives ad.predict's CSV with torch unimportable, and agrees with the bundle's scores."""
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "openvino")
    from ad.export.export import export_bundle

    run_dir = fitted("padim")
    exported = export_bundle(run_dir, fmt, tmp_path / ("padim.onnx" if fmt == "onnx" else "padim.xml"))
    rows = read_predictions(run_dir / "predictions.csv")
    images = tmp_path / "images"
    images.mkdir()
    for row in rows:
        shutil.copy(row["path"], images / f"{Path(row['path']).parent.name}_{Path(row['path']).name}")
    script = ("import sys\nsys.modules['torch'] = None\nfrom ad.predict import main\n"
              f"code = main([{str(exported.path)!r}, {str(images)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
              "assert sys.modules.get('torch') is None\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = {Path(r["path"]).name: float(r["score"]) for r in read_predictions(tmp_path / "out" / "predictions.csv")}
    expected = {f"{Path(r['path']).parent.name}_{Path(r['path']).name}": float(r["score"]) for r in rows}
    assert got.keys() == expected.keys()
    names = sorted(got)
    # the run scored in bf16, the exported detector in fp32: equal up to bf16's rounding of the backbone
    np.testing.assert_allclose([got[n] for n in names], [expected[n] for n in names], rtol=1e-2)
