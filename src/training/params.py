"""Command-line flags. Names follow OpenCLIP / ProtoCLIP so their users' commands carry over;
each job adds its own group (training/jobs/<job>.py: add_arguments)."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

from open_clip_train.params import ParseKwargs as _OpenClipKwargs

from foundation.errors import UserError
from training.jobs import available_jobs, mark_job_flag
from training.preemption import ALWAYS_STOP, signal_flag
from training.reporting import parse_report_to


def _frequency_flags(group) -> None:
    group.add_argument("--zeroshot-frequency", type=int, default=0,
                       help="run zero-shot eval every N epochs (0: never; use the monitor instead)")
    group.add_argument("--linear-frequency", type=int, default=0, help="run linear-probe eval every N epochs")
    group.add_argument("--retrieval-frequency", type=int, default=0, help="run retrieval eval every N epochs")
    group.add_argument("--eval-data-dir", default=None,
                       help="eval root (ProtoCLIP layout: coco2017/, <name>/{train,test}/, flickr30k/, cifar10/…)")
    group.add_argument("--topk", type=int, nargs="+", default=[1, 5], metavar="K",
                       help="k of the zero-shot and linear-probe accuracies acc{k} / lp_acc{k} (e.g. 1 3 5 10 20)")


def _cluster_flags(group) -> None:
    group.add_argument("--stop-signal", type=signal_flag, default="USR1", metavar="SIGNAL",
                       help="besides SIGTERM and SIGINT, this signal makes every rank finish its step, write "
                            "epoch_latest.pt and exit 75 (resume with --resume latest); USR1 matches SLURM's "
                            "--signal=USR1@120. 'none': only SIGTERM and SIGINT")
    group.add_argument("--stack-dump-signal", type=signal_flag, default="USR2", metavar="SIGNAL",
                       help="`kill -SIGNAL <pid>` prints every thread's Python stack of a trainer process (where a "
                            "hung job waits); 'none': off")
    group.add_argument("--no-set-device-rank", action="store_true",
                       help="use cuda:0, not cuda:LOCAL_RANK: for a launcher that gives each process one GPU of "
                            "its own (SLURM's --gpus-per-task=1), so every process sees its GPU as device 0")


class ParseKwargs(_OpenClipKwargs):
    """open_clip_train's KEY=VALUE parsing (values as Python literals, else strings); a pair without '='
    is a usage error instead of a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [value for value in values if value.count("=") != 1]
        if bad:
            parser.error(f"{option_string}: expected KEY=VALUE pairs, got {bad[0]!r}")
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    jobs = available_jobs()
    parser = argparse.ArgumentParser(
        prog="python -m training.main",
        description="clipcompress trainer: one loop for contrastive training, ProtoRKD, pruning and distillation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--job", default="clip", choices=sorted(jobs),
                        help="what to train: " + "; ".join(f"{n}: {j.help}" for n, j in sorted(jobs.items())))

    data = parser.add_argument_group("data")
    data.add_argument("--train-data", default=None,
                      help="TSV/CSV file, a UPop/BLIP annotation JSON (coco_karpathy_train.json: a list of "
                           "{image, caption}), webdataset shards (brace patterns, '::'-separated lists), or "
                           "'synthetic'")
    data.add_argument("--train-image-root", default=None,
                      help="the folder the image paths of an annotation JSON are relative to (UPop's image_root; "
                           "default: the JSON's folder); a path leaving it is skipped and counted")
    data.add_argument("--dataset-type", default="auto", choices=["auto", "csv", "json", "webdataset", "synthetic"],
                      help="data source type (auto: from --train-data; .json is an annotation JSON)")
    data.add_argument("--csv-separator", default="\t", help="column separator of the TSV/CSV")
    data.add_argument("--csv-img-key", default="filepath",
                      help="column with image paths (relative to the file's folder or absolute)")
    data.add_argument("--csv-caption-key", default="title", help="column with captions")
    data.add_argument("--dataset-size", type=int, default=None,
                      help="number of rows in the training set (episodic jobs; default: read from the data)")
    data.add_argument("--episode-size", type=int, default=0,
                      help="episodic training (ProtoCLIP): each epoch visits this many rows drawn with replacement "
                           "(0: a shuffled pass over all rows)")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch for shards (default: sizes.json) or size of synthetic data")
    data.add_argument("--dataset-resampled", action="store_true",
                      help="sample shards with replacement (webdataset), as open_clip")
    data.add_argument("--workers", type=int, default=2, help="data-loader processes per rank")
    data.add_argument("--prefetch-factor", type=int, default=2,
                      help="batches each loader worker keeps ready. They wait in /dev/shm: batch x workers x this "
                           "x processes per machine x one float32 image each (4 x 8 x 128 at 224 px is ~2.5 GB "
                           "per rank); the run refuses at start what /dev/shm cannot hold")
    data.add_argument("--shuffle-buffer", type=int, default=5000,
                      help="webdataset shards: samples in the shuffle buffer each loader worker draws from (still "
                           "encoded: ~50-100 KB each at 224 px). The shard list itself is reshuffled every epoch")
    data.add_argument("--token-cache-dir", default=None,
                      help="where a TSV/CSV's caption tokens are cached (tokenized once, split across ranks, "
                           "then read as a memmap every epoch); default <logs>/<name>/cache. Point several "
                           "runs on the same data and tokenizer at one folder to tokenize once for all")
    data.add_argument("--no-token-cache", action="store_true",
                      help="tokenize captions in the loader workers every epoch instead (always so for shards)")
    data.add_argument("--allow-empty-captions", action="store_true",
                      help="keep images whose caption is empty or missing (image-only losses, e.g. "
                           "--job distill --distill-loss cosine/fd); by default they are skipped as bad")
    data.add_argument("--max-bad-fraction", type=float, default=0.01,
                      help="stop the run when more than this fraction of samples seen so far was bad")
    data.add_argument("--max-image-pixels", type=int, default=89_478_485,
                      help="skip an image whose header says it has more pixels (width x height) than this, "
                           "before decoding it, as a bad sample 'image too large' (the default is PIL's own "
                           "limit, about 9459x9459; a 20000x20000 PNG of 438 KB takes 3.7 GB to decode). "
                           "0: no limit but PIL's, which refuses more than twice its default")
    data.add_argument("--csv-quoting", default="auto", choices=["auto", "csv", "none"],
                      help="how the TSV/CSV's fields are quoted. csv: standard CSV (a field in double quotes "
                           "may hold the separator, newlines and \"\" for a quote); none: no quoting, every line "
                           "is one row and quotes are plain text (CC3M captions hold quotes); auto: none for a "
                           "tab separator, else csv. A row of the wrong field count is skipped as a bad sample "
                           "'malformed row', naming its line")

    data.add_argument("--image-mean", type=float, nargs="+", default=None, metavar="MEAN",
                      help="override the model's image mean (one value or one per channel); recorded in the "
                           "checkpoint's preprocessing, so eval and export use it too")
    data.add_argument("--image-std", type=float, nargs="+", default=None, metavar="STD",
                      help="override the model's image standard deviation (as --image-mean)")
    data.add_argument("--image-interpolation", default=None, choices=["bicubic", "bilinear", "random"],
                      help="override the model's resize interpolation")
    data.add_argument("--image-resize-mode", default=None, choices=["shortest", "longest", "squash"],
                      help="override the model's resize (and crop) mode")
    data.add_argument("--aug-cfg", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                      help="train-time augmentation as open_clip_train (its AugmentationCfg: scale=(0.9,1.0) "
                           "color_jitter=0.4 re_prob=0.25 use_timm=True ...; values read as Python literals). "
                           "Given (even empty), training images take open_clip's train transform (random resized "
                           "crop); without it they take the eval transform")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    opt.add_argument("--epochs", type=int, default=2, help="number of epochs (episodes for episodic jobs)")
    opt.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    opt.add_argument("--wd", type=float, default=0.2, help="AdamW weight decay (not on gains, biases, logit scale)")
    opt.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    opt.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "const", "const-cooldown"],
                     help="schedule after warm-up: cosine to 0, constant, or constant then a cooldown over the last "
                          "--epochs-cooldown epochs (open_clip_train's names)")
    opt.add_argument("--epochs-cooldown", type=int, default=None,
                     help="const-cooldown: the cooldown runs over the last N epochs of each schedule phase")
    opt.add_argument("--lr-cooldown-end", type=float, default=0.0, help="const-cooldown: learning rate at the end")
    opt.add_argument("--lr-cooldown-power", type=float, default=1.0,
                     help="const-cooldown: power of the polynomial decay (1: linear)")
    opt.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    opt.add_argument("--beta2", type=float, default=0.98, help="AdamW beta2")
    opt.add_argument("--eps", type=float, default=1e-6, help="AdamW epsilon")
    opt.add_argument("--optimizer-impl", default="fused", choices=["fused", "foreach"],
                     help="AdamW kernel: fused (one kernel over all tensors; CPU and CUDA) or foreach "
                          "(PyTorch's default, what open_clip_train uses); falls back to foreach elsewhere")
    opt.add_argument("--grad-clip-norm", "--max-grad-norm", dest="grad_clip_norm", type=float, default=None,
                     help="clip the global gradient norm to this value")
    opt.add_argument("--accum-freq", type=int, default=1,
                     help="one optimizer step per N batches, as open_clip_train: the contrastive jobs cache the "
                          "features of all N, then recompute each batch with gradients against all of them, so "
                          "the loss sees N x --batch-size samples per rank (jobs with a per-sample loss "
                          "accumulate gradients, which is the same)")
    opt.add_argument("--skip-nonfinite-loss", action="store_true",
                     help="skip a step whose loss is NaN/inf instead of stopping the run")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="clipc-vit-t2-64", help="open_clip model config (ours or open_clip's)")
    model.add_argument("--pretrained", default=None,
                       help="weights: a local file, hf:DIR (a local Hugging Face CLIPModel folder; --model must "
                            "name its architecture), or an open_clip tag when online")
    model.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16", "bf16"],
                       help="fp32; amp (fp16 autocast + grad scaler on GPU); amp_bf16 (bf16 autocast); "
                            "bf16 (pure bf16 weights, no fp32 master weights: small updates round away, the run "
                            "warns). On GPUs use amp_bf16 (docs/performance.md)")
    model.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the towers")
    model.add_argument("--no-tf32", action="store_true",
                       help="keep fp32 matmuls and cuDNN convolutions in full fp32 on CUDA (by default TF32 is on, "
                            "as in open_clip_train: several times faster on Ampere and newer GPUs)")
    model.add_argument("--torchcompile", action="store_true", help="torch.compile the model")
    model.add_argument("--full-text-context", action="store_true",
                       help="run the text tower over the whole context, as open_clip_train does. By default a "
                            "causal text tower that pools the end-of-text token (open_clip's CLIP and "
                            "TextTransformer) runs only up to the batch's longest caption: the same features and "
                            "gradients, less work (compress.models.text_context; docs/performance.md)")
    model.add_argument("--local-loss", action="store_true",
                       help="contrastive loss over local rows x all columns (scales with ranks; open_clip)")
    model.add_argument("--gather-with-grad", action="store_true",
                       help="all-gather features with gradients (needed for exact gradients with --local-loss)")
    model.add_argument("--siglip", action="store_true",
                       help="SigLIP's sigmoid loss with a learnable logit bias (open_clip's SigLipLoss) instead of "
                            "the softmax contrastive loss; chosen by itself for a config with init_logit_bias (the "
                            "SigLIP configs). A model without a bias gets one (-10, temperature 10), as "
                            "open_clip_train. --job distill: its caption losses (icl, crd, affinity; chosen by "
                            "itself for a SigLIP teacher), the student learning a bias")
    model.add_argument("--loss-dist-impl", default=None, choices=["bidir", "shift", "reduce", "gather"],
                       help="--siglip across ranks: how the text features travel (open_clip's SigLipLoss; "
                            "default bidir, the neighbour exchange in both directions)")
    model.add_argument("--use-bn-sync", action="store_true",
                       help="under DDP, BatchNorm layers of the trained model share batch statistics across ranks "
                            "(torch's SyncBatchNorm)")
    model.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")
    model.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                       help="leave the last N image groups trainable")
    model.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                       help="freeze BatchNorm statistics of a locked image tower")
    model.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    model.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                       help="leave the last N text layers trainable")

    run = parser.add_argument_group("run, logging and checkpoints")
    run.add_argument("--seed", type=int, default=0, help="random seed (data order, init)")
    run.add_argument("--logs", "--logs-root", dest="logs", default="./logs",
                     help="root folder of run directories (plain torchrun takes a bare --logs for its own "
                          "--logs-specs: launch with clipcompress-torchrun, or spell it --logs-root)")
    run.add_argument("--name", default=None, help="run name (folder under --logs); default: a timestamp and the model")
    run.add_argument("--save-frequency", type=int, default=1, help="write epoch_N.pt every N epochs (0: never)")
    run.add_argument("--save-every-n-steps", type=int, default=0, help="also write epoch_latest.pt every N steps")
    run.add_argument("--save-most-recent", action=argparse.BooleanOptionalAction, default=True,
                     help="write epoch_latest.pt at each epoch end too (ProtoCLIP's log tree has it; a resume reads "
                          "it); --no-save-most-recent writes only epoch_N.pt")
    run.add_argument("--delete-previous-checkpoint", action="store_true", help="keep only the newest epoch_N.pt")
    run.add_argument("--resume", default=None,
                     help="checkpoint path, or 'latest' (the newest of this run; a fresh start if none)")
    run.add_argument("--report-to", default="tensorboard",
                     help="metrics sinks, a comma list of tensorboard, wandb (needs the wandb package: pip install "
                          "'clipcompress[wandb]'; WANDB_MODE=offline logs without network) or none")
    run.add_argument("--wandb-project-name", default="clipcompress", help="the wandb project of --report-to wandb")
    run.add_argument("--log-every-n-steps", type=int, default=10, help="log losses/lr/throughput every N steps")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                     help="console log level. Progress (the epoch, the teacher pass, k-means, eval) is a bar on a "
                          "terminal; where stderr is a file (SLURM) it is a log line every "
                          "$CLIPCOMPRESS_PROGRESS_SECONDS (default 30), in out.log too; warning: none")
    run.add_argument("--copy-codebase", action="store_true", help="copy src/ into the run folder (ProtoCLIP)")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--dist-backend", default=None, help="process-group backend (default: nccl on GPU, gloo on CPU)")
    run.add_argument("--dist-timeout-minutes", type=float, default=30,
                     help="how long a collective (and joining the group) may wait before the process fails, so "
                          "torchrun can restart it; long in-loop evals on rank 0 make the other ranks wait this long")
    run.add_argument("--stop-after-steps", type=int, default=0,
                     help="end the run after this global step, as if interrupted (tests, soak runs)")

    _cluster_flags(parser.add_argument_group("cluster: stop signals, devices (docs/cluster.md)"))

    evaluation = parser.add_argument_group("in-loop evaluation")
    _frequency_flags(evaluation)
    evaluation.add_argument("--val-data", default=None,
                            help="held-out image-caption data (as --train-data): its contrastive loss, logged as "
                                 "val/contrastive_loss every --val-frequency epochs (open_clip_train's val loss)")
    evaluation.add_argument("--val-frequency", type=int, default=1,
                            help="--val-data: every N epochs and after the last (0: never)")
    evaluation.add_argument("--val-num-samples", type=int, default=None,
                            help="--val-data shards: samples per pass (default: their sizes.json)")

    for job_name, job_class in sorted(jobs.items()):
        group = parser.add_argument_group(f"--job {job_name}")
        job_class.add_arguments(group)
        for action in group._group_actions:  # add_argument_once marks the flags it shares itself
            mark_job_flag(action, group)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_job(parser, args, given_flags(argv))
    args.report_to = parse_report_to(args.report_to)
    if args.train_data is None:
        parser.error("--train-data is required (a TSV, shards, or 'synthetic')")
    if args.accum_freq < 1 or args.batch_size < 1:
        parser.error("--batch-size and --accum-freq must be at least 1")
    check_ranges(args)
    check_open_clip_flags(parser, args)
    check_run_name(args.name)
    if args.stack_dump_signal is not None and args.stack_dump_signal in (*ALWAYS_STOP, args.stop_signal):
        raise UserError(f"--stack-dump-signal {args.stack_dump_signal} is a stop signal; choose another")
    check_in_loop_eval(args)
    args.config_notes = choose_weight_configs(args)
    if any(k < 1 for k in args.topk):
        raise UserError(f"--topk {' '.join(map(str, args.topk))}: every k must be at least 1")
    return args


