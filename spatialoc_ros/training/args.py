"""Command-line flags shared by ``python -m spatialoc_ros.training.coarse`` and ``...training.fine``.

Every flag of the seed README's two training commands keeps working unchanged (``--hungging_model``
is an alias of ``--text_model``; ``--fixed_embedding`` may be given twice; ``--object_size`` /
``--pad_size`` are aliases of ``--max_objects``; ``--pointnet_numpoints`` of ``--num_points``).
As in the seed, the PointNet backbone is taken from ``./checkpoints/pointnet_acc0.86_lr1_p256_model.pth``
when that file exists (see ``--pointnet_path``); it is read safely, never with a plain torch.load.
Each CLI builds one parser from the groups below plus its own stage-specific group.
"""
from __future__ import annotations

import argparse
import os

from spatialoc_ros.cli import device_name, finite_float
from spatialoc_ros.models.convert_pointnet import SEED_POINTNET_NAME, PointNetFileError, describe_pointnet_file
from spatialoc_ros.training import distributed

from spatialoc_ros.models.config import OBJECT_FEATURES as FEATURES  # noqa: E402  (one source)
COLOUR_DROPOUT_DEFAULT = 0.3


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
        "--jitter", type=finite_float, default=0.005,
        help="std of the Gaussian point jitter in cell units when augmenting (0.005 = 15 cm in 30 m cells)",
    )
    g.add_argument(
        "--hint_dropout_min", type=int, default=3, metavar="K",
        help="when augmenting, keep only k of a query's n hints (the first k after the shuffle), k uniform "
        "in [K, n], so that the 3-4 hints people give degrade gracefully; 1..6, default 3; 6 (the "
        "data set's n) keeps all hints. Validation always sees all hints",
    )
    g.add_argument(
        "--colour_dropout", type=finite_float, default=COLOUR_DROPOUT_DEFAULT, metavar="P",
        help="when augmenting, probability that a kept hint loses its colour word and reads 'The pose is "
        "north of a building.', exactly as the instruction parser renders a hint given without colour; "
        f"in [0, 1], 0 = off, default {COLOUR_DROPOUT_DEFAULT:g}",
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
        "--pointnet_arch", type=str, default=None, choices=("mlp", "pointnet2"),
        help="the PointNet of the object encoder: 'mlp' (this project's shared-MLP PointNet) or "
        "'pointnet2' (the release's PointNet++ shape, e.g. to train it from scratch); default: the "
        "--pointnet_path file's, else 'mlp'",
    )
    g.add_argument(
        "--pointnet_path", type=str, default=None,
        help="PointNet weights to start the object encoder from: the release's backbone "
        f"{SEED_POINTNET_NAME} (read without running anything it names), its converted form "
        "(python -m spatialoc_ros.models.convert_pointnet IN OUT), or a state_dict of this project's "
        f"PointNet. Default: <checkpoint_root>/{SEED_POINTNET_NAME} if that file exists (the seed's "
        "place), else none; 'none' trains the PointNet from scratch. The file decides the PointNet's "
        "shape (the release's PointNet++ or this project's) and, unless --pointnet_dim is given, its width",
    )


