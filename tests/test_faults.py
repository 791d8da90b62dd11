"""Inputs that used to give silently wrong results: each must now load exactly or stop with one clear line.

A mis-keyed backbone checkpoint, a dataset file replaced in place, a damaged cache entry, a PNG that
fails its checksum, and a dataset archive cut short or pointing outside its folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_download import Server, tar_of

from ad.backbone import FeatureExtractor
from ad.cache import DiskCache
from ad.data import MVTecAD, Sample, make_mvtec_layout, read_image
from ad.data.base import cached_decoded, decode, load_decoded
from ad.data.download import Archive, download_dataset
from ad.errors import ADError
from ad.tracking import NullTracker

#: A PaDiM run of a few seconds on generated data (the default model and dataset).
TINY_PADIM = ("dataset.image_size=64", "backbone.weights=random", "dataset.n_train=8", "dataset.n_test_good=4",
              "dataset.n_test_defect=4")

# ---------------------------------------------------------------- backbone checkpoints


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A full resnet18 state dict with seeded random weights, as ``torch.save(model.state_dict())`` writes it."""
    torch.manual_seed(7)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def features_of(state: dict[str, torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
    """layer1 and layer3 maps of a plain timm resnet18 holding ``state``."""
    model = timm.create_model("resnet18", features_only=True, out_indices=(1, 3)).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))})
    with torch.no_grad():
        return model(images)


def save(state: dict, path: Path) -> str:
    torch.save(state, path)
    return str(path)


def assert_loads_exactly(weights: str, state: dict[str, torch.Tensor]) -> None:
    extractor = FeatureExtractor("resnet18", ["layer1", "layer3"], weights=weights, precision="fp32")
    assert extractor.weights_source == "file"
    images = torch.randn(2, 3, 64, 64)
    for ours, reference in zip(extractor(images), features_of(state, images), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["backbone.", "module.", "model.", "encoder.", "module.backbone."])
def test_a_checkpoint_under_a_wrapper_prefix_loads_exactly_and_says_so(resnet18_state, tmp_path, caplog, prefix):
    path = save({prefix + key: value for key, value in resnet18_state.items()}, tmp_path / "wrapped.pth")
    with caplog.at_level(logging.INFO, logger="ad.weights"):
        assert_loads_exactly(path, resnet18_state)
    assert f"'{prefix}'" in caplog.text


def test_a_training_checkpoint_with_its_state_dict_nested_loads_exactly(resnet18_state, tmp_path):
    path = save({"epoch": 3, "state_dict": {"model." + k: v for k, v in resnet18_state.items()}}, tmp_path / "c.pth")
    assert_loads_exactly(path, resnet18_state)


def test_a_headless_checkpoint_and_one_without_batchnorm_counters_load(resnet18_state, tmp_path):
    # torchvision's original resnet files have no num_batches_tracked; a features model saves no fc
    kept = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert_loads_exactly(save(kept, tmp_path / "headless.pth"), resnet18_state)


def test_a_safetensors_checkpoint_loads_exactly(resnet18_state, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    assert_loads_exactly(str(path), resnet18_state)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: {k: v for k, v in s.items() if not k.startswith("layer2.")}, "missing.*layer2.0"),
        (lambda s: {("backbone." if k.startswith("layer") else "") + k: v for k, v in s.items()},
         "missing.*layer1.0.*unexpected.*backbone.layer1.0"),
        (lambda s: {**s, "head.proj.weight": torch.zeros(3)}, "unexpected.*head.proj.weight"),
        (lambda s: {**s, "conv1.weight": torch.zeros(64, 3, 3, 3)}, r"shape.*conv1.weight"),
    ],
    ids=["missing-layer", "partial-prefix", "extra-key", "wrong-shape"],
)
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_keys(resnet18_state, tmp_path, edit, named):
    path = save(edit(dict(resnet18_state)), tmp_path / "bad.pth")
    with pytest.raises(ADError, match=rf"backbone\.weights: .*bad\.pth.*{named}") as error:
        FeatureExtractor("resnet18", ["layer1", "layer3"], weights=path)
    assert "\n" not in str(error.value)


