"""Exported detectors (ONNX, OpenVINO): equal to the bundle that made them, run without torch, strict on input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ad.bundle import load_bundle
from ad.data.io import read_image
from ad.errors import ADError
from ad.export import export as export_module
from ad.export.cli import main as export_main
from ad.export.export import MAP_RTOL, SCORE_RTOL, export_bundle
from ad.export.runtime import load_exported
from ad.export.scorers import ModelForward, in_fp32, scorer_for
from ad.predict import score_images
from ad.predictions import read_predictions

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("openvino", reason="the export extra is not installed: pip install -e '.[export]'")

METHODS = ["padim", "patchcore", "stfpm", "reverse_distillation", "dfm", "dfkde", "cflow", "ganomaly"]
#: Methods with an export forward of their own (the others export their model's forward).
OWN_FORWARD = ["padim", "patchcore", "cflow", "dfkde"]


def run_images(run_dir: Path, size: int) -> np.ndarray:
    """The run's own test images, uint8 (B, S, S, 3), read as ad.predict reads them."""
    return np.stack([read_image(Path(row["path"]), size) for row in read_predictions(run_dir / "predictions.csv")])


def torch_fp32(run_dir: Path, images: np.ndarray):
    """The bundle's scores and maps with its backbone in fp32 (the run itself may have used bf16)."""
    bundle = load_bundle(run_dir)
    in_fp32(bundle.model)
    return bundle, *score_images(bundle, images, torch.device("cpu"))


def assert_agree(flags: np.ndarray, expected_flags: np.ndarray, values: np.ndarray, threshold: float, tol: float):
    """Verdicts agree except where the torch value is within ``tol`` of the threshold."""
    clear = np.abs(values - threshold) > tol
    assert clear.any()
    np.testing.assert_array_equal(flags[clear], expected_flags[clear])


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("method", METHODS)
def test_exported_detector_matches_the_bundle(method, fmt, fitted, tmp_path):
    run_dir = fitted(method)
    out = tmp_path / ("detector.onnx" if fmt == "onnx" else "detector.xml")
    export_bundle(run_dir, fmt, out, verify=False)
    bundle, scores, maps = torch_fp32(run_dir, images := run_images(run_dir, 64))
    got = load_exported(out).run(images)
    np.testing.assert_allclose(got["score"], scores, rtol=0, atol=SCORE_RTOL * np.abs(scores).max())
    threshold = bundle.image_threshold
    assert_agree(got["label"], (scores >= threshold).astype(np.uint8), scores, threshold, SCORE_RTOL * abs(threshold))
    assert ("anomaly_map" in got) == bundle.produces_maps == (maps is not None)
    if maps is not None:
        spread = maps.max() - maps.min()
        np.testing.assert_allclose(got["anomaly_map"], maps, rtol=0, atol=MAP_RTOL * spread)
        pixel = bundle.pixel_threshold
        assert_agree(got["mask"], (maps >= pixel).astype(np.uint8), maps, pixel, MAP_RTOL * spread)


@pytest.mark.parametrize("method", OWN_FORWARD)
def test_export_forward_equals_the_models_forward(method, fitted):
    run_dir = fitted(method)
    model = in_fp32(load_bundle(run_dir).model)
    scorer = scorer_for(model)
    assert not isinstance(scorer, ModelForward)
    images = torch.from_numpy(run_images(run_dir, 64)).float().div(255).permute(0, 3, 1, 2) * 4 - 2
    with torch.no_grad():
        expected, (scores, maps) = model(images), scorer(images)
    torch.testing.assert_close(scores, expected.scores, rtol=1e-5, atol=1e-6 * expected.scores.abs().max())
    if expected.maps is not None:
        torch.testing.assert_close(maps, expected.maps, rtol=1e-5, atol=1e-6 * expected.maps.abs().max())


def test_metadata_fields_describe_the_detector(fitted, tmp_path):
    import onnx
    import openvino as ov

    run_dir = fitted("padim")
    meta = json.loads((run_dir / "model" / "bundle.json").read_text())
    onnx_file = export_bundle(run_dir, "onnx", tmp_path / "d.onnx", verify=False).path
    xml_file = export_bundle(run_dir, "openvino", tmp_path / "d.xml", verify=False).path
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    section = ov.Core().read_model(str(xml_file)).get_rt_info(["ad"]).astype(dict)
    rt_info = {key: value.astype(str) for key, value in section.items()}
    for found in (props, rt_info):
        assert found["method"] == "padim" and found["image_size"] == "64" and found["ad_version"] == "0.1.0"
        assert float(found["image_threshold"]) == meta["thresholds"]["image"]["value"]
        assert float(found["pixel_threshold"]) == meta["thresholds"]["pixel"]["value"]
        assert found["outputs"] == "score,label,anomaly_map,mask"


