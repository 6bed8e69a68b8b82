"""SpatiaLoc models: frozen text encoder, cell tensors, coarse retrieval and the UGFL fine stage.

Importing this package does not import transformers; that happens when a FrozenTextEncoder is made.
"""
from spatialoc_ros.models.builder import build_coarse_model, build_fine_model  # noqa: F401
from spatialoc_ros.models.cell_tensors import CellBatch, cells_to_batch  # noqa: F401
from spatialoc_ros.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
from spatialoc_ros.models.coarse import CellEmbedding, CoarseModel, TextEmbedding, combined_scores  # noqa: F401
from spatialoc_ros.models.config import CoarseConfig, FineConfig  # noqa: F401
from spatialoc_ros.models.text_encoder import (  # noqa: F401
    FrozenTextEncoder,
    HintBatch,
    HintEncoder,
    resolve_text_model,
    split_hints,
)
from spatialoc_ros.models.ugfl import FineModel, Gaussian2D  # noqa: F401