def test_a_prefix_is_kept_where_the_architecture_has_those_keys():
    from ad.weights import strip_wrapper_prefix

    state = {"model.conv.weight": torch.zeros(1), "model.fc.weight": torch.zeros(1)}
    assert strip_wrapper_prefix(state, known={"model.conv.weight"}) == (state, "")
    assert strip_wrapper_prefix(state)[1] == "model."
    assert strip_wrapper_prefix({}) == ({}, "")


def test_a_file_that_holds_no_state_dict_is_named(tmp_path):
    path = save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(ADError, match=r"backbone\.weights: .*opt\.pth.*no state dict"):
        FeatureExtractor("resnet18", ["layer1"], weights=path)


# ---------------------------------------------------------------- decoded-image cache


def fixed_size_image(path: Path, value: int) -> Path:
    """An uncompressed BMP of one grey level: every such file has the same byte size."""
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path)
    return path


def test_a_file_replaced_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    path = fixed_size_image(tmp_path / "a.bmp", 10)
    sample, cache = Sample(image=path, label=0, defect="good"), DiskCache(tmp_path / "cache")
    assert load_decoded(sample, 16, cache)[0].max() == 10
    stat = path.stat()
    replacement = fixed_size_image(tmp_path / "b.bmp", 200)
    os.replace(replacement, path)  # same size, and the old mtime put back, as `cp -p` or a sync tool would
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert load_decoded(sample, 16, cache)[0].max() == 200


def test_a_cache_entry_corrupted_in_place_is_a_miss_and_is_rewritten(tmp_path, caplog):
    path = fixed_size_image(tmp_path / "a.bmp", 10)
    sample, cache = Sample(image=path, label=0, defect="good"), DiskCache(tmp_path / "cache")
    load_decoded(sample, 16, cache)
    entry = next((tmp_path / "cache").rglob("*.npy"))
    good = entry.read_bytes()
    damaged = bytearray(good)
    damaged[-300] ^= 0xFF  # a pixel byte: the file still parses as an array of the right shape
    entry.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        assert cached_decoded(sample, 16, cache) is None
    assert "cache entry" in caplog.text
    image, mask = load_decoded(sample, 16, cache)
    expected = decode(sample, 16)
    assert np.array_equal(image, expected[0]) and np.array_equal(mask, expected[1])
    assert entry.read_bytes() == good  # rewritten
    assert np.array_equal(cached_decoded(sample, 16, cache)[0], expected[0])


# ---------------------------------------------------------------- PNG checksums


def png_with_stale_crc(path: Path) -> tuple[Path, np.ndarray]:
    """An 8-bit RGB PNG whose pixel data was altered after writing: zlib is consistent, the chunk CRC is not.

    The pixels are stored uncompressed so that one byte can be flipped and the zlib checksum
    recomputed, as a bit flip the zlib stream cannot see: only PNG's own CRC catches it.
    """
    pixels = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    Image.fromarray(pixels).save(path, compress_level=0)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    stream = bytearray(data[start : start + length])
    stream[100] ^= 0xFF
    stream[-4:] = struct.pack(">I", zlib.adler32(zlib.decompressobj().decompress(bytes(stream[:-4]))))
    data[start : start + length] = stream
    path.write_bytes(bytes(data))
    return path, pixels


@pytest.mark.parametrize("libpng", [True, False], ids=["libpng", "pillow-only"])
def test_a_png_that_fails_its_crc_is_an_error_naming_the_file(tmp_path, monkeypatch, libpng):
    import ad.data.io as io

    if not libpng:
        monkeypatch.setattr(io, "png_decode", None)
    path, _ = png_with_stale_crc(tmp_path / "flipped.png")
    with Image.open(path) as image:  # what used to happen: Pillow decodes it, pixels altered
        assert image.load() is not None
    with pytest.raises(ADError, match=r"flipped\.png: .*CRC") as error:
        read_image(path)
    assert "\n" not in str(error.value)