def test_fixed_batch_and_float_input_score_as_the_dynamic_uint8_file(fitted, tmp_path):
    run_dir = fitted("padim")
    images = run_images(run_dir, 64)
    dynamic = load_exported(export_bundle(run_dir, "onnx", tmp_path / "a.onnx").path)
    fixed = load_exported(export_bundle(run_dir, "openvino", tmp_path / "b.xml", batch=3).path)
    floats = load_exported(export_bundle(run_dir, "onnx", tmp_path / "c.onnx", input_kind="float32").path)
    assert fixed.batch == 3 and dynamic.batch is None and floats.input_kind == "float32"
    assert fixed.input_shape[0] == "3"
    expected, expected_maps = dynamic.score(images)
    for detector in (fixed, floats):
        scores, maps = detector.score(images)  # 8 images: chunks of 3, the last one padded
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
        np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=1e-5 * np.ptp(expected_maps))


def test_runner_scores_without_torch(fitted, tmp_path):
    run_dir = fitted("stfpm")
    files = [export_bundle(run_dir, fmt, tmp_path / name, verify=False).path
             for fmt, name in (("onnx", "d.onnx"), ("openvino", "d.xml"))]
    images = run_images(run_dir, 64)
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, numpy as np\nsys.modules['torch'] = None\n"
              "from ad.export.runtime import load_exported\n"
              f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
              f"for path in {[str(f) for f in files]!r}:\n"
              "    scores, maps = load_exported(path).score(images)\n"
              "    print(' '.join(repr(float(s)) for s in scores))\n"
              "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, expected, _ = torch_fp32(run_dir, images)
    for line in done.stdout.split("\n")[:2]:
        np.testing.assert_allclose([float(x) for x in line.split()], expected, rtol=SCORE_RTOL)


def test_wrong_images_are_one_clear_error(fitted, tmp_path):
    detector = load_exported(export_bundle(fitted("padim"), "onnx", tmp_path / "d.onnx", verify=False).path)
    for images, message in ((np.zeros((2, 32, 32, 3), np.uint8), r"shape \(B, 64, 64, 3\), got \(2, 32, 32, 3\)"),
                            (np.zeros((2, 64, 64, 4), np.uint8), r"got \(2, 64, 64, 4\)"),
                            (np.zeros((64, 64, 3), np.uint8), r"got \(64, 64, 3\)"),
                            (np.zeros((2, 64, 64, 3), np.float32), "uint8")):
        with pytest.raises(ADError, match=message):
            detector.score(images)


