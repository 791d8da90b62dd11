"""PatchCore's scoring as a static graph: exact k-NN over the embedded memory bank as a matrix product and top-k.

``Patchcore`` searches its bank with faiss or a pruned search, neither of which a graph can hold. Here
every patch's squared distance to every bank row is one (B, h·w, N) product, as ``ad.ops.knn.torch_nearest``
computes it, and the image score re-weights the worst patch as ``Patchcore.image_scores``. The bank
is a constant of the graph: N x D floats (``bank_bytes``), and the distance block takes B·h·w·N floats
of working memory.
"""

from __future__ import annotations

import torch

from ad.export.scorers import FittedForward
from ad.models.patchcore import Patchcore, as_patches


def bank_bytes(model: Patchcore) -> int:
    """Bytes the memory bank adds to an exported file."""
    return model.memory_bank.numel() * model.memory_bank.element_size()


class PatchcoreScorer(FittedForward):
    """(B, 3, S, S) images -> PatchCore's (scores, maps), nearest neighbours found by matmul + top-k."""

    def __init__(self, model: Patchcore) -> None:
        super().__init__(model, fitted=model.memory_bank.numel() > 0)
        self.register_buffer("bank_sq", model.memory_bank.square().sum(1), persistent=False)

    def nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, D) queries -> squared distances (B, M, k), ascending, and bank indices of their k nearest rows."""
        bank = self.model.memory_bank
        products = torch.baddbmm(self.bank_sq.expand(queries.shape[0], 1, -1), queries,
                                 bank.T.expand(queries.shape[0], -1, -1), alpha=-2)
        values, index = products.topk(k, dim=-1, largest=False)
        return (values + queries.square().sum(-1, keepdim=True)).clamp_min(0), index

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        embedding = m.embed(images)
        b, c, h, w = embedding.shape
        patches = as_patches(embedding)  # (B, h·w, C)
        squared, nearest = self.nearest(patches, 1)
        distances, nearest = squared[..., 0].sqrt(), nearest[..., 0]  # (B, h·w)
        maps = m.smoother(distances.reshape(b, h, w), size=images.shape[-2:])
        return self.image_scores(patches, distances, nearest), maps

    def image_scores(self, patches: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """``Patchcore.image_scores`` batched: the worst patch's distance, weighted by how isolated its neighbour is."""
        m = self.model
        if m.num_neighbors == 1:
            return distances.amax(1)
        worst = distances.argmax(1, keepdim=True)  # (B, 1)
        score = distances.gather(1, worst)[:, 0]
        m_star = nearest.gather(1, worst)  # (B, 1)
        patch = patches.gather(1, worst[..., None].expand(-1, -1, patches.shape[-1]))  # (B, 1, C)
        _, support = self.nearest(m.memory_bank[m_star], m.num_neighbors)  # (B, 1, k)
        to_support = torch.linalg.vector_norm(patch - m.memory_bank[support[:, 0]], dim=-1)  # (B, k)
        return (1 - to_support.softmax(1)[:, 0]) * score