def test_a_png_with_a_bad_ancillary_chunk_crc_is_an_error_too(tmp_path):
    path = tmp_path / "text.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(path)
    data = path.read_bytes()
    chunk = b"tEXtComment\x00hi"
    crc = struct.pack(">I", (zlib.crc32(chunk) ^ 1) & 0xFFFFFFFF)
    path.write_bytes(data[:33] + struct.pack(">I", len(chunk) - 4) + chunk + crc + data[33:])
    with pytest.raises(ADError, match=r"text\.png: .*tEXt.*CRC"):
        read_image(path)


# ---------------------------------------------------------------- dataset archives


@pytest.fixture
def server(tmp_path: Path):
    """A local HTTP server over ``tmp_path/served`` (see ``test_download.Server``)."""
    (tmp_path / "served").mkdir()
    running = Server(tmp_path / "served")
    yield running
    running.httpd.shutdown()
    running.httpd.server_close()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """A small dataset tree in the MVTec layout (category ``widget``)."""
    return make_mvtec_layout(tmp_path / "payload", "widget", n_train=2, n_test_good=1, n_test_defect=1,
                             image_size=32, seed=0).parent


def plain_tar(folder: Path, destination: Path) -> Path:
    """An uncompressed tar of ``folder``'s contents (VisA ships one)."""
    with tarfile.open(destination, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return destination


def test_a_plain_tar_cut_at_a_member_boundary_installs_nothing(server: Server, payload: Path, tmp_path: Path):
    whole = plain_tar(payload, tmp_path / "whole.tar")
    with tarfile.open(whole) as bundle:
        last = bundle.getmembers()[-1]
    (server.folder / "cut.tar").write_bytes(whole.read_bytes()[: last.offset])  # ends right before a header
    root = tmp_path / "data" / "MVTecAD"
    archive = server.archive("cut.tar")  # its checksum is the cut file's, as when upstream was cut
    assert archive.sha256 == hashlib.sha256((server.folder / "cut.tar").read_bytes()).hexdigest()
    with pytest.raises(ADError, match=r"dataset\.archive: .*cut short") as error:
        download_dataset(root, archive, present=root / "widget")
    assert "\n" not in str(error.value) and not root.exists()


def test_an_archive_without_a_listed_category_installs_nothing(server: Server, payload: Path, tmp_path: Path):
    tar_of(payload, server.folder / "data.tar.gz")
    archive = server.archive("data.tar.gz")
    config = {"url": archive.url, "sha256": archive.sha256}
    root = tmp_path / "MVTecAD"
    with pytest.raises(ADError, match=r"dataset\.archive: .*'gadget/train'"):
        MVTecAD(root=str(root), category="widget", categories=["widget", "gadget"], download=True, archive=config)
    assert not root.exists()


def test_an_archive_without_the_category_folder_installs_nothing(server: Server, payload: Path, tmp_path: Path):
    (payload / "widget" / "test").rename(payload / "widget" / "tests")
    tar_of(payload, server.folder / "data.tar.gz")
    archive = server.archive("data.tar.gz")
    config = {"url": archive.url, "sha256": archive.sha256}
    root = tmp_path / "MVTecAD"
    with pytest.raises(ADError, match=r"dataset\.archive: .*'widget/test'"):
        MVTecAD(root=str(root), category="widget", download=True, archive=config)
    assert not root.exists()


@pytest.mark.parametrize("folder", ["/etc", "../outside", "a/../../outside", "C:\\data", "."])
def test_an_archive_folder_outside_the_archive_is_rejected(folder: str, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    if folder == ".":  # the archive's top level: allowed
        assert Archive.from_config({"url": "http://x/a.tar", "sha256": "0" * 64, "folder": folder})
        return
    with pytest.raises(ADError, match=r"dataset\.archive\.folder: .*inside the archive") as error:
        Archive.from_config({"url": "http://x/a.tar", "sha256": "0" * 64, "folder": folder})
    assert "\n" not in str(error.value)
    with pytest.raises(ADError, match=r"dataset\.archive\.folder"):
        Archive(url="http://x/a.tar", sha256="0" * 64, folder=folder)
    assert outside.is_dir()


# ---------------------------------------------------------------- stop signals, rejected resumes, error tags

TRAIN = ["dataset.image_size=64", "backbone.weights=random", "model=stfpm", "model.layers=[layer1,layer2]",
         "dataset.n_train=8", "dataset.n_test_good=4", "dataset.n_test_defect=4", "trainer.batch_size=4",
         "tracking.num_images=0", "tracking.log_model=false"]


def the_run(uri: str):
    """The one MLflow run of a store."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    return runs[0]


def start_command(tmp_path: Path, name: str, *overrides: str):
    """``python -m ad.launch`` in the background, its output in files (a pipe nobody reads could fill)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out, err = (open(tmp_path / f"{name}.{stream}", "w") for stream in ("out", "err"))  # noqa: SIM115
    with out, err:
        return subprocess.Popen([sys.executable, "-m", "ad.launch", *overrides], cwd=tmp_path, env=env,
                                stdout=out, stderr=err)


def wait_for(path: Path, process, timeout_s: float = 240.0) -> None:
    """Wait until ``path`` exists (the run got that far) or fail if the command ended first."""
    import time

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"the command ended first (exit {process.returncode})"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_mid_training_checkpoints_ends_the_run_killed_and_a_resume_finishes_it(tmp_path, tracking_uri):
    import signal

    run_dir = tmp_path / "run"
    common = [*TRAIN, f"tracking.uri={tracking_uri}", f"hydra.run.dir={run_dir}"]
    process = start_command(tmp_path, "first", *common, "trainer.max_epochs=1000")
    wait_for(run_dir / "checkpoints" / "last.pt", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert (tmp_path / "first.err").read_text().strip().splitlines()[-1] == "error: stopped by SIGTERM"
    killed = the_run(tracking_uri)
    assert killed.info.status == "KILLED" and killed.data.tags["error"] == "stopped by SIGTERM"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["run_id"] == killed.info.run_id and 1 <= state["epoch"] < 1000
    assert not (run_dir / "metrics.json").exists()

    epochs = state["epoch"] + 1  # one more epoch, then the resumed run finishes
    resumed = start_command(tmp_path, "second", *common, "trainer.resume=true", f"trainer.max_epochs={epochs}")
    assert resumed.wait(timeout=240) == 0, (tmp_path / "second.err").read_text()[-2000:]
    finished = the_run(tracking_uri)
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert finished.data.tags["ad.resumed"] == "true" and "error" not in finished.data.tags


def test_sigterm_outside_training_ends_the_run_killed(tmp_path, tracking_uri, monkeypatch):
    import signal

    from helpers import compose_config

    from ad.models.padim import Padim
    from ad.run import run
    from ad.signals import Stopped, stop_signals

    def terminated(self, loader, device):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Padim, "fit", terminated)
    cfg = compose_config(*TINY_PADIM, f"tracking.uri={tracking_uri}")
    with pytest.raises(Stopped) as stopped, stop_signals():
        run(cfg, tmp_path / "run")
    assert stopped.value.exit_code == 143
    mlflow_run = the_run(tracking_uri)
    assert mlflow_run.info.status == "KILLED" and mlflow_run.data.tags["error"] == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_the_preemption_signal_stops_the_run_then_runs_the_handler_installed_before_it():
    import signal

    from ad.signals import Stopped, stop_signals

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # submitit's requeue
    try:
        with pytest.raises(Stopped, match="stopped by SIGUSR2"), stop_signals():
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_rejected_resume_leaves_the_earlier_run_untouched_and_a_finished_one_drops_its_error(
        tmp_path, tracking_uri):
    from helpers import compose_config
    from mlflow import MlflowClient

    from ad.errors import ConfigError
    from ad.run import run

    run(compose_config(*TRAIN, "trainer.max_epochs=1", f"tracking.uri={tracking_uri}"), tmp_path / "run")
    before = the_run(tracking_uri)
    assert before.info.status == "FINISHED"
    other = [o.replace("[layer1,layer2]", "[layer1,layer2,layer3]") for o in TRAIN]
    expected = (r"was trained with backbone resnet18 \(weights random, tag tv_in1k, layers layer1,layer2, "
                r".*this run has resnet18 .*layers layer1,layer2,layer3")
    with pytest.raises(ConfigError, match=expected):
        run(compose_config(*other, "trainer.max_epochs=2", "trainer.resume=true", f"tracking.uri={tracking_uri}"),
            tmp_path / "run")
    after = MlflowClient(tracking_uri).get_run(before.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and the_run(tracking_uri).info.run_id == before.info.run_id

    MlflowClient(tracking_uri).set_tag(before.info.run_id, "error", "an earlier attempt failed")
    run(compose_config(*TRAIN, "trainer.max_epochs=2", "trainer.resume=true", f"tracking.uri={tracking_uri}"),
        tmp_path / "run")
    resumed = the_run(tracking_uri)
    assert resumed.info.run_id == before.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["ad.resumed"] == "true" and "error" not in resumed.data.tags  # it finished after all


def test_an_error_in_a_loader_worker_is_one_line_in_the_error_tag(tmp_path, tracking_uri):
    from helpers import compose_config

    from ad.run import run

    root = tmp_path / "data"
    make_mvtec_layout(root, "widget", n_train=6, n_test_good=3, n_test_defect=3, image_size=32, seed=0)
    victim = sorted((root / "widget" / "train" / "good").iterdir())[0]
    victim.write_bytes(b"not an image")
    cfg = compose_config("dataset=mvtec", f"dataset.root={root}", "dataset.category=widget", "dataset.image_size=32",
                         "backbone.weights=random", "trainer.num_workers=1", "runtime.feature_cache=false",
                         f"tracking.uri={tracking_uri}")
    with pytest.raises(ADError):
        run(cfg, tmp_path / "run")
    mlflow_run = the_run(tracking_uri)
    error = mlflow_run.data.tags["error"]
    assert mlflow_run.info.status == "FAILED"
    assert "\n" not in error and "Traceback" not in error and error.startswith(f"{victim}: cannot read image")


def test_a_requeued_slurm_job_continues_from_its_own_checkpoint(tmp_path, monkeypatch):
    from ad.checkpoints import requeued_checkpoint

    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(tmp_path) is None  # a first attempt starts afresh
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(tmp_path) == last
    assert requeued_checkpoint(tmp_path / "elsewhere") is None


# ---------------------------------------------------------------- unusable tracking store, full or read-only disks


def launch(tmp_path: Path, *overrides: str):
    """``python -m ad.launch`` to the end: (exit code, lines printed, seconds taken); killed after 60 s."""
    import subprocess
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ad.launch", *overrides], cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return done.returncode, done.stdout.strip().splitlines(), time.monotonic() - started


def not_sqlite(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "mlflow.db").write_text("a text file, not a database\n")
    return f"sqlite:///{tmp_path / 'mlflow.db'}", "is not an SQLite database"


def read_only_sqlite(tmp_path: Path) -> tuple[str, str]:
    if os.geteuid() == 0:
        pytest.skip("root writes to a read-only file regardless (the folder case covers root)")
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))
    db.chmod(0o444)
    return f"sqlite:///{db}", "is not readable and writable"


def folder_is_a_file(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "store").write_text("")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "is not a folder"


@pytest.mark.parametrize("store", [lambda tmp_path: ("http://127.0.0.1:9", "no server answers at 127.0.0.1:9"),
                                   not_sqlite, read_only_sqlite, folder_is_a_file],
                         ids=["unreachable-server", "not-sqlite", "read-only-sqlite", "folder-is-a-file"])
def test_an_unusable_tracking_store_stops_the_command_at_start_up_in_one_line(tmp_path, store):
    uri, says = store(tmp_path)
    code, lines, seconds = launch(tmp_path, f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'run'}",
                                  "dataset.n_train=4", "dataset.n_test_good=2", "dataset.n_test_defect=2")
    assert code == 2, lines[-20:]
    assert lines[-1].startswith(f"error: tracking.uri='{uri}': ") and says in lines[-1]
    assert not any("Traceback" in line for line in lines)
    assert seconds < 20 and not (tmp_path / "run" / "metrics.json").exists()