def in_loop_benchmarks(args: argparse.Namespace) -> List[str]:
    """The eval benchmarks a --*-frequency flag asks for."""
    return [name for name, frequency in (("zeroshot", args.zeroshot_frequency), ("linear_probe", args.linear_frequency),
                                         ("retrieval", args.retrieval_frequency)) if frequency]


def check_in_loop_eval(args: argparse.Namespace) -> None:
    """The in-loop eval's root, checked here and not at the first eval, which comes after a whole epoch of
    training: it exists and holds a set for each benchmark a --*-frequency flag asks for."""
    wanted = in_loop_benchmarks(args)
    if not wanted:
        return
    if not args.eval_data_dir:
        raise UserError("--zeroshot/--linear/--retrieval-frequency need --eval-data-dir")
    from eval.benchmarks import check_eval_data

    check_eval_data(args.eval_data_dir, wanted)


# (config flag, weights flag) pairs whose weights may be an open_clip tag: the student's, and a teacher's
WEIGHT_FLAGS = (("model", "pretrained"), ("teacher_model", "teacher_pretrained"))


def choose_weight_configs(args: argparse.Namespace) -> List[str]:
    """A tag trained with QuickGELU (OpenAI's) builds open_clip's `-quickgelu` config: `--model ViT-B-32
    --pretrained openai` runs ViT-B-32-quickgelu (compress.models.pretrained.config_for_weights). Chosen here,
    once, so that the run's model and teacher specs and params.txt name the config actually built; returns
    the lines saying so, for the run's log."""
    notes = []
    for config_dest, weights_dest in WEIGHT_FLAGS:
        name, weights = getattr(args, config_dest, None), getattr(args, weights_dest, None)
        if not name or not weights or os.path.exists(weights):
            continue
        from compress.models.pretrained import config_for_weights

        chosen = config_for_weights(name, weights)
        if chosen != name:
            setattr(args, config_dest, chosen)
            notes.append(f"--{weights_dest.replace('_', '-')} {weights} was trained with QuickGELU: "
                         f"--{config_dest.replace('_', '-')} {chosen} is built, not {name}")
    return notes


