"""On a CUDA GPU: every method fits and scores end to end, PatchCore searches with faiss on the GPU, the
map blur (kornia) and bf16 autocast agree with the CPU. Skipped without a GPU; run with ``pytest -m gpu``."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import compose_config

from ad.run import run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

ON_GPU = ["dataset.image_size=128", "trainer.batch_size=16", "backbone.weights=random", "tracking=none",
          "trainer.device=cuda", "trainer.max_epochs=1", "dataset.n_train=24", "dataset.n_test_good=8",
          "dataset.n_test_defect=8"]
METHODS = ["padim", "patchcore", "dfm", "dfkde", "stfpm", "reverse_distillation", "cflow", "ganomaly"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_gpu(method, tmp_path):
    results = run(compose_config(*ON_GPU, f"model={method}"), tmp_path / "run")
    assert results["device"].startswith("cuda")
    assert 0.0 <= results["image_AUROC"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["device"].startswith("cuda")
    assert (tmp_path / "run" / "model" / "bundle.json").is_file()


def test_gpu_and_cpu_runs_agree_in_fp32(tmp_path):
    """Same data, same random backbone, fp32 on both: the metrics agree to float rounding."""
    common = [item for item in ON_GPU if not item.startswith("trainer.device")] + ["trainer.precision=fp32"]
    gpu = run(compose_config(*common, "trainer.device=cuda"), tmp_path / "gpu")
    cpu = run(compose_config(*common, "trainer.device=cpu"), tmp_path / "cpu")
    for key in ("image_AUROC", "pixel_AUROC"):
        assert gpu[key] == pytest.approx(cpu[key], abs=0.01), key


def test_patchcore_searches_with_faiss_on_the_gpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss without GPU support (pip install 'ad[gpu]')")
    from ad.ops.knn import faiss_index

    bank = torch.randn(4096, 64, device="cuda")
    queries = torch.randn(256, 64, device="cuda")
    index, _ = faiss_index(bank, "flat")
    distances, _ = index.search(queries.cpu().numpy(), 1)
    expected = torch.cdist(queries, bank).min(dim=1).values.cpu()
    assert torch.allclose(torch.as_tensor(distances[:, 0]).sqrt(), expected, rtol=1e-3, atol=1e-3)


def test_map_blur_matches_the_cpu():
    from ad.postprocess import MapSmoother

    maps = torch.rand(4, 32, 32)
    smooth = MapSmoother(sigma=4.0)
    assert torch.allclose(smooth(maps.cuda(), (128, 128)).cpu(), smooth(maps, (128, 128)), atol=1e-5)


def test_bf16_autocast_backbone_is_close_to_fp32():
    from ad.backbone import FeatureExtractor

    images = torch.randn(2, 3, 128, 128, device="cuda")
    fp32 = FeatureExtractor("resnet18", ["layer2"], weights="random", precision="fp32").cuda()
    bf16 = FeatureExtractor("resnet18", ["layer2"], weights="random", precision="bf16").cuda()
    bf16.load_state_dict(fp32.state_dict())
    a, b = fp32(images)[0], bf16(images)[0]
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