def add_optim_args(parser: argparse.ArgumentParser, lr: float, epochs: int, batch_size: int) -> None:
    g = parser.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=batch_size,
                   help="queries per batch (under torchrun the global batch, split over the processes)")
    g.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    g.add_argument("--learning_rate", type=finite_float, default=lr, help="Adam learning rate")
    g.add_argument("--weight_decay", type=finite_float, default=0.0, help="AdamW weight decay (0 = Adam)")
    g.add_argument(
        "--lr_scheduler", type=str, default="step", choices=("step", "exponential", "cosine", "none"),
        help="step: multiply by --lr_gamma every --lr_step epochs; exponential: by --lr_gamma every "
        "epoch; cosine: cosine decay to 0 over --epochs",
    )
    g.add_argument("--lr_step", type=int, default=5, help="epochs between steps of the step schedule")
    g.add_argument("--lr_gamma", type=finite_float, default=0.5, help="learning-rate decay factor")
    g.add_argument("--grad_clip", type=finite_float, default=5.0, help="max gradient norm (0 = no clipping)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", type=device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
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
    from spatialoc_ros.cli import check_number, check_output_dir

    check_number(parser, "--learning_rate", args.learning_rate, low=0, low_open=True)
    check_number(parser, "--weight_decay", args.weight_decay, low=0)
    check_number(parser, "--lr_gamma", args.lr_gamma, low=0, low_open=True)
    check_number(parser, "--lr_step", args.lr_step, low=1)
    check_number(parser, "--grad_clip", args.grad_clip, low=0)
    check_number(parser, "--seed", args.seed, low=0, high=2**32 - 1)
    check_number(parser, "--threads", args.threads, low=1)
    check_number(parser, "--num_workers", args.num_workers, low=0)
    for flag, low, high in getattr(args, "stage_ranges", ()):
        check_number(parser, flag, getattr(args, flag.lstrip("-")), low=low, high=high)
    if args.max_batches is not None and args.max_batches < 1:
        parser.error("--max_batches must be >= 1")
    if args.base_path is not None and not os.path.isdir(args.base_path):
        parser.error(f"--base_path {args.base_path} is not a folder")
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    resolve_pointnet(args, parser)
    check_number(parser, "--jitter", args.jitter, low=0)
    if not 1 <= args.hint_dropout_min <= 6:
        parser.error(f"--hint_dropout_min must be in 1..6 (6 = keep all hints), got {args.hint_dropout_min}")
    check_number(parser, "--colour_dropout", args.colour_dropout, low=0, high=1)
    check_output_dir(parser, "--checkpoint_root/--folder_name", os.path.join(args.checkpoint_root, args.folder_name))
    args.use_features = list(dict.fromkeys(args.use_features))
    distributed.check_args(args, parser, run_topology(parser))


def run_topology(parser: argparse.ArgumentParser) -> distributed.Topology:
    """This process's place in a torchrun run (a single process without torchrun); exits via
    parser.error when torchrun's environment variables are incomplete."""
    try:
        return distributed.Topology.from_env()
    except distributed.TopologyError as err:
        parser.error(str(err))


def resolve_pointnet(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Settle --pointnet_path (the seed's default place, 'none') and adopt the file's width as
    --pointnet_dim when that flag was left at its default; exits via parser.error."""
    if args.pointnet_path is None:
        seed_path = os.path.join(args.checkpoint_root, SEED_POINTNET_NAME)
        if args.resume is None and os.path.isfile(seed_path):
            args.pointnet_path = seed_path
    elif args.pointnet_path.lower() == "none":
        args.pointnet_path = None
    if args.pointnet_path is None:
        return
    if not os.path.isfile(args.pointnet_path):
        parser.error(f"--pointnet_path {args.pointnet_path}: no such file")
    if args.resume is not None:  # a resumed run's model comes from its checkpoint
        return
    try:
        info = describe_pointnet_file(args.pointnet_path)
    except (PointNetFileError, OSError) as err:
        parser.error(f"--pointnet_path {args.pointnet_path}: {err}")
    if getattr(args, "pointnet_arch", None) not in (None, info.arch):
        parser.error(f"--pointnet_arch {args.pointnet_arch} does not fit --pointnet_path {args.pointnet_path}, "
                     f"a {info.arch!r} PointNet: drop --pointnet_arch or pass {info.arch}")
    if hasattr(args, "pointnet_dim") and args.pointnet_dim != info.out_dim:
        if args.pointnet_dim != parser.get_default("pointnet_dim"):
            parser.error(f"--pointnet_dim {args.pointnet_dim} does not fit --pointnet_path {args.pointnet_path}, "
                         f"a {info.out_dim}-d PointNet: drop --pointnet_dim or pass {info.out_dim}")
        args.pointnet_dim = info.out_dim
    print(f"[train] PointNet backbone: {args.pointnet_path} ({info.arch}, pointnet_dim {info.out_dim}; "
          "--pointnet_path none trains the PointNet from scratch)")
