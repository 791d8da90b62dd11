"""The file MLflow runs to build a logged bundle's pyfunc model ("models from code"; see ``ad.serving``)."""

import mlflow

from ad.serving import BundleModel

mlflow.models.set_model(BundleModel())
