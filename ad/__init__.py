"""ad: visual anomaly detection with Hydra configs, timm backbones and MLflow tracking."""

__version__ = "0.1.0"
