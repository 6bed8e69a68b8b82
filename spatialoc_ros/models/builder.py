"""The one place that turns configs into models."""
from __future__ import annotations

from typing import Optional

from spatialoc_ros.models.coarse import CoarseModel
from spatialoc_ros.models.config import CoarseConfig, FineConfig
from spatialoc_ros.models.object_encoder import ObjectEncoder
from spatialoc_ros.models.ugfl import FineModel

#: Width of each object feature branch (class / color / position / num) before the projection.
FEATURE_DIM = 64


def _check_text_dim(cfg, text_dim: Optional[int]) -> int:
    if text_dim is None:
        return cfg.text_dim
    if text_dim != cfg.text_dim:
        raise ValueError(
            f"the text encoder gives {text_dim}-d tokens but the config says text_dim={cfg.text_dim}; "
            "set the config's text_dim to the encoder's .dim so checkpoints stay consistent"
        )
    return text_dim


def build_object_encoder(cfg, load_pointnet: bool = True) -> ObjectEncoder:
    return ObjectEncoder(
        embed_dim=cfg.embed_dim,
        pointnet_dim=cfg.pointnet_dim,
        use_features=cfg.use_features,
        feature_dim=FEATURE_DIM,
        dropout=cfg.dropout,
        pointnet_arch=cfg.pointnet_arch,
        pointnet_path=cfg.pointnet_path if load_pointnet else None,
    )


def build_coarse_model(cfg: CoarseConfig, text_dim: Optional[int] = None, load_pointnet: bool = True) -> CoarseModel:
    """CoarseConfig -> CoarseModel. ``load_pointnet=False`` skips ``cfg.pointnet_path`` (used when
    a checkpoint's own weights are loaded right after)."""
    return CoarseModel(
        text_dim=_check_text_dim(cfg, text_dim),
        embed_dim=cfg.embed_dim,
        object_encoder=build_object_encoder(cfg, load_pointnet),
        num_hidden_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_heads,
        use_beose=cfg.use_beose,
        beose_dim=cfg.beose_dim,
        bezier_samples=cfg.bezier_samples,
        use_fae=cfg.use_fae,
        fae_highpass_ratio=cfg.fae_highpass_ratio,
        dropout=cfg.dropout,
    )


def build_fine_model(cfg: FineConfig, text_dim: Optional[int] = None, load_pointnet: bool = True) -> FineModel:
    """FineConfig -> FineModel (UGFL)."""
    return FineModel(
        text_dim=_check_text_dim(cfg, text_dim),
        embed_dim=cfg.embed_dim,
        object_encoder=build_object_encoder(cfg, load_pointnet),
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        mean_head=cfg.mean_head,
        min_std=cfg.min_std,
        dropout=cfg.dropout,
    )
