"""Anomaly detection methods: one module each, built from ``conf/model/<name>.yaml`` by ``_target_``."""

from ad.models.base import AnomalyModel, Prediction

__all__ = ["AnomalyModel", "Prediction"]
