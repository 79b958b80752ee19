"""DINOv2 losses and teacher normalisation, numerically faithful to the official code.

* :mod:`.dino` — DINO CLS loss terms (swapped teacher views, official normaliser);
* :mod:`.ibot` — iBOT masked-patch loss (per-crop token weights, division by all global crops);
* :mod:`.koleo` — KoLeo regulariser (epsilon on the difference vector);
* :mod:`.centering` — EMA centring with the official multi-rank statistics;
* :mod:`.sinkhorn` — Sinkhorn-Knopp (3 iterations, float32, global counts).
"""

from dinoforge.pretrain.losses.centering import Centering
from dinoforge.pretrain.losses.dino import (
    cross_entropy_rows,
    dino_global_loss,
    dino_local_loss,
    n_loss_terms,
    swap_global_crops,
)
from dinoforge.pretrain.losses.ibot import IBOT_LOSS_SCALE, LOSS_SCALES, ibot_masked_loss
from dinoforge.pretrain.losses.koleo import koleo_loss, nearest_neighbours
from dinoforge.pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["IBOT_LOSS_SCALE", "LOSS_SCALES", "Centering", "cross_entropy_rows", "dino_global_loss", "dino_local_loss",
           "ibot_masked_loss", "koleo_loss", "n_loss_terms", "nearest_neighbours", "sinkhorn_knopp",
           "swap_global_crops"]
