"""Distillation from stored teacher embeddings against the online teacher: distill-job samples per second of
the same student on the same reinforced shards, batch and seed, one from the embeddings the shards store and
one running the teacher on the same stored views (`--ignore-stored-embeddings`), measured side by side in one run.

    PYTHONPATH=src python scripts/bench_reinforce.py          # CPU: ViT-S-32-alt -> its ViT at 2 layers x 128
    PYTHONPATH=src python scripts/bench_reinforce.py --student mobilenet_v3_small
    PYTHONPATH=src python scripts/bench_reinforce.py --device cuda --teacher-model ViT-L-14 --student ViT-B-32 \\
        --train-size 4096 --views 10 --batch-size 128

It writes a small corpus (utils.make_corpus), a random-init teacher (its cost is what is measured, not what it
knows) and the set `clipcompress reinforce` makes of them into a temporary folder, then times training steps
(next batch from the job's own loader with --workers 0, the job's loss, backward, the trainer's AdamW step) of
the two runs
interleaved (compress.ops.profile.time_interleaved): each round times one step of each, so machine load hits
both alike. The process CPU time of a step is printed beside its wall time: on a shared machine it is the
steadier. The teacher's image MACs per sample against the student's (compress.ops.profile.params_and_macs) say
how much work the stored embeddings save, and the storage per sample what they cost on disk.
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch

from compress.models.pretrained import create_clip
from compress.models.registry import open_clip_spec
from compress.ops.profile import params_and_macs, time_interleaved
from foundation.model_configs import register_model_configs
from training.data import get_data
from training.distributed import DistInfo
from training.jobs.distill import DistillJob
from training.main import build_optimizer, seed_everything
from training.params import parse_args
from utils.make_corpus import make_corpus
from utils.reinforce import main as reinforce

# the bar: a teacher at least this many times the student's image MACs
MIN_MAC_RATIO = 4.0


def build_run(flags, device: torch.device):
    """The distill job, its student and optimizer, and an endless iterator of its loader's batches, as the
    trainer starts them (seeded as it seeds them)."""
    args = parse_args(flags)
    seed_everything(args.seed)
    job = DistillJob(args, DistInfo(device=device))
    model = job.build_model().to(device).train()
    seed_everything(args.seed)
    transform, tokenizer = job.data_transforms(model)
    data = get_data(args, transform, tokenizer, 0, 1)

    def batches():
        for epoch in itertools.count():
            data.set_epoch(epoch)
            yield from data.batches()

    return job, model, build_optimizer(model, args), batches()


def step(job, model, optimizer, batches, device: torch.device) -> None:
    batch = next(batches)
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    with torch.enable_grad():  # time_interleaved times under no_grad
        job.loss(model, batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-model", default="ViT-S-32-alt",
                        help="open_clip config of the teacher (random init)")
    parser.add_argument("--student", default="teacher",
                        help="the distill job's --student (default: the teacher's ViT, shrunk by the next two)")
    parser.add_argument("--student-width", type=int, default=128, help="the distill job's --student-width")
    parser.add_argument("--student-layers", type=int, default=2, help="the distill job's --student-layers")
    parser.add_argument("--image-size", type=int, default=64,
                        help="side of the corpus's images (the views are the teacher's size)")
    parser.add_argument("--train-size", type=int, default=256, help="samples in the corpus")
    parser.add_argument("--views", type=int, default=2, help="views per image the set stores")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each run first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    register_model_configs()

    with tempfile.TemporaryDirectory(prefix="bench_reinforce_") as tmp:
        root = Path(tmp)
        make_corpus(str(root / "corpus"), train_size=args.train_size, eval_size=36, image_size=args.image_size,
                    seed=0, shard_size=max(args.batch_size, args.train_size // 4))
        shards = sorted((root / "corpus" / "shards").glob("*.tar"))
        torch.manual_seed(0)
        teacher = create_clip(args.teacher_model)
        weights = root / "teacher.pt"
        torch.save({"model_spec": open_clip_spec(args.teacher_model), "state_dict": teacher.state_dict()}, weights)
        pattern = "{" + shards[0].stem + ".." + shards[-1].stem + "}.tar"
        reinforce(["--teacher-model", args.teacher_model, "--teacher-pretrained", str(weights), "--train-data",
                   str(root / "corpus" / "shards" / pattern), "--views", str(args.views), "--out",
                   str(root / "set"), "--device", args.device, "--workers", "2", "--log-level", "warning"])

        common = ["--job", "distill", "--train-data", str(root / "set" / pattern), "--student", args.student,
                  *(["--student-width", str(args.student_width), "--student-layers", str(args.student_layers)]
                    if args.student == "teacher" else []),
                  "--batch-size", str(args.batch_size), "--workers", "0", "--distill-loss", "cosine,icl",
                  "--device", args.device]
        teacher_flags = ["--teacher-model", args.teacher_model, "--teacher-pretrained", str(weights)]
        runs = {"stored embeddings": build_run(common, device),
                "online teacher": build_run(common + teacher_flags + ["--ignore-stored-embeddings"], device)}
        latency = time_interleaved({name: (lambda run=run: step(*run, device)) for name, run in runs.items()},
                                   args.repeats, args.warmup, device)

        student = runs["stored embeddings"][1]
        teacher_macs = params_and_macs(teacher)["macs_image"]
        student_macs = params_and_macs(student)["macs_image"]
        samples = args.train_size
        original, reinforced = folder_bytes(root / "corpus" / "shards"), folder_bytes(root / "set")

    student_name = (f"{args.teacher_model}'s ViT at {args.student_layers} layers x {args.student_width}"
                    if args.student == "teacher" else args.student)
    print(f"distill {student_name} from {args.teacher_model}: batch {args.batch_size}, {args.views} stored views, "
          f"{device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved steps, "
          f"load average {os.getloadavg()[0]:.1f}")
    ratio = teacher_macs / student_macs
    print(f"image MACs per sample: teacher {teacher_macs / 1e6:.1f}M, student {student_macs / 1e6:.1f}M "
          f"(teacher/student {ratio:.1f}x{'' if ratio >= MIN_MAC_RATIO else f', under the {MIN_MAC_RATIO:g}x asked'})")
    print(f"{'run':20s} {'wall ms/step':>12s} {'samples/s':>10s} {'CPU ms/step':>12s} {'samples/CPU-s':>14s}")
    for name in runs:
        wall, cpu = latency[name].median_wall_ms, latency[name].median_cpu_ms
        print(f"{name:20s} {wall:12.1f} {args.batch_size / wall * 1000:10.1f} {cpu:12.1f} "
              f"{args.batch_size / cpu * 1000:14.1f}")
    stored, online = latency["stored embeddings"], latency["online teacher"]
    print(f"stored / online samples per second: {online.median_wall_ms / stored.median_wall_ms:.2f}x wall, "
          f"{online.median_cpu_ms / stored.median_cpu_ms:.2f}x CPU time")
    print(f"storage per sample: {original / samples / 1024:.2f} KB in the corpus's shards, "
          f"{reinforced / samples / 1024:.2f} KB reinforced (+{(reinforced - original) / samples / 1024:.2f} KB for "
          f"{args.views} views' embeddings, crop boxes and the caption's embedding, tar headers included)")


if __name__ == "__main__":
    main()
