"""Command-line flags shared by ``python -m spatialoc_ros.training.coarse`` and ``...training.fine``.

Every flag of the seed README's two training commands keeps working unchanged (``--hungging_model``
is an alias of ``--text_model``; ``--fixed_embedding`` may be given twice; ``--object_size`` /
``--pad_size`` are aliases of ``--max_objects``; ``--pointnet_numpoints`` of ``--num_points``).
Each CLI builds one parser from the groups below plus its own stage-specific group.
"""
from __future__ import annotations

import argparse
import os

FEATURES = ("class", "color", "position", "num")
DEVICES = ("auto", "cpu", "cuda")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument(
        "--base_path", type=str, default=None,
        help="KITTI360Pose folder holding cells/ and poses/ (and optionally direction/). "
        "Default: the synthetic default city (generated on first use, see "
        "spatialoc_ros.data.synthetic.default_city_path).",
    )
    g.add_argument(
        "--use_features", nargs="+", default=list(FEATURES), choices=FEATURES, metavar="FEATURE",
        help=f"object features besides the point cloud, any of {', '.join(FEATURES)} (default: all)",
    )
    g.add_argument("--shuffle", action="store_true", help="shuffle the training queries every epoch")
    g.add_argument(
        "--no_pc_augment", action="store_true",
        help="disable training augmentation (hint order shuffle, cell flips with east/west or "
        "north/south swapped in the text, point jitter)",
    )
    g.add_argument(
        "--jitter", type=float, default=0.005,
        help="std of the Gaussian point jitter in cell units when augmenting (0.005 = 15 cm in 30 m cells)",
    )
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument(
        "--max_batches", type=int, default=None,
        help="debug: stop each training epoch after this many batches (validation is not cut)",
    )
    g.add_argument(
        "--max_val_queries", type=int, default=None,
        help="debug: validate on at most this many val queries (default: all)",
    )


def add_text_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("language model")
    g.add_argument(
        "--text_model", "--hungging_model", dest="text_model", type=str, default="minilm",
        help="frozen language model: 'minilm' (bundled, offline default), a local folder holding a "
        "Hugging Face model (e.g. a downloaded flan-t5-large), or a name in the local HF cache. "
        "--hungging_model is the seed's spelling of this flag.",
    )
    g.add_argument(
        "--fixed_embedding", action="store_true",
        help="cache the language model's token features of every distinct hint sentence (the model is "
        "frozen either way; giving the flag twice, as the seed's fine command does, is harmless)",
    )
    g.add_argument("--max_tokens", type=int, default=32, help="tokens kept per hint sentence")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cell encoder size")
    g.add_argument(
        "--num_points", "--pointnet_numpoints", dest="num_points", type=int, default=64,
        help="points sampled per object (--pointnet_numpoints is the seed's spelling)",
    )
    g.add_argument(
        "--max_objects", "--object_size", "--pad_size", dest="max_objects", type=int, default=28,
        help="objects per cell after padding / truncation (the release uses 28)",
    )
    g.add_argument(
        "--pointnet_path", type=str, default=None,
        help="optional state_dict (weights_only torch file) to initialise the PointNet of the "
        "object encoder; the seed's pickled model file is not accepted",
    )


def add_optim_args(parser: argparse.ArgumentParser, lr: float, epochs: int, batch_size: int) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=batch_size, help="queries per batch")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--learning_rate", type=float, default=lr, help="Adam learning rate")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (0 = Adam)")
    g.add_argument(
        "--lr_scheduler", type=str, default="step", choices=("step", "exponential", "cosine", "none"),
        help="step: multiply by --lr_gamma every --lr_step epochs; exponential: by --lr_gamma every "
        "epoch; cosine: cosine decay to 0 over --epochs",
    )
    g.add_argument("--lr_step", type=int, default=5, help="epochs between steps of the step schedule")
    g.add_argument("--lr_gamma", type=float, default=0.5, help="learning-rate decay factor")
    g.add_argument("--grad_clip", type=float, default=5.0, help="max gradient norm (0 = no clipping)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", type=str, default="auto", choices=DEVICES,
                   help="auto = CUDA when available, else CPU")
    g.add_argument("--seed", type=int, default=0, help="random seed (python, numpy, torch)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, or $OMP_NUM_THREADS)")
    g.add_argument(
        "--folder_name", type=str, default="run",
        help="run name: checkpoints and metrics go to <checkpoint_root>/<folder_name>/",
    )
    g.add_argument("--checkpoint_root", type=str, default="./checkpoints",
                   help="parent folder of the run folders (default ./checkpoints, as in the seed)")
    g.add_argument(
        "--resume", type=str, default=None, metavar="LAST_PTH",
        help="continue a run from its last.pth (model, optimiser, scheduler, epoch, best metric)",
    )
    g.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")


def check_common(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Validate values argparse cannot check by itself; exits via parser.error."""
    for name in ("batch_size", "epochs", "num_points", "max_objects", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size < 2 and getattr(args, "stage", "") == "coarse":
        parser.error("--batch_size must be >= 2 for the ranking loss (in-batch negatives)")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error("--max_batches must be >= 1")
    if args.base_path is not None and not os.path.isdir(args.base_path):
        parser.error(f"--base_path {args.base_path} is not a folder")
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    if args.pointnet_path is not None and not os.path.isfile(args.pointnet_path):
        parser.error(f"--pointnet_path {args.pointnet_path}: no such file")
    if args.jitter < 0:
        parser.error("--jitter must be >= 0")
    args.use_features = list(dict.fromkeys(args.use_features))
