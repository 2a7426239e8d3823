"""The index maps the splice kernels run on: the padding sentinel and what `splice` reads from a plan.

The kernels know nothing of how a plan is drawn; `cmcaug.plan.SplicePlan` builds these maps (and imports
`PAD_SOURCE` from here), and any object carrying them can be spliced.
"""
from __future__ import annotations

from typing import Protocol

import torch

PAD_SOURCE = -(2**31)
"""The `source_index` sentinel for padding positions (int32 minimum, never a valid patch row)."""


class SpliceMaps(Protocol):
    """A plan as `splice` reads it. Sizes come from the maps' shapes: B and L_out from `source_index`, L from
    `text_destination`, M and K from `patch_destination`; all maps share one device.

    Each source row has at most one destination (so the backward is a gather) and the maps agree with each
    other; `SplicePlan` checks hand-made maps when it is made (`build` makes them valid by construction),
    and the kernels trust them.
    """

    source_index: torch.Tensor       # int32 [B, L_out]: >= 0 text row b*L + j; < 0 patch row -s - 1; PAD_SOURCE
    text_destination: torch.Tensor   # int32 [B, L]: flat output row of each text row, or -1
    patch_destination: torch.Tensor  # int32 [M, K]: flat output row of each patch row, or -1
    attention_mask: torch.Tensor     # int64 [B, L_out]: 1 token, 0 padding
    modality_ids: torch.Tensor       # int64 [B, L_out]: 0 text, 1 patch (0 on padding)
    position_ids: torch.Tensor       # int64 [B, L_out]: 0, 1, 2, ... per row, 0 on padding