def test_a_method_without_a_format_is_refused_before_any_work(fitted, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(export_module.SUPPORTED, "padim", ("onnx",))
    out = tmp_path / "d.xml"
    assert export_main([str(fitted("padim")), "--format", "openvino", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "padim cannot be exported to openvino (supported for padim: onnx)" in err
    assert not out.exists()


@pytest.mark.parametrize("module", ["onnx", "openvino"])
def test_a_missing_runtime_names_the_extra(fitted, tmp_path, monkeypatch, module, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    fmt = "onnx" if module == "onnx" else "openvino"
    out = tmp_path / ("d.onnx" if fmt == "onnx" else "d.xml")
    assert export_main([str(fitted("padim")), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"'{module}' package" in err and "pip install -e '.[export]'" in err


def test_running_without_onnxruntime_names_the_extra(fitted, tmp_path, monkeypatch):
    path = export_bundle(fitted("padim"), "onnx", tmp_path / "d.onnx", verify=False).path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ADError, match=r"'onnxruntime' package.*pip install -e '\.\[export\]'"):
        load_exported(path)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "tflite"], "--format: 'tflite' is not one of onnx, openvino"),
    (["--format", "onnx", "--out", "x.xml"], "must end in .onnx"),
    (["--format", "onnx", "--batch", "0"], "--batch: 0 must be"),
    (["--format", "onnx", "--batch", "many"], "--batch: 'many' is not"),
    (["--format", "onnx", "--input", "uint16"], "--input: 'uint16' is not one of"),
])
def test_bad_requests_are_one_line_and_write_nothing(args, message, fitted, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_main([str(fitted("padim")), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (fitted("padim") / "export").exists() and not list(tmp_path.iterdir())


def test_a_file_that_disagrees_with_torch_is_not_kept(fitted, tmp_path, monkeypatch):
    real = export_module.load_and_run

    def drifted(path, images):
        found = real(path, images)
        return {**found, "score": found["score"] * (1 + 10 * SCORE_RTOL)}

    monkeypatch.setattr(export_module, "load_and_run", drifted)
    with pytest.raises(ADError, match="differ from torch"):
        export_bundle(fitted("padim"), "openvino", tmp_path / "d.xml")
    assert not list(tmp_path.iterdir())


def test_the_command_writes_beside_the_run_and_says_so(fitted, capsys):
    run_dir = fitted("dfkde")
    assert export_main([str(run_dir / "model"), "--format", "onnx"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"dfkde -> {run_dir / 'export' / 'dfkde.onnx'}") and "matches torch fp32" in line
    assert load_exported(run_dir / "export" / "dfkde.onnx").produces_maps is False


@pytest.mark.parametrize("method", OWN_FORWARD)
def test_an_export_forward_refuses_an_unfitted_model(method, fitted):
    from ad.bundle import build_model, read_meta

    fresh = build_model(read_meta(fitted(method) / "model"))
    with pytest.raises(RuntimeError, match="the model is not fitted"):
        scorer_for(fresh)


# int8 (OpenVINO, NNCF): the backbone quantised, calibrated on training images, refused when it costs AUROC


@pytest.fixture
def padim_run(fitted, tmp_path) -> Path:
    """A copy of the tiny PaDiM run with the config ad.launch saves beside it (where int8 finds the training images)."""
    from helpers import FIT_TINY, QUICK, compose_config
    from omegaconf import OmegaConf

    pytest.importorskip("nncf", reason="int8 needs nncf: pip install -e '.[export]'")
    run_dir = tmp_path / "run"
    shutil.copytree(fitted("padim"), run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(compose_config(*FIT_TINY, "model=padim", *QUICK["padim"]), run_dir / ".hydra" / "config.yaml")
    return run_dir


def quantised_ops(xml: Path) -> tuple[set[str], set[str]]:
    """Names of the convolutions and matrix products of an IR that take an int8 (FakeQuantize) input, and the rest."""
    import openvino as ov

    quantised, plain = set(), set()
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            fed = {value.get_node().get_type_name() for value in op.input_values()}
            (quantised if "FakeQuantize" in fed else plain).add(op.get_friendly_name())
    return quantised, plain


def test_int8_quantises_the_backbone_only_and_reports_the_drop(padim_run, capsys):
    assert export_main([str(padim_run), "--format", "openvino", "--int8"]) == 0
    line = capsys.readouterr().out.strip()
    out = padim_run / "export" / "padim-int8.xml"
    assert line.startswith(f"padim -> {out}") and "int8 backbone (8 calibration images)" in line
    assert re.search(r"image AUROC \d\.\d{4} fp32 -> \d\.\d{4} int8 on 8 test images", line)
    detector = load_exported(out)
    assert detector.precision == "int8" and detector.metadata["calibration_images"] == "8"
    drop = float(detector.metadata["image_auroc_fp32"]) - float(detector.metadata["image_auroc_int8"])
    assert drop <= 0.01
    quantised, plain = quantised_ops(out)
    assert quantised and all("/extractor/" in name for name in quantised)
    assert any("/smoother/" in name for name in plain) and any("MatMul" in name for name in plain)  # blur, Mahalanobis
    predicted = padim_run / "predicted"
    from ad.predict import main as predict_main

    images = Path(read_predictions(padim_run / "predictions.csv")[0]["path"]).parent.parent
    assert predict_main([str(out), str(images), "--out", str(predicted)]) == 0
    rows = read_predictions(predicted / "predictions.csv")
    assert len(rows) == 8 and all(np.isfinite(float(row["score"])) for row in rows)


def test_int8_that_loses_auroc_is_refused_unless_forced(padim_run, monkeypatch, capsys):
    from ad.export import int8

    monkeypatch.setattr(int8, "MAX_DROP", -1.0)  # any int8 file loses "too much"
    out = padim_run / "d.xml"
    calibration = ["--calibration", str(padim_run / "calibration")]
    shutil.copytree(Path(read_predictions(padim_run / "predictions.csv")[0]["path"]).parents[2] / "train" / "good",
                    padim_run / "calibration")
    assert export_main([str(padim_run), "--format", "openvino", "--int8", "--out", str(out), *calibration]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image AUROC on the run's 8 test images" in err and "nothing written" in err
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert export_main([str(padim_run), "--format", "openvino", "--int8", "--out", str(out), *calibration,
                        "--force"]) == 0
    assert "written as --force asked" in capsys.readouterr().err and load_exported(out).precision == "int8"


def test_int8_without_labelled_test_images_says_the_drop_is_not_measured(padim_run):
    from ad.export.int8 import labelled_test_images

    assert isinstance(labelled_test_images(padim_run / "model", 64), tuple)
    (padim_run / "predictions.csv").write_text("path,score,label,target,defect\n" + "".join(
        f"{row['path']},1,0,0,good\n" for row in read_predictions(padim_run / "predictions.csv")))
    assert "lists only good test images" in labelled_test_images(padim_run / "model", 64)
    (padim_run / "predictions.csv").unlink()
    assert "has no predictions.csv" in labelled_test_images(padim_run / "model", 64)


def test_int8_calibration_batches_fill_a_fixed_batch():
    from ad.export.int8 import batches

    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert [b.shape for b in batches(images, None, "uint8")] == [(1, 2, 2, 3)] * 5
    fixed = batches(images, 3, "float32")
    np.testing.assert_allclose(np.stack(fixed)[:, :, 0, 0, 0], [[0, 1 / 255, 2 / 255], [3 / 255, 4 / 255, 0]])


@pytest.mark.parametrize(("method", "args", "message"), [
    ("padim", ["--format", "onnx", "--int8"], "--int8: built for --format openvino"),
    ("ganomaly", ["--format", "openvino", "--int8"], "ganomaly has no pretrained backbone to quantise"),
    ("padim", ["--format", "openvino", "--int8"], "cannot find the run's training images"),
])
def test_int8_requests_that_cannot_work_are_one_line(method, args, message, fitted, capsys):
    assert export_main([str(fitted(method)), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (fitted(method) / "export").exists()