def given_flags(argv: Optional[List[str]]) -> set:
    """The dests of the flags the command line actually spells (not those left at their default): parsed
    again by a parser whose defaults are all suppressed, so only given flags land in the namespace."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


def _flag_names(action: argparse.Action) -> str:
    return "/".join(action.option_strings)


def resolve_job(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set) -> None:
    """A flag of another job than the one run is refused (it would be silently ignored); without --job, the
    job whose flags the command uses is run (the ProtoRKD README's commands carry no --job).

    Sets `args.job` and `args.job_from_flags` (the flags a job was picked by, for the run's log; None when
    --job was given or nothing was picked)."""
    owned = [action for action in parser._actions if getattr(action, "jobs", None) and action.dest in given]
    args.job_from_flags = None
    if "job" not in given and owned:
        candidates = frozenset.intersection(*(action.jobs for action in owned))
        if len(candidates) != 1:
            listed = ", ".join(f"{_flag_names(a)} (--job {' or '.join(sorted(a.jobs))})" for a in owned)
            raise UserError(f"no --job given and these flags do not name one job: {listed}; pass --job")
        args.job = next(iter(candidates))
        args.job_from_flags = ", ".join(action.option_strings[0] for action in owned)
    foreign = [action for action in owned if args.job not in action.jobs]
    if foreign:
        listed = "; ".join(f"{_flag_names(a)} belongs to --job {' and '.join(sorted(a.jobs))}" for a in foreign)
        raise UserError(f"{listed}: not a flag of --job {args.job}, the job this command runs "
                        f"(pass the --job it belongs to, or drop it)")


# flag → (smallest allowed value, what it means): values argparse's types accept but a run cannot use
_MINIMUMS = {
    "lr": (0.0, "a learning rate"),
    "wd": (0.0, "a weight decay"),
    "warmup": (0, "a number of warm-up steps"),
    "workers": (0, "a number of data-loader processes"),
    "prefetch_factor": (1, "a number of batches per loader worker"),
    "shuffle_buffer": (1, "a number of samples"),
    "log_every_n_steps": (1, "a logging interval in steps"),
    "epochs": (1, "a number of epochs"),
    "save_frequency": (0, "an epoch interval (0: never)"),
    "save_every_n_steps": (0, "a step interval (0: never)"),
}


def check_open_clip_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The open_clip_train flags' values, checked before anything is built."""
    for flag in ("image_mean", "image_std"):
        values = getattr(args, flag)
        if values is not None and len(values) not in (1, 3):
            parser.error(f"--{flag.replace('_', '-')}: give one value or one per channel (3), got {len(values)}")
    if args.image_std is not None and min(args.image_std) <= 0:
        parser.error("--image-std: every value must be positive")
    if args.force_patch_dropout is not None and not 0 <= args.force_patch_dropout < 1:
        parser.error(f"--force-patch-dropout {args.force_patch_dropout}: must be in [0, 1)")
    if args.lr_scheduler == "const-cooldown":
        if args.epochs_cooldown is None or not 0 < args.epochs_cooldown <= args.epochs:
            parser.error(f"--lr-scheduler const-cooldown needs --epochs-cooldown N with 0 < N <= --epochs "
                         f"({args.epochs})")
    elif args.epochs_cooldown is not None:
        parser.error("--epochs-cooldown is for --lr-scheduler const-cooldown")


def check_ranges(args: argparse.Namespace) -> None:
    for key, (minimum, meaning) in _MINIMUMS.items():
        value = getattr(args, key, None)
        if value is not None and not value >= minimum:  # `not >=` also refuses NaN
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value}: must be at least {minimum} ({meaning})")


def check_run_name(name: Optional[str]) -> None:
    """`--name` is one folder under --logs: never a path that leaves it (`..`, `/abs`, `a/../..`)."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("~"):
        raise UserError(f"--name {name!r}: must be a single folder name under --logs (no '/', '..' or absolute path)")
