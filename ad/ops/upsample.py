"""Channel picking and nearest-neighbour upsampling straight into a position-major layout, as ``F.interpolate``.

PaDiM's embedding is built from these: each layer's kept channels are gathered and upsampled by one
copy into the (h, w, B, C) block that its per-position statistics read, with no intermediate maps.
"""

from __future__ import annotations

import torch


def nearest_index(size_in: int, size_out: int, device: torch.device | None = None) -> torch.Tensor:
    """Source rows of nearest-neighbour resizing, exactly as ``F.interpolate(mode="nearest")`` picks them.

    Returns:
        (size_out,) long indices into 0..size_in-1.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"nearest_index: sizes must be positive, got {size_in} -> {size_out}")
    scale = torch.tensor(float(size_in), dtype=torch.float32, device=device) / size_out  # ATen's float32 scale
    rows = torch.arange(size_out, dtype=torch.float32, device=device) * scale
    return rows.floor().long().clamp_max(size_in - 1)


def pick_channels(feature: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> its ``keep`` channels as an (h, w, B, kept) view, position-major.

    Channels-last maps are gathered as one (B*h*w, C) matrix, row by row: much faster than picking
    along the same dimension through the position-major view, whose strides defeat ATen's fast path.
    """
    b, c, h, w = feature.shape
    if feature.is_contiguous(memory_format=torch.channels_last):
        picked = feature.permute(0, 2, 3, 1).reshape(b * h * w, c).index_select(1, keep)
        return picked.view(b, h, w, len(keep)).permute(1, 2, 0, 3)
    return feature.index_select(1, keep).permute(2, 3, 0, 1)  # NCHW: whole channel planes


def upsample_nearest_into(out: torch.Tensor, part: torch.Tensor) -> None:
    """Copy ``part`` (h, w, ...) into ``out`` (H, W, ...), nearest-neighbour upsampled as ``F.interpolate``.

    An integer scale factor is a broadcast view of ``part`` (one copy, no index tensors); other sizes
    gather the rows and columns ``nearest_index`` picks.
    """
    (h, w), (big_h, big_w) = part.shape[:2], out.shape[:2]
    rows, cols = nearest_index(h, big_h, part.device), nearest_index(w, big_w, part.device)
    fh, fw = big_h // h, big_w // w
    if big_h == fh * h and big_w == fw * w and torch.equal(rows, _repeat_index(h, fh, rows.device)) \
            and torch.equal(cols, _repeat_index(w, fw, cols.device)):
        out.view(h, fh, w, fw, *out.shape[2:]).copy_(part[:, None, :, None])
    else:
        out.copy_(part[rows][:, cols])


def _repeat_index(size: int, factor: int, device: torch.device) -> torch.Tensor:
    """0, 0, 1, 1, ...: each of ``size`` rows repeated ``factor`` times."""
    return torch.arange(size, device=device).repeat_interleave(factor)
