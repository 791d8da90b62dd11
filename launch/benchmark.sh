#!/usr/bin/env bash
# A benchmark table in one command: every category of a dataset for one model, then the table.
#
#   launch/benchmark.sh DATASET MODEL [overrides...]
#   launch/benchmark.sh mvtec patchcore dataset.root=/data/MVTecAD          # 15 categories
#   launch/benchmark.sh btad padim dataset.root=/data/BTAD                  # 01, 02, 03
#   launch/benchmark.sh visa padim dataset.root=/data/VisA                  # 12 categories
#   launch/benchmark.sh mvtec padim hydra/launcher=joblib hydra.launcher.n_jobs=2     # local parallel
#   launch/benchmark.sh mvtec padim hydra/launcher=slurm tracking.uri=http://mlflow-host:5000  # SLURM
#
# Runs go to the MLflow experiment benchmark-DATASET (seed 42, like the published tables) and the
# table is written to outputs/reports/benchmark-DATASET.{md,csv}. A failed category does not stop
# the others; it is listed under the table and the script exits non-zero. CATEGORIES=a,b limits the
# sweep to some categories; PYTHON picks the interpreter (default: python).
set -uo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
dataset=$1 model=$2
shift 2
python=${PYTHON:-python}
experiment=benchmark-$dataset
uri=()
for arg in "$@"; do  # the report reads the store the runs were written to
    [[ $arg == tracking.uri=* ]] && uri=(--tracking-uri "${arg#tracking.uri=}")
done

"$python" -m ad.launch -m "model=$model" "dataset=$dataset" "dataset.category=${CATEGORIES:-all}" seed=42 \
    "tracking.experiment=$experiment" "$@"
status=$?
if [[ $status -eq 2 ]]; then  # bad overrides: nothing ran
    exit 2
fi
"$python" -m ad.report --experiment "$experiment" "${uri[@]}" --out outputs/reports || exit $?
exit $status
