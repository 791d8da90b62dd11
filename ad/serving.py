"""A model bundle as an MLflow model: ``mlflow.pyfunc.load_model(uri).predict(...)`` and ``mlflow models serve``.

The logged model is "models from code" (``ad/serving_model.py``), the bundle folder an artifact and
``ad``'s own source a code path, so nothing is pickled and the model installs elsewhere from its
listed requirements. ``predict`` takes a list of image paths, a DataFrame with a ``path`` column, or
a uint8 (N, H, W, 3) image batch, and returns a DataFrame with ``score`` and ``label``, one row per image.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import mlflow.pyfunc
import numpy as np

#: Packages the served model imports, pinned to the versions that wrote it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "scipy", "pandas",
                    "kornia", "faiss-cpu", "imagecodecs", "xxhash", "tqdm", "matplotlib")


def requirements() -> list[str]:
    """pip requirements of the served model: ``ad``'s dependencies at the installed versions."""
    names = [entry.split(";")[0].split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip()
             for entry in (requires("ad") or []) if "extra ==" not in entry]
    pinned = []
    for name in dict.fromkeys([*SERVING_PACKAGES, *names]):
        if name in ("hydra-core", "omegaconf", "mlflow"):  # training and tracking only; MLflow adds itself
            continue
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pinned


class BundleScoring:
    """``predict`` of the pyfunc model: images in, a score and a label per image out.

    A plain base class, so MLflow does not wrap it in its type-hint validation (it checks a
    ``predict`` defined on the PythonModel subclass itself): the input is deliberately one of three
    kinds, which no single hint describes.
    """

    bundle: object

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from ad.predict import read_images, score_images
        from ad.predictions import labels_at

        images = as_images(model_input, self.bundle.image_size, read_images)
        scores, _ = score_images(self.bundle, images, "cpu")
        labels = labels_at(scores, self.bundle.image_threshold)
        return pd.DataFrame({"score": scores.astype(np.float64), "label": labels})


class BundleModel(BundleScoring, mlflow.pyfunc.PythonModel):
    """The pyfunc face of a bundle, loaded from the model's ``bundle`` artifact."""

    def load_context(self, context) -> None:
        from ad.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])


def as_images(model_input, size: int, read_images) -> np.ndarray:
    """uint8 (N, size, size, 3) images from paths, a DataFrame with ``path``, or an image batch."""
    import pandas as pd

    from ad.data.io import resize_image
    from ad.errors import ADError

    if isinstance(model_input, pd.DataFrame):
        if "path" not in model_input.columns:
            raise ADError(f"input DataFrame needs a 'path' column, got {list(model_input.columns)}")
        model_input = model_input["path"].tolist()
    if isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], (str, Path)):
        paths = [Path(p) for p in model_input]
        good, images, errors = read_images(paths, size)
        if errors:
            raise ADError(f"{len(errors)} of {len(paths)} images could not be read; first: {errors[0]}")
        return np.stack(images)
    batch = np.asarray(model_input)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ADError(f"images must be a uint8 (N, H, W, 3) batch, got shape {batch.shape}")
    batch = batch.astype(np.uint8) if batch.dtype != np.uint8 and np.all(batch == np.round(batch)) else batch
    if batch.dtype != np.uint8:
        raise ADError(f"images must be uint8 RGB values 0..255, got {batch.dtype}")
    if batch.shape[1:3] != (size, size):
        batch = np.stack([resize_image(image, size) for image in batch])
    return batch


@contextlib.contextmanager
def tracking_store(uri: str | None) -> Iterator[None]:
    """MLflow's current store set to ``uri`` for the block, then put back as it was.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the environment (for child
    processes): left set, it would send every later process of the caller to this store.
    """
    if uri is None:
        yield
        return
    previous = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: unset again, environment included


def log_bundle(bundle_dir: Path, name: str, run_id: str, uri: str | None = None):
    """Log ``bundle_dir`` as run ``run_id``'s MLflow model ``name`` (models from code; nothing pickled).

    Through ``Model.log``, which ``mlflow.pyfunc.log_model`` calls: it alone takes the run id, which a
    tracker logging from its own thread needs (the fluent API's active run is per thread); the model
    entry is made first in the run's experiment, which ``Model.log`` would take from the thread instead.
    ``uri``: the store, for the length of the call (default: MLflow's current one).
    """
    import ad

    with tracking_store(uri):
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
        return mlflow.models.Model.log(
            artifact_path=None, flavor=mlflow.pyfunc, name=name, run_id=run_id, model_id=logged.model_id,
            python_model=str(Path(__file__).with_name("serving_model.py")),
            artifacts={"bundle": str(bundle_dir)}, code_paths=[str(Path(ad.__file__).parent)],
            pip_requirements=requirements(),
        )
