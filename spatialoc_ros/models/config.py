"""Configuration dataclasses of the coarse (retrieval) and fine (UGFL) models.

Only :mod:`spatialoc_ros.models.builder` turns these into models. Every field is a primitive
(str, int, float, bool, list of str, None) so ``dataclasses.asdict(cfg)`` can be stored in a
checkpoint that loads with ``torch.load(..., weights_only=True)``.

Units: point coordinates and object centres are cell-normalised (a cell spans [0, 1] in x and y);
``min_std`` is in the same cell units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

#: Object features that ``use_features`` may name (the PointNet is always used).
OBJECT_FEATURES: tuple[str, ...] = ("class", "color", "position", "num")
RANKING_LOSSES: tuple[str, ...] = ("CCL", "contrastive")
FINE_LOSSES: tuple[str, ...] = ("nll", "mse")
FINE_MEAN_HEADS: tuple[str, ...] = ("anchor", "direct")
REGRESSOR_CELLS: tuple[str, ...] = ("all",)
#: PointNets of the object encoder: 'mlp' (this project's shared-MLP PointNet) and 'pointnet2'
#: (the shape of the release's pretrained PointNet++ backbone, see models.convert_pointnet).
POINTNET_ARCHS: tuple[str, ...] = ("mlp", "pointnet2")


def _default_features() -> list[str]:
    return list(OBJECT_FEATURES)


def _check_common(cfg) -> None:
    """Validate the fields that both configs share; raise ValueError naming the bad field."""
    unknown = [f for f in cfg.use_features if f not in OBJECT_FEATURES]
    if unknown:
        raise ValueError(f"use_features has unknown entries {unknown}; choose from {OBJECT_FEATURES}")
    if len(set(cfg.use_features)) != len(cfg.use_features):
        raise ValueError(f"use_features has duplicates: {cfg.use_features}")
    for name in ("text_dim", "embed_dim", "num_points", "max_objects", "pointnet_dim", "num_heads"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cfg.embed_dim % cfg.num_heads != 0:
        raise ValueError(f"embed_dim ({cfg.embed_dim}) must be divisible by num_heads ({cfg.num_heads})")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.pointnet_arch is None:
        # The weights file says which PointNet it holds; the resolved name is what a checkpoint
        # stores, so a model rebuilt from its config never needs the file again.
        if cfg.pointnet_path is None:
            cfg.pointnet_arch = "mlp"
        else:
            from spatialoc_ros.models.convert_pointnet import describe_pointnet_file

            cfg.pointnet_arch = describe_pointnet_file(cfg.pointnet_path).arch
    if cfg.pointnet_arch not in POINTNET_ARCHS:
        raise ValueError(f"pointnet_arch must be one of {POINTNET_ARCHS}, got {cfg.pointnet_arch!r}")


@dataclass
class CoarseConfig:
    """Text-to-cell retrieval model (SpatiaLoc coarse stage)."""

    text_model: str = "minilm"  # frozen language model: 'minilm', a local folder or a cached hub name
    text_dim: int = 384  # width of the language model's token features (384 MiniLM, 1024 Flan-T5-large)
    embed_dim: int = 256  # shared embedding width of every retrieval level (--coarse_embed_dim)
    use_features: list = field(default_factory=_default_features)  # subset of OBJECT_FEATURES
    num_points: int = 64  # points sampled per object
    max_objects: int = 28  # objects per cell after padding / truncation
    pointnet_dim: int = 128  # width of the PointNet's max-pooled point feature
    pointnet_path: Optional[str] = None  # optional PointNet weights to start from (see ObjectEncoder.load_pointnet)
    pointnet_arch: Optional[str] = None  # 'mlp' or 'pointnet2' (the release's shape); None: pointnet_path's, else 'mlp'
    num_hidden_layers: int = 3  # hint-transformer layers and BEOSE layers (--num_of_hidden_layer)
    num_heads: int = 4  # attention heads of the hint transformer
    beose_dim: int = 64  # width of BEOSE's per-pair relation features (O*O pairs: keep it small)
    bezier_samples: int = 4  # points sampled on each pair's Bezier curve
    use_beose: bool = True  # Bezier Enhanced Object Spatial Encoder (adds the 'relation' level)
    use_fae: bool = True  # Frequency Aware Encoder for the global cell descriptor
    fae_highpass_ratio: float = 0.7  # FAE high-pass branch: fraction of lowest frequency bins zeroed
    ranking_loss: str = "CCL"  # 'CCL' (complementary contrastive) or 'contrastive' (InfoNCE)
    temperature: float = 0.05  # softmax temperature of the ranking loss
    alpha: float = 2.0  # CCL weight exponent 1/alpha
    dropout: float = 0.1  # dropout in MLPs and transformer layers

    def __post_init__(self) -> None:
        _check_common(self)
        if self.ranking_loss not in RANKING_LOSSES:
            raise ValueError(f"ranking_loss must be one of {RANKING_LOSSES}, got {self.ranking_loss!r}")
        if self.num_hidden_layers < 1 or self.beose_dim < 1 or self.bezier_samples < 1:
            raise ValueError("num_hidden_layers, beose_dim and bezier_samples must be >= 1")
        if not 0.0 <= self.fae_highpass_ratio < 1.0:
            raise ValueError(f"fae_highpass_ratio must be in [0, 1), got {self.fae_highpass_ratio}")
        if self.temperature <= 0 or self.alpha <= 0:
            raise ValueError("temperature and alpha must be > 0")


@dataclass
class FineConfig:
    """Fine localiser: UGFL (Uncertainty aware Gaussian Fine Localizer)."""

    text_model: str = "minilm"  # frozen language model, as in CoarseConfig
    text_dim: int = 384  # width of the language model's token features
    embed_dim: int = 128  # token width of the cross-attention layers (--fine_embed_dim)
    use_features: list = field(default_factory=_default_features)  # subset of OBJECT_FEATURES
    num_points: int = 64  # points sampled per object
    max_objects: int = 28  # objects per cell after padding / truncation
    pointnet_dim: int = 128  # width of the PointNet's max-pooled point feature
    pointnet_path: Optional[str] = None  # optional PointNet weights to start from (see ObjectEncoder.load_pointnet)
    pointnet_arch: Optional[str] = None  # 'mlp' or 'pointnet2' (the release's shape); None: pointnet_path's, else 'mlp'
    num_layers: int = 2  # cross-attention layers (hints <-> objects)
    num_heads: int = 4  # attention heads
    mean_head: str = "anchor"  # 'anchor': hints point at objects + learned offsets; 'direct': MLP
    fine_loss: str = "nll"  # 'nll' (Gaussian negative log-likelihood) or 'mse' (mean only)
    beta: float = 0.0  # beta-NLL exponent (0 = plain NLL; 0.5 is the usual choice)
    matching_weight: float = 0.0  # weight of the hint->object matching ranking loss (anchor head; 0 = off, the CLI default)
    min_std: float = 0.005  # floor on the predicted standard deviations, cell units
    regressor_cell: str = "all"  # target = position normalised to the whole cell box
    dropout: float = 0.1  # dropout in MLPs and attention layers

    def __post_init__(self) -> None:
        _check_common(self)
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.fine_loss not in FINE_LOSSES:
            raise ValueError(f"fine_loss must be one of {FINE_LOSSES}, got {self.fine_loss!r}")
        if self.mean_head not in FINE_MEAN_HEADS:
            raise ValueError(f"mean_head must be one of {FINE_MEAN_HEADS}, got {self.mean_head!r}")
        if self.regressor_cell not in REGRESSOR_CELLS:
            raise ValueError(f"regressor_cell must be one of {REGRESSOR_CELLS}, got {self.regressor_cell!r}")
        if self.matching_weight < 0:
            raise ValueError(f"matching_weight must be >= 0, got {self.matching_weight}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.min_std <= 0:
            raise ValueError(f"min_std must be > 0 (cell units), got {self.min_std}")
