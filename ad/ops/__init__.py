"""Algorithms the methods share, each a pure function or a tiny class beside its plain reference.

``coreset`` (greedy k-center on a random projection), ``knn`` (exact, pruned and faiss nearest
neighbours, and the free-memory probe), ``gaussian`` (PaDiM's block-form Gaussians), ``upsample``
(nearest upsampling into PaDiM's layout), ``pca``, ``kde`` and ``cached`` (look keys up, compute
only the misses, store them).
"""