def test_run_rejects_an_unusable_store_before_any_work(tmp_path):
    from helpers import compose_config

    from ad.run import run
    from ad.tracking import StoreError

    uri, _ = not_sqlite(tmp_path)
    with pytest.raises(StoreError, match="is not an SQLite database"):
        run(compose_config("dataset.n_train=4", f"tracking.uri={uri}"), tmp_path / "run")
    assert (tmp_path / "mlflow.db").read_text() == "a text file, not a database\n"  # untouched


def test_a_cache_folder_that_cannot_be_written_is_turned_off_with_one_warning_and_the_run_goes_on(tmp_path):
    (tmp_path / "a-file").write_text("")  # a folder below a regular file: unwritable even for root
    cache_dir = tmp_path / "a-file" / "cache"
    code, lines, _ = launch(tmp_path, f"runtime.cache_dir={cache_dir}", "tracking=none", "dataset.image_size=64",
                            "backbone.weights=random", "dataset.n_train=4", "dataset.n_test_good=2",
                            "dataset.n_test_defect=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, lines[-20:]
    warnings = [line for line in lines if "feature cache" in line]
    assert len(warnings) == 1 and f"cannot write to {cache_dir}" in warnings[0], warnings
    assert not any("Traceback" in line for line in lines) and (tmp_path / "run" / "metrics.json").is_file()


def test_a_cache_disk_that_fills_mid_run_turns_writing_off_with_one_warning(tmp_path, monkeypatch, caplog):
    import errno

    from helpers import compose_config

    import ad.cache
    from ad.run import run

    def full(value, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ad.cache, "_torch_save", full)  # every backbone-feature entry meets a full disk
    cfg = compose_config(*TINY_PADIM, "tracking=none",
                         f"runtime.cache_dir={tmp_path / 'cache'}", "trainer.batch_size=2")
    with caplog.at_level(logging.WARNING, logger="ad.cache"):
        results = run(cfg, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ad.cache"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and str(tmp_path / "cache") in warnings[0]
    assert "image_AUROC" in results and not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_full_disk_for_checkpoints_is_one_line_and_the_run_ends_failed(tmp_path, tracking_uri, monkeypatch):
    import errno

    from helpers import compose_config

    from ad.run import run

    def full(payload, file, *args, **kwargs):
        file.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    cfg = compose_config(*TRAIN, "trainer.max_epochs=1", "runtime.feature_cache=false", f"tracking.uri={tracking_uri}")
    with pytest.raises(ADError) as failed:
        run(cfg, tmp_path / "run")
    message = str(failed.value)
    assert message.startswith(f"no space left on {tmp_path / 'run' / 'checkpoints'} (writing last.pt)")
    assert "\n" not in message
    mlflow_run = the_run(tracking_uri)
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["error"] == message
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # no partial file left


def test_a_full_disk_anywhere_in_a_failure_is_named_in_one_line(tmp_path):
    import errno
    import sqlite3

    from ad.errors import out_of_space

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "mlartifacts" / "x.png"))
        except OSError as exc:
            raise RuntimeError("copying the artifact failed") from exc
    except RuntimeError as exc:
        assert out_of_space(exc) == str(tmp_path / "mlartifacts")
    assert out_of_space(sqlite3.OperationalError("database or disk is full")) == "the tracking store's disk"
    assert out_of_space(OSError(errno.EACCES, "Permission denied")) is None


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real disk that fills up (skipped where mounting is not permitted)."""
    import shutil
    import subprocess

    folder = tmp_path / "small-disk"
    folder.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_cache_on_a_disk_that_really_fills_turns_writing_off_once(small_disk, tmp_path, caplog):
    from helpers import compose_config

    from ad.run import run

    cfg = compose_config(*TINY_PADIM, "tracking=none",
                         f"runtime.cache_dir={small_disk / 'cache'}", "trainer.batch_size=4")
    with caplog.at_level(logging.WARNING, logger="ad.cache"):
        results = run(cfg, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ad.cache"]
    assert len(warnings) == 1 and f"cannot write to {small_disk / 'cache'}" in warnings[0], warnings
    assert "image_AUROC" in results and not list(small_disk.rglob("*.tmp"))


def test_checkpoints_on_a_disk_that_really_fills_are_one_line_and_the_run_ends_failed(small_disk, tracking_uri):
    from helpers import compose_config

    from ad.run import run

    cfg = compose_config(*TRAIN, "trainer.max_epochs=1", "runtime.feature_cache=false", f"tracking.uri={tracking_uri}")
    with pytest.raises(ADError, match=rf"^no space left on {small_disk / 'run' / 'checkpoints'} \(writing last\.pt\)"):
        run(cfg, small_disk / "run")
    mlflow_run = the_run(tracking_uri)
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["error"].startswith("no space left on ")
    assert not list((small_disk / "run" / "checkpoints").iterdir())


@pytest.fixture
def store_disk(tmp_path, migrated_db):
    """A 3 MiB tmpfs holding a migrated MLflow store (about 1 MB), which a logged model fills up."""
    import shutil
    import subprocess

    folder = tmp_path / "store-disk"
    folder.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN)")
    shutil.copy(migrated_db, folder / "mlflow.db")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_tracking_store_whose_disk_fills_is_one_line_and_the_run_is_not_left_running(store_disk, tmp_path):
    from helpers import compose_config

    from ad.run import run

    uri = f"sqlite:///{store_disk / 'mlflow.db'}"
    cfg = compose_config(*TINY_PADIM, "runtime.feature_cache=false",
                         f"tracking.uri={uri}")  # the model logged into the store does not fit
    with pytest.raises(ADError, match=rf"^no space left on {store_disk}") as failed:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(failed.value)
    mlflow_run = the_run(uri)
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["error"] == str(failed.value)
    assert [path.name for path in store_disk.iterdir() if ".reserve-" in path.name] == []  # freed


class ResultsNotRecordedTracker(NullTracker):
    """A tracker whose store takes everything but the final results file."""

    def log_artifact(self, path, artifact_path=None):
        if Path(path).name == "metrics.json":
            raise OSError("the artifact store refused metrics.json")


def test_a_run_whose_results_cannot_be_recorded_fails(tmp_path):
    # The failure used to turn the MLflow run FAILED while the command still printed its table and exited 0.
    from helpers import compose_config

    from ad.run import run

    cfg = compose_config(*TINY_PADIM, "tracking=none")
    cfg.tracking = {"_target_": f"{__name__}.ResultsNotRecordedTracker"}
    with pytest.raises(OSError, match="refused metrics.json"):
        run(cfg, tmp_path / "run")
