"""Output-level parity of ad's frozen-feature methods (PaDiM, PatchCore, DFM, DFKDE) with anomalib 2.x.

Runs under anomalib's own Python with ``ad`` installed into it (``pip install -e .`` there):

    /tmp/anomalib-venv/bin/python benchmarks/parity_frozen.py --out frozen.json
    /tmp/anomalib-venv/bin/python benchmarks/parity_frozen.py --backbone default --image-size 64

For each method it builds anomalib's torch model and ad's on the same random timm checkpoint
(``parity.random_backbone``), gives both the same random choices, fits both on the same normalised
batches of ad's generated data and scores the same test images, all in fp32 with ad's channels-last
layout off. The two are compared stage by stage, in pipeline order: the embedding, the fitted
statistics, the raw (feature-grid) distances or errors, the upsampled and blurred maps and the image
scores, each as ‖ours − anomalib‖ / ‖anomalib‖. Rows marked "same input" feed one stage of both
sides the same tensor, to tell which stage a difference comes from. ad's metrics are computed from
each side's raw outputs.

The random choices made equal:

* PaDiM: anomalib's channel indices ``idx`` become ad's ``channel_idx`` (both index the layer1-3
  maps concatenated in that order; ad's are sorted, which the Mahalanobis distance ignores).
* PatchCore: ad is set to anomalib's projection size (``projection_dim=None``: the Johnson-Lindenstrauss
  size at eps 0.9); anomalib's ``SparseRandomProjection`` is handed ad's seeded matrix and its
  ``torch.randint`` start ad's start, then the two greedy selections run independently and their
  indices are compared. Were they to differ, ad's bank would be copied into anomalib's (the report says so).
* DFM and DFKDE: PCA is deterministic given the data (signs of axes aside, which no score sees);
  the axes are compared after aligning their signs.

``dfm_nll`` and ``dfkde_norm`` are DFM with ``score_type=nll`` and DFKDE with ``norm`` scaling.
anomalib 2.7's DFM ``nll`` cannot fit under torch 2.x (``SingleClassGaussian.fit`` passes ``device=``
to ``torch.mean``): the script runs that fit with the keyword removed, nothing else changed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar
# anomalib's @deprecate on subsample_embedding warns though no embeddings are passed
warnings.filterwarnings("ignore", "Argument embeddings is deprecated", DeprecationWarning)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from parity import backbone_spec, load_frozen, load_split, random_backbone, relative  # noqa: E402

from ad.data import Synthetic  # noqa: E402
from ad.metrics import compute_metrics  # noqa: E402

#: ‖a − b‖ / ‖b‖ beyond which a stage is said to part (fp32 rounding alone stays below ~1e-5).
TOLERANCE = 1e-4
#: anomalib's default backbone per method (``--backbone default``).
DEFAULT_BACKBONES = {"padim": "resnet18", "patchcore": "wide_resnet50_2", "dfm": "resnet50", "dfkde": "resnet18"}
CPU = torch.device("cpu")


@dataclass
class Context:
    """What every method's comparison gets: data, backbone checkpoint and sizes."""

    backbone: str
    weights: Path
    train: list[torch.Tensor]  # batches of normalised training images
    test: list[torch.Tensor]  # batches of normalised test images
    labels: torch.Tensor
    masks: torch.Tensor
    size: int
    coreset_ratio: float


@dataclass
class Report:
    """Stage-by-stage differences of one method, in pipeline order."""

    method: str
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, stage: str, ours: torch.Tensor, theirs: torch.Tensor, same_input: bool = False) -> float:
        """Record ‖ours − theirs‖ / ‖theirs‖ over the entries finite on both sides (non-finite ones counted)."""
        ours, theirs = ours.detach().double().reshape(theirs.shape), theirs.detach().double()
        finite = torch.isfinite(ours) & torch.isfinite(theirs)
        row = {"stage": stage, "rel": relative(ours[finite], theirs[finite]), "same_input": same_input,
               "shape": list(theirs.shape)}
        if not bool(finite.all()):
            row["non_finite"] = {"ours": int((~torch.isfinite(ours)).sum()),
                                 "anomalib": int((~torch.isfinite(theirs)).sum())}
        self.rows.append(row)
        return row["rel"]

    def add_value(self, stage: str, rel: float, same_input: bool = False, **info) -> None:
        self.rows.append({"stage": stage, "rel": rel, "same_input": same_input, **info})

    def first_parting(self) -> str | None:
        """The first stage of the two pipelines (not a same-input check) beyond ``TOLERANCE``."""
        return next((r["stage"] for r in self.rows if not r["same_input"] and r["rel"] > TOLERANCE), None)


