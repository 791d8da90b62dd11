#!/usr/bin/env bash
# Hyperparameter search with Optuna (the Hydra Optuna sweeper, pip install -e '.[sweep]'):
# PaDiM's number of kept channels on one category, maximizing the run's image AUROC.
#
#   launch/optuna_padim.sh [overrides...]
#   launch/optuna_padim.sh dataset=mvtec dataset.root=/data/MVTecAD dataset.category=screw
#   launch/optuna_padim.sh optimized_metric=pixel_AUPRO hydra.sweeper.n_trials=40
#
# Each trial is one MLflow run in the experiment optuna-padim, tagged with the sweep id (ad.sweep);
# the best setting is written to the sweep folder's optimization_results.yaml. A failed trial is
# recorded and the search goes on. TRIALS sets the number of trials (default 20).
set -euo pipefail
exec "${PYTHON:-python}" -m ad.launch -m hydra/sweeper=optuna hydra.sweeper.direction=maximize \
    "hydra.sweeper.n_trials=${TRIALS:-20}" hydra.sweeper.n_jobs=1 hydra.sweeper.sampler.seed=42 \
    model=padim 'model.n_features=int(interval(16, 448))' optimized_metric=image_AUROC \
    tracking.experiment=optuna-padim "$@"