def column_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """+-1 per column of ``a``: the flip that brings it closer to ``b``'s (PCA axes' sign is arbitrary)."""
    sign = torch.sign((a.double() * b.double()).sum(0))
    sign[sign == 0] = 1
    return sign


def align_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` with its columns' signs matched to ``b``'s."""
    return a * column_signs(a, b).to(a.dtype)


def fit_ours(model, ctx: Context) -> None:
    model.fit([{"image": batch} for batch in ctx.train], CPU)
    model.eval()


def fit_theirs(model, ctx: Context, fit: Callable[[], None]) -> None:
    """anomalib's training pass (the torch model in train mode collects embeddings), then its fit."""
    model.train()
    with torch.no_grad():
        for batch in ctx.train:
            model(batch)
    fit()
    model.eval()


def cat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(outputs)


# -- PaDiM ----------------------------------------------------------------------------------------

@torch.no_grad()
def padim(ctx: Context) -> tuple[Report, dict]:
    from anomalib.models.image.padim.torch_model import PadimModel

    from ad.models.padim import PAPER_N_FEATURES, Padim

    layers = ["layer1", "layer2", "layer3"]
    n_features = PAPER_N_FEATURES.get(ctx.backbone, 100)
    ours = Padim(backbone_spec(ctx.backbone, ctx.weights), layers=tuple(layers), n_features=n_features)
    theirs = PadimModel(backbone=ctx.backbone, layers=layers, pre_trained=False, n_features=n_features)
    load_frozen(theirs.feature_extractor.feature_extractor, ctx.weights)
    rep = Report("padim")
    if list(ours.extractor.channels) != list(theirs.feature_extractor.out_dims):
        raise SystemExit(f"PaDiM: channels {ours.extractor.channels} != anomalib's {theirs.feature_extractor.out_dims}")
    theirs.idx = ours.channel_idx.clone()  # both index the layer1-3 maps concatenated in this order
    rep.notes.append(f"anomalib's channel indices set to ad's {n_features} (sorted) of {sum(ours.extractor.channels)}")

    def their_embedding(x):
        return theirs.generate_embedding(theirs.feature_extractor(x))

    x = ctx.test[0]
    mine, other = ours.embed(x), their_embedding(x)
    rep.add("embedding", mine.permute(1, 2, 0).reshape(other.shape), other)

    # anomalib first: with this torch build, a batched torch.linalg.inv of large matrices (wide_resnet50_2's
    # 550²) hangs with oneMKL SLASWP errors once anything has called torch.set_num_threads, as ad's fit does
    fit_theirs(theirs, ctx, theirs.fit)
    fit_ours(ours, ctx)
    rep.add("mean", ours.mean.T, theirs.gaussian.mean)
    n_positions = ours.mean.shape[0]
    sq_diff = sq_norm = 0.0
    for start in range(0, n_positions, 64):  # Σ⁻¹ from ad's block form, a chunk of positions at a time
        positions = torch.arange(start, min(start + 64, n_positions))
        a, b = ours.precision(positions).double(), theirs.gaussian.inv_covariance[positions].double()
        sq_diff, sq_norm = sq_diff + (a - b).square().sum().item(), sq_norm + b.square().sum().item()
    rep.add_value("inverse covariance", (sq_diff / sq_norm) ** 0.5)

    gen = theirs.anomaly_map_generator
    out = {k: [] for k in ("d_ours", "d_theirs", "maps_ours", "maps_theirs", "scores_ours", "scores_theirs",
                           "smooth_ours", "smooth_theirs")}
    for x in ctx.test:
        d_ours = ours.distances(x)
        d_theirs = gen.compute_distance(their_embedding(x), [theirs.gaussian.mean, theirs.gaussian.inv_covariance])
        p_ours, p_theirs = ours(x), theirs(x)
        out["d_ours"].append(d_ours)
        out["d_theirs"].append(d_theirs.squeeze(1))
        out["maps_ours"].append(p_ours.maps)
        out["maps_theirs"].append(p_theirs.anomaly_map.squeeze(1))
        out["scores_ours"].append(p_ours.scores)
        out["scores_theirs"].append(p_theirs.pred_score.reshape(-1))
        # the post-processing alone: ad's distances through both sides' upsampling and blur
        out["smooth_ours"].append(ours.smoother(d_ours, size=x.shape[-2:]))
        out["smooth_theirs"].append(gen.smooth_anomaly_map(gen.up_sample(d_ours.unsqueeze(1), x.shape[-2:])).squeeze(1))
    out = {k: cat(v) for k, v in out.items()}
    rep.add("distances (feature grid)", out["d_ours"], out["d_theirs"])
    rep.add("upsample + blur", out["smooth_ours"], out["smooth_theirs"], same_input=True)
    rep.add("maps", out["maps_ours"], out["maps_theirs"])
    rep.add("scores (map max)", out["scores_ours"], out["scores_theirs"])
    return rep, out


# -- PatchCore ------------------------------------------------------------------------------------

class _TorchWithStart:
    """``torch`` for anomalib's k-center module, whose ``torch.randint`` (the coreset start) returns ``start``."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def randint(self, *args, device=None, **kwargs) -> torch.Tensor:
        return torch.tensor(self.start, device=device)


@torch.no_grad()
def patchcore(ctx: Context) -> tuple[Report, dict]:
    from anomalib.models.components.dimensionality_reduction import random_projection
    from anomalib.models.components.sampling import k_center_greedy
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    import ad.models.patchcore as module

    ours = module.Patchcore(backbone_spec(ctx.backbone, ctx.weights), coreset_ratio=ctx.coreset_ratio,
                            num_neighbors=9, projection_dim=None, index="flat")
    theirs = PatchcoreModel(layers=["layer2", "layer3"], backbone=ctx.backbone, pre_trained=False, num_neighbors=9)
    load_frozen(theirs.feature_extractor.feature_extractor, ctx.weights)
    rep = Report("patchcore")
    rep.notes.append("ad's projection_dim=None: anomalib's Johnson-Lindenstrauss size (ad's default is 128)")

    def their_embedding(x):
        features = theirs.feature_extractor(x)
        return theirs.generate_embedding({k: theirs.feature_pooler(v) for k, v in features.items()})

    x = ctx.test[0]
    rep.add("embedding", ours.embed(x), their_embedding(x))

    # ad's fit, recording its projection matrix, coreset start and picks
    drawn: dict = {}
    projection, greedy = module.sparse_random_projection, module.k_center_greedy

    def record_projection(in_dim, out_dim, generator):
        drawn["matrix"] = projection(in_dim, out_dim, generator)
        return drawn["matrix"]

    def record_greedy(features, k, start, exhaustive=None):
        drawn["start"], drawn["ours"] = start, greedy(features, k, start, exhaustive)
        return drawn["ours"]

    module.sparse_random_projection, module.k_center_greedy = record_projection, record_greedy
    try:
        fit_ours(ours, ctx)
    finally:
        module.sparse_random_projection, module.k_center_greedy = projection, greedy

    # anomalib's fit, handed ad's matrix and start
    sampler_cls, projector_cls = k_center_greedy.KCenterGreedy, random_projection.SparseRandomProjection
    select, make_matrix = sampler_cls.select_coreset_idxs, projector_cls._sparse_random_matrix

    def given_matrix(self, n_features):
        if "matrix" not in drawn:
            raise SystemExit("PatchCore: ad drew no projection (the JL size is not below the feature count)")
        if (int(self.n_components), n_features) != tuple(drawn["matrix"].T.shape):
            raise SystemExit(f"PatchCore: anomalib projects {n_features} -> {self.n_components}, ad "
                             f"{tuple(drawn['matrix'].shape)}")
        return drawn["matrix"].T.contiguous().float()

    def record_select(self):
        drawn["theirs"] = select(self)
        return drawn["theirs"]

    k_center_greedy.torch = _TorchWithStart(drawn["start"])
    projector_cls._sparse_random_matrix, sampler_cls.select_coreset_idxs = given_matrix, record_select
    try:
        fit_theirs(theirs, ctx, lambda: theirs.subsample_embedding(ctx.coreset_ratio))
    finally:
        k_center_greedy.torch = torch
        projector_cls._sparse_random_matrix, sampler_cls.select_coreset_idxs = make_matrix, select

    mine, other = drawn["ours"].tolist(), list(drawn["theirs"])
    first = next((i for i, (a, b) in enumerate(zip(mine, other, strict=True)) if a != b), None)
    rep.extra["coreset"] = {"size": len(mine), "projection": list(drawn["matrix"].shape), "start": drawn["start"],
                            "same_picks": first is None, "first_different_pick": first,
                            "shared": len(set(mine) & set(other))}
    rep.add_value("coreset picks (share differing)", 1 - len(set(mine) & set(other)) / len(mine),
                  first_different_pick=first)
    rep.add("memory bank", ours.memory_bank, theirs.memory_bank)
    if first is not None:
        theirs.memory_bank = ours.memory_bank.clone()
        rep.notes.append(f"coreset picks part at pick {first}: ad's memory bank copied into anomalib's")

    gen = theirs.anomaly_map_generator
    out = {k: [] for k in ("d_ours", "d_theirs", "nn_same", "maps_ours", "maps_theirs", "scores_ours",
                           "scores_theirs", "smooth_ours", "smooth_theirs", "bilinear_theirs", "weighted_ours",
                           "weighted_theirs")}
    for x in ctx.test:
        b = len(x)
        patches = module.as_patches(ours.embed(x))
        d_ours, nn_ours = ours.nearest(patches.reshape(-1, patches.shape[-1]))
        embedding = their_embedding(x)
        grid = embedding.shape[-2:]
        flat = theirs.reshape_embedding(embedding)
        d_theirs, nn_theirs = theirs.nearest_neighbors(flat, n_neighbors=1)
        d_theirs, nn_theirs = d_theirs.reshape(b, -1), nn_theirs.reshape(b, -1)
        out["d_ours"].append(d_ours.view(b, -1))
        out["d_theirs"].append(d_theirs)
        out["nn_same"].append(nn_ours.view(b, -1) == nn_theirs)
        p_ours, p_theirs = ours(x), theirs(x)
        out["maps_ours"].append(p_ours.maps)
        out["maps_theirs"].append(p_theirs.anomaly_map.squeeze(1))
        out["scores_ours"].append(p_ours.scores)
        out["scores_theirs"].append(p_theirs.pred_score.reshape(-1))
        # same input (anomalib's patch distances) through both sides' upsampling + blur and score weighting
        raw = d_theirs.view(b, 1, *grid)
        out["smooth_ours"].append(ours.smoother(raw.squeeze(1), size=x.shape[-2:]))
        out["smooth_theirs"].append(gen(raw, x.shape[-2:]).squeeze(1))
        bilinear = F.interpolate(raw, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out["bilinear_theirs"].append(gen.blur(bilinear).squeeze(1))
        out["weighted_ours"].append(ours.image_scores(flat.view(b, -1, flat.shape[-1]), d_theirs, nn_theirs))
        out["weighted_theirs"].append(theirs.compute_anomaly_score(d_theirs, nn_theirs, flat))
    out = {k: cat(v) for k, v in out.items()}
    rep.add("distances (feature grid)", out["d_ours"], out["d_theirs"])
    rep.add_value("nearest bank entry (share differing)", 1 - out["nn_same"].double().mean().item())
    rep.add("upsample + blur", out["smooth_ours"], out["smooth_theirs"], same_input=True)
    rep.add("upsample + blur, anomalib upsampling bilinearly", out["smooth_ours"], out["bilinear_theirs"],
            same_input=True)
    rep.add("maps", out["maps_ours"], out["maps_theirs"])
    rep.add("score re-weighting (eq. 7)", out["weighted_ours"], out["weighted_theirs"], same_input=True)
    rep.add("scores", out["scores_ours"], out["scores_theirs"])
    return rep, out


# -- DFM ------------------------------------------------------------------------------------------

@torch.no_grad()
def dfm(ctx: Context, score_type: str = "fre") -> tuple[Report, dict]:
    from anomalib.models.image.dfm.torch_model import DFMModel

    from ad.models.dfm import Dfm

    ours = Dfm(backbone_spec(ctx.backbone, ctx.weights), layer="layer3", pooling_kernel_size=4, pca_level=0.97,
               score_type=score_type)
    theirs = DFMModel(backbone=ctx.backbone, layer="layer3", pre_trained=False, pooling_kernel_size=4, n_comps=0.97,
                      score_type=score_type)
    load_frozen(theirs.feature_extractor.feature_extractor, ctx.weights)
    rep = Report("dfm" if score_type == "fre" else f"dfm_{score_type}")
    x = ctx.test[0]
    rep.add("embedding (pooled, flattened)", ours.embed(x).flatten(1), theirs.get_features(x)[0])

    fit_ours(ours, ctx)
    gaussian_cls = type(theirs.gaussian_model)
    gaussian_fit = gaussian_cls.fit
    if score_type == "nll":  # anomalib 2.7's fit passes device= to torch.mean, which torch 2.x rejects
        gaussian_cls.fit = fit_single_class_gaussian
        rep.notes.append("anomalib's SingleClassGaussian.fit raises TypeError (torch.mean(..., device=)) with "
                         f"torch {torch.__version__}: run with the same fit minus that keyword")
    try:
        fit_theirs(theirs, ctx, theirs.fit)
    finally:
        gaussian_cls.fit = gaussian_fit
    pca = theirs.pca_model
    k_ours, k_theirs = ours.components.shape[1], int(pca.num_components)
    rep.extra["components"] = {"ours": k_ours, "anomalib": k_theirs}
    rep.add("PCA mean", ours.mean, pca.mean)
    rep.add_value("PCA component count", float(k_ours != k_theirs), ours=k_ours, anomalib=k_theirs)
    k = min(k_ours, k_theirs)
    rep.add("PCA singular values", ours.singular_values[:k], pca.singular_values[:k])
    rep.add("PCA axes (signs aligned)", align_columns(ours.components[:, :k], pca.singular_vectors[:, :k]),
            pca.singular_vectors[:, :k])
    gauss = theirs.gaussian_model
    if score_type == "nll":
        signs = column_signs(ours.components[:, :k], pca.singular_vectors[:, :k]).float()
        rep.add("Gaussian mean (PCA space)", ours.gauss_mean * signs, gauss.mean_vec)
        # anomalib's PCA.fit centres its memory bank in place and transform() centres it again, so its
        # Gaussian is fitted on (x - 2·mean)·V: its mean is -mean·V instead of 0 (shape and spread unchanged)
        shift = pca.mean @ pca.singular_vectors
        rep.add("anomalib's Gaussian mean vs -mean·V", gauss.mean_vec, -shift)
        rep.add("Gaussian log-determinant", ours.log_det, 2 * gauss.sigma_mat.log().sum())

    out = {k: [] for k in ("err_ours", "err_theirs", "maps_ours", "maps_theirs", "scores_ours", "scores_theirs",
                           "fixed_theirs")}
    for x in ctx.test:
        p_ours, p_theirs = ours(x), theirs(x)
        out["scores_ours"].append(p_ours.scores)
        out["scores_theirs"].append(p_theirs.pred_score.reshape(-1))
        if score_type == "fre":
            features = ours.embed(x)
            feature_vector, shapes = theirs.get_features(x)
            out["err_ours"].append(ours.reconstruction_error(features))
            out["err_theirs"].append(theirs.score(feature_vector, shapes)[1].squeeze(1))
            out["maps_ours"].append(p_ours.maps)
            out["maps_theirs"].append(p_theirs.anomaly_map.squeeze(1))
        else:  # anomalib's Gaussian with the double centring undone: mean 0 in PCA space
            projected = pca.transform(theirs.get_features(x)[0])
            features = torch.matmul(projected - (gauss.mean_vec + shift), gauss.u_mat / gauss.sigma_mat)
            out["fixed_theirs"].append(features.square().sum(1) + 2 * gauss.sigma_mat.log().sum())
    out = {k: cat(v) if v else None for k, v in out.items()}
    if score_type == "fre":
        rep.add("reconstruction error (feature grid)", out["err_ours"], out["err_theirs"])
        rep.add("maps (bilinear, no blur)", out["maps_ours"], out["maps_theirs"])
        rep.add("scores (error sum)", out["scores_ours"], out["scores_theirs"])
    else:
        rep.add("scores (NLL)", out["scores_ours"], out["scores_theirs"])
        rep.add("scores vs anomalib without double centring", out["scores_ours"], out["fixed_theirs"],
                same_input=True)
    return rep, out


def fit_single_class_gaussian(self, dataset: torch.Tensor) -> None:
    """anomalib's ``SingleClassGaussian.fit`` without ``device=`` in ``torch.mean``, which torch rejects."""
    num_samples = dataset.shape[1]
    self.mean_vec = torch.mean(dataset, dim=1)
    data_centered = (dataset - self.mean_vec.reshape(-1, 1)) / math.sqrt(num_samples)
    self.u_mat, self.sigma_mat, _ = torch.linalg.svd(data_centered, full_matrices=False)


def dfm_nll(ctx: Context) -> tuple[Report, dict]:
    return dfm(ctx, "nll")


# -- DFKDE ----------------------------------------------------------------------------------------

@torch.no_grad()
def dfkde(ctx: Context, scaling: str = "scale") -> tuple[Report, dict]:
    from anomalib.models.components.classification import FeatureScalingMethod
    from anomalib.models.image.dfkde.torch_model import DfkdeModel

    from ad.models.dfkde import Dfkde

    ours = Dfkde(backbone_spec(ctx.backbone, ctx.weights), layers=("layer4",), n_pca_components=16,
                 feature_scaling_method=scaling)
    theirs = DfkdeModel(backbone=ctx.backbone, layers=["layer4"], pre_trained=False, n_pca_components=16,
                        feature_scaling_method=FeatureScalingMethod(scaling))
    load_frozen(theirs.feature_extractor.feature_extractor, ctx.weights)
    rep = Report("dfkde" if scaling == "scale" else f"dfkde_{scaling}")
    x = ctx.test[0]
    rep.add("embedding (pooled)", ours.embed(x), theirs.get_features(x))

    fit_ours(ours, ctx)
    fit_theirs(theirs, ctx, theirs.fit)
    classifier = theirs.classifier
    pca, kde = classifier.pca_model, classifier.kde_model
    rep.add("PCA mean", ours.mean, pca.mean)
    signs = column_signs(ours.components, pca.singular_vectors)
    rep.add("PCA axes (signs aligned)", ours.components * signs, pca.singular_vectors)
    rep.add("max length (scale)", ours.max_length, classifier.max_length)
    # kernel precision in PCA space, signs aligned: W Wᵀ (a flip S of axes makes it S W Wᵀ S)
    rep.add("KDE kernel precision (signs aligned)", signs[:, None] * (ours.whiten @ ours.whiten.T) * signs,
            kde.bw_transform @ kde.bw_transform.T)
    rep.add("KDE log normaliser", ours.log_norm, kde.norm.log())
    # anomalib's GaussianKDE.cov centres its dataset in place, so its stored points are shifted by their
    # mean: nothing with ``scale`` (PCA coordinates have mean 0), a real shift with ``norm`` (unit vectors)
    rep.add("KDE training points (signs aligned)", ours.points * signs, kde.dataset)

    out = {k: [] for k in ("log_ours", "log_theirs", "scores_ours", "scores_theirs")}
    for x in ctx.test:
        out["log_ours"].append(ours.log_density(x))
        out["log_theirs"].append(classifier.compute_kde_scores(theirs.get_features(x), as_log_likelihood=True))
        out["scores_ours"].append(ours(x).scores)
        out["scores_theirs"].append(theirs(x).pred_score.reshape(-1))
    # anomalib's density over ad's (not re-centred) training points: the same input but for that shift
    stored, kde.dataset = kde.dataset, (ours.points * signs).float()
    out["log_theirs_our_points"] = [classifier.compute_kde_scores(theirs.get_features(x), as_log_likelihood=True)
                                    for x in ctx.test]
    kde.dataset = stored
    out = {k: cat(v) for k, v in out.items()}
    rep.add("log density", out["log_ours"], out["log_theirs"])
    rep.add("log density, anomalib's KDE on ad's points", out["log_ours"], out["log_theirs_our_points"],
            same_input=True)
    rep.add("scores (anomaly probability)", out["scores_ours"], out["scores_theirs"])
    return rep, out


def dfkde_norm(ctx: Context) -> tuple[Report, dict]:
    return dfkde(ctx, "norm")


METHODS = {"padim": padim, "patchcore": patchcore, "dfm": dfm, "dfm_nll": dfm_nll, "dfkde": dfkde,
           "dfkde_norm": dfkde_norm}


# -- driver ---------------------------------------------------------------------------------------

def run_method(name: str, args: argparse.Namespace, work: Path, data: dict) -> dict:
    family = name.split("_")[0]
    backbone = DEFAULT_BACKBONES[family] if args.backbone == "default" else args.backbone
    weights = work / f"{backbone}-random-{args.seed}.pth"
    if not weights.is_file():
        random_backbone(backbone, args.seed, work)
    train, test = data["train"], data["test"]
    ctx = Context(backbone, weights, list(train["image"].split(args.batch_size)),
                  list(test["image"].split(args.batch_size)), test["label"], test["mask"].bool(), args.image_size,
                  args.coreset_ratio)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    rep, out = METHODS[name](ctx)
    seconds = time.perf_counter() - start
    maps = out.get("maps_ours") is not None
    metrics = {side: compute_metrics(out[f"scores_{key}"], ctx.labels, out[f"maps_{key}"] if maps else None,
                                     ctx.masks if maps else None)
               for side, key in (("ours", "ours"), ("anomalib", "theirs"))}
    maps_rel = next((r["rel"] for r in rep.rows if r["stage"].startswith("maps")), None)
    scores_rel = next(r["rel"] for r in reversed(rep.rows) if r["stage"].startswith("scores") and not r["same_input"])
    result = {"method": name, "backbone": backbone, "image_size": args.image_size, "seconds": round(seconds, 1),
              "maps_rel": maps_rel, "scores_rel": scores_rel, "first_parting": rep.first_parting(),
              "stages": rep.rows, "notes": rep.notes, **rep.extra, "metrics": metrics}
    print(f"\n{name} · {backbone} · {args.image_size} px · {seconds:.1f} s")
    for row in rep.rows:
        flag = "  (same input)" if row["same_input"] else ""
        more = f"  non-finite {row['non_finite']}" if "non_finite" in row else ""
        print(f"  {row['stage']:<52} {row['rel']:.2e}{flag}{more}")
    for note in rep.notes:
        print(f"  note: {note}")
    for side, values in metrics.items():
        print(f"  {side:>9}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "threshold" not in k))
    return result


def table(results: list[dict]) -> str:
    head = ("| method | backbone | px | maps rel | scores rel | first stage beyond 1e-4 | image AUROC ad / anomalib "
            "| pixel AUROC ad / anomalib |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m = r["metrics"]
        pixel = (f"{m['ours']['pixel_AUROC']:.4f} / {m['anomalib']['pixel_AUROC']:.4f}"
                 if "pixel_AUROC" in m["ours"] else "—")
        maps = f"{r['maps_rel']:.1e}" if r["maps_rel"] is not None else "—"
        lines.append(f"| {r['method']} | {r['backbone']} | {r['image_size']} | {maps} | {r['scores_rel']:.1e} | "
                     f"{r['first_parting'] or 'none'} | {m['ours']['image_AUROC']:.4f} / "
                     f"{m['anomalib']['image_AUROC']:.4f} | {pixel} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--backbone", default="resnet18",
                        help="timm name, or 'default' for each method's anomalib default")
    parser.add_argument("--category", default="brick", help="generated texture")
    parser.add_argument("--seed", type=int, default=0, help="data and backbone")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=20, help="DFKDE needs more than its 16 PCA components")
    parser.add_argument("--n-test", type=int, default=8, help="good and defective test images each")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--out", help="JSON file for the report")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = args.methods.split(",")
    if unknown := set(names) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    work = Path(tempfile.mkdtemp(prefix="ad-parity-frozen-"))
    dataset = Synthetic(category=args.category, image_size=args.image_size, n_train=args.n_train,
                        n_test_good=args.n_test, n_test_defect=args.n_test, seed=args.seed, root=str(work / "data"))
    data = {"train": load_split(dataset, "train"), "test": load_split(dataset, "test")}
    results = [run_method(name, args, work, data) for name in names]
    print("\n" + table(results))
    if args.out:
        report = {"runs": results, "tolerance": TOLERANCE, "category": args.category, "seed": args.seed,
                  "n_train": args.n_train, "n_test": 2 * args.n_test, "anomalib": __import__("anomalib").__version__,
                  "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
