"""Every tensor and field of a checkpoint is checked against what it is used for before torch or numpy sees
it, and every loader reads only regular files (issue 24, the checkpoint side of points 1, 2, 5 and 9).

Each hostile file is made here from a real tiny training checkpoint, written in-process by the trainer's own
writer (training.main.write_run_checkpoint) after one AdamW step. Every probe runs in a child process under a
memory limit and a timeout (conftest.run_bounded: RLIMIT_DATA, since RLIMIT_AS would also count the ~3.6 GB of
libraries torch maps): a crash, a hang or a big allocation fails the test instead of the machine. An outcome is
"ok" (a working model: it embeds an image; for a resume, an optimizer step runs with the loaded state) or a
one-line `CheckpointRefused`; anything else is a failure.
"""
import copy
import json
import os
import random
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_bounded

MODEL = "clipc-vit-t2-32"
# what a probe's child may allocate: torch and the tiny model take ~0.8 GB; the bombs below ask for 15-17 GB
PROBE_DATA_BYTES = 3 << 30
ENTRY_POINTS = ("compress.load", "eval.load_encoder", "resume")


# --- a real checkpoint, and the probes (run in the child) --------------------------------------------------


def trainer_args(logs, *extra):
    from training.params import parse_args

    return parse_args(["--train-data", "synthetic", "--model", MODEL, "--logs-root", str(logs), "--name", "run",
                       "--batch-size", "8", "--workers", "0", "--epochs", "2", "--seed", "0", *extra])


def write_training_checkpoint(logs) -> Path:
    """The trainer's checkpoint of MODEL after one AdamW step (weights, optimizer state, RNG state, fields)."""
    from training.distributed import DistInfo
    from training.jobs import available_jobs
    from training.main import build_optimizer, gather_rng_states, write_run_checkpoint

    args = trainer_args(logs)
    dist = DistInfo()
    job = available_jobs()[args.job](args, dist)
    torch.manual_seed(0)
    model = job.build_model(None)
    optimizer = build_optimizer(model, args)
    sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    ctx = SimpleNamespace(args=args, dist=dist, epoch=1, step=1, step_in_epoch=0, unwrapped_model=model,
                          optimizer=optimizer, scaler=None, samples_seen=8, samples_skipped=0)
    log_dir = Path(logs) / "run"
    write_run_checkpoint(ctx, job.state_dict(), gather_rng_states(), log_dir, "latest")
    return log_dir / "checkpoints" / "epoch_latest.pt"


def resume(path, logs):
    """What `training.main` does with `--resume PATH`, in the same order, then one optimizer step with the loaded
    state (where torch's kernels would read a moment estimate of the wrong size)."""
    from foundation import checkpoint as ckpt_io
    from training import resume as resuming
    from training.distributed import DistInfo
    from training.jobs import available_jobs
    from training.main import build_optimizer

    args, what = trainer_args(logs), f"checkpoint {path}"
    state = ckpt_io.load_checkpoint(path)
    resuming.validate_resume_state(state, what)
    job = available_jobs()[args.job](args, DistInfo())
    resuming.check_resume_weights(state, job, what)
    model = job.build_model(state["model_spec"])
    resuming.load_resumed_weights(model, state, what)
    optimizer = build_optimizer(model, args)
    resuming.check_optimizer_state(optimizer, state.get("optimizer"), what)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("rng"):
        ckpt_io.restore_rng_state(state["rng"][0])
    sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()


def probe(entry, path, logs):
    """'ok' or 'refused: ONE LINE' for `path` through one entry point; any other exception propagates."""
    import compress
    import eval as clip_eval
    from foundation.errors import CheckpointRefused

    images = torch.zeros(1, 3, 32, 32)
    try:
        if entry == "compress.load":
            compress.load(str(path)).encode_image(images)
        elif entry == "eval.load_encoder":
            clip_eval.load_encoder(str(path)).encode_image(images)
        else:
            resume(path, logs)
    except CheckpointRefused as refusal:
        return f"refused: {refusal}"
    return "ok"


def child_main(which, base, out):
    """Make each file of `which` ('crafted' or 'fuzz') from the checkpoint at `base`, in `out`, one at a time
    (each is as large as the checkpoint), and run it through every entry point's `probe`; print one JSON line
    per outcome, an unexpected exception included (as 'error: TYPE: ...'), then the peak resident memory."""
    import resource

    import compress.models  # noqa: F401  (every kind registered before the first probe)

    out = Path(out)
    made = crafted_cases(Path(base), out) if which == "crafted" else fuzz_cases(Path(base), out)
    for name, _, make in made:
        path = make()
        for entry in ENTRY_POINTS:
            try:
                outcome = probe(entry, path, out / "logs")
            except Exception as error:  # noqa: BLE001 (what the test reports as a failure)
                outcome = f"error: {type(error).__name__}: {str(error)[:500]}"
            print(json.dumps({"case": name, "entry": entry, "outcome": outcome}), flush=True)
        path.unlink()
    print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)


CHILD = ("import sys; sys.path.insert(0, 'tests'); import test_checkpoint_checks as t; "
         "t.child_main(*sys.argv[1:])")


def run_probes(which, base, out, timeout):
    """({(case, entry point): outcome}, peak RSS in KiB) of `child_main(which, ...)` run in one bounded child."""
    result = run_bounded(["-c", CHILD, which, base, out], data_bytes=PROBE_DATA_BYTES, timeout=timeout)
    assert result.returncode == 0, f"the probe child died ({result.returncode}):\n{result.stderr[-4000:]}"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    outcomes = {(line["case"], line["entry"]): line["outcome"] for line in lines if "case" in line}
    return outcomes, lines[-1]["max_rss_kb"]


# --- making hostile files ----------------------------------------------------------------------------------


def rezip(source, target, change=lambda name, data: data, compress=lambda name: zipfile.ZIP_STORED, extra=()):
    """`source` (a torch zip) rewritten as `target`: each record's bytes through `change(name, data)` (None
    drops it), written with the zip method `compress(name)` (fastest level), then the (name, bytes) of `extra`."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data, compress_type=compress(info.filename), compresslevel=1)
        for name, data in extra:
            zout.writestr(name, data)
    return target


def save(obj, target):
    """torch.save, with room for the deep nesting of some hostile files (pickle recurses once per container)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        torch.save(obj, target)
    finally:
        sys.setrecursionlimit(limit)


def first_adam_state(state):
    index = min(state["optimizer"]["state"])
    return state["optimizer"]["state"][index], index


def inline_spec(**text_cfg):
    """An open_clip spec carrying its own architecture (`model_cfg`, as a converted Hugging Face model does):
    MODEL's config with `text_cfg` overrides."""
    from foundation.model_configs import inline_config_name

    config = json.loads((REPO / "src" / "foundation" / "configs" / f"{MODEL}.json").read_text())
    config["text_cfg"].update(text_cfg)
    return {"kind": "open_clip", "model": inline_config_name(config), "model_cfg": config}


def nested(depth, leaf):
    for _ in range(depth):
        leaf = {"kind": "masked_clip", "base": leaf, "masks": {}}
    return leaf


def crafted_cases(base: Path, out: Path):
    """[(name, {entry point: expected fragment of its refusal, or 'ok'}, make)] of hostile files made from the
    real checkpoint at `base`: `make()` writes one into `out` and returns its path."""
    real = torch.load(base, weights_only=True)
    weights = real["state_dict"]
    cases = []

    def variant(name, expected, change):
        """A copy of the real checkpoint changed in place by `change`, or replaced by what it returns."""
        def make():
            state = copy.deepcopy(real)
            replacement = change(state)
            save(state if replacement is None else replacement, out / "case.pt")
            return out / "case.pt"
        cases.append((name, expected, make))

    def made(name, expected, make):
        cases.append((name, expected, make))

    def resume_only(fragment):  # compress.load and eval read only the spec and the weights
        return {"compress.load": "ok", "eval.load_encoder": "ok", "resume": fragment}

    def everywhere(fragment):
        return {entry: fragment for entry in ENTRY_POINTS}

    # point 1: fields that reach torch's and numpy's kernels unchecked
    for moment in ("exp_avg", "exp_avg_sq"):
        variant(f"one-element {moment}", resume_only(f".{moment}: torch.float32 [1], the parameter is"),
                lambda s, m=moment: first_adam_state(s)[0].__setitem__(m, torch.zeros(1)))
    variant("step of five elements", resume_only(".step: expected a 0-d float32 tensor"),
            lambda s: first_adam_state(s)[0].__setitem__("step", torch.ones(5)))
    variant("state of a parameter index no group has", resume_only("no parameter of the saved groups"),
            lambda s: s["optimizer"]["state"].__setitem__(10 ** 6, first_adam_state(s)[0]))
    variant("betas as text", resume_only("param_groups.0.betas: expected 2 numbers"),
            lambda s: s["optimizer"]["param_groups"][0].__setitem__("betas", "x"))
    variant("capturable on the CPU", resume_only("param_groups.0.capturable: True, this run's optimizer has False"),
            lambda s: s["optimizer"]["param_groups"][0].__setitem__("capturable", True))
    missing = sorted(weights)[3]
    variant("state_dict missing a key", everywhere(f"state_dict.{missing}: missing"),
            lambda s: s["state_dict"].__delitem__(missing))
    variant("state_dict with another shape", everywhere("shape [3], the model's is"),
            lambda s: s["state_dict"].__setitem__("logit_scale", torch.zeros(3)))
    variant("state_dict with an extra key", everywhere("state_dict.extra.weight: not a tensor of the model"),
            lambda s: s["state_dict"].__setitem__("extra.weight", torch.zeros(2)))
    variant("state_dict with an int weight", everywhere("torch.int64, the model's is torch.float32"),
            lambda s: s["state_dict"].__setitem__("logit_scale", torch.zeros((), dtype=torch.int64)))
    variant("no optimizer", resume_only("optimizer: missing"), lambda s: s.__delitem__("optimizer"))
    variant("epoch as text", resume_only("epoch: expected an integer in [0, 9007199254740992), got 'x'"),
            lambda s: s.__setitem__("epoch", "x"))
    variant("a list at the top", everywhere("holds a list, not a mapping"), lambda s: [s["state_dict"]])
    # the RNG state: numpy.set_state of a stride-0 2**31-element key vector tried to allocate 14.9 GiB
    # (refused by every loader: each reads the whole file, and no file's tensor may be a stride-0 view)
    variant("stride-0 numpy RNG keys", everywhere("rng.0.numpy.keys: a stride-0 view"),
            lambda s: s["rng"][0]["numpy"].__setitem__("keys", torch.zeros((), dtype=torch.int64).expand(2 ** 31)))
    variant("numpy RNG keys of another length", resume_only("rng.0.numpy.keys: expected a torch.int64 tensor of "
                                                            "shape [624]"),
            lambda s: s["rng"][0]["numpy"].__setitem__("keys", torch.zeros(10, dtype=torch.int64)))
    variant("torch RNG state of floats", resume_only("rng.0.torch: expected a torch.uint8 tensor"),
            lambda s: s["rng"][0].__setitem__("torch", torch.zeros(5056)))
    variant("python RNG state too short", resume_only("rng.0.python.state: expected a list of 625 integers"),
            lambda s: s["rng"][0]["python"].__setitem__("state", [0]))

    # point 2: sizes a small file asks for
    variant("spec vocab 2**24", everywhere("vocab_size: 16777216 is outside"),
            lambda s: s.update(model_spec=inline_spec(vocab_size=1 << 24), state_dict={}))
    # within every bound, the embedding alone is 16 GiB: the file must hold it, and does not
    variant("spec of 16 GiB in bounds, empty state_dict", everywhere("missing, the model has it"),
            lambda s: s.update(model_spec=inline_spec(vocab_size=1 << 20, width=1 << 12, heads=32), state_dict={}))
    variant("force_context_length 65536", everywhere("force_context_length: 65536 is outside"),
            lambda s: s["model_spec"].__setitem__("model_kwargs", {"force_context_length": 65536}))
    variant("force_image_size 65536", everywhere("force_image_size"),
            lambda s: s["model_spec"].__setitem__("model_kwargs", {"force_image_size": 65536}))
    variant("preprocess image_size 65536", everywhere("preprocess.image_size"),
            lambda s: s["model_spec"].__setitem__("preprocess", {"image_size": 65536, "mean": [0.5] * 3,
                                                                 "std": [0.5] * 3}))
    variant("resblocks.9999", everywhere("resblocks.9999: key not allowed"),
            lambda s: s.update(model_spec={"kind": "compact_clip", "model": MODEL, "blocks": {
                "transformer.resblocks.9999": {"heads": 1, "head_dim": 8, "mlp_width": 8}}}))
    variant("resblocks past the tower", everywhere("describes no model that can be built"),
            lambda s: s.update(model_spec={"kind": "compact_clip", "model": MODEL, "blocks": {
                "transformer.resblocks.100": {"heads": 1, "head_dim": 8, "mlp_width": 8}}}))
    variant("mask index 999", everywhere("masks.text.999.mlp: key not allowed"),
            lambda s: s.update(model_spec={"kind": "masked_clip", "base": {"kind": "open_clip", "model": MODEL},
                                           "masks": {"text.999.mlp": [1.0]}}))
    variant("base nested 5000 deep", everywhere("nested more than 32 containers deep"),
            lambda s: s.update(model_spec=nested(5000, {"kind": "open_clip", "model": MODEL})))
    variant("base nested 3 deep", everywhere("base specs nested more than 2 deep"),
            lambda s: s.update(model_spec=nested(3, {"kind": "open_clip", "model": MODEL})))
    variant("stride-0 weight", everywhere("a stride-0 view"),
            lambda s: s["state_dict"].__setitem__(
                "positional_embedding", torch.zeros(()).expand(*weights["positional_embedding"].shape)))
    shape = weights["positional_embedding"].shape
    variant("overlapping weight", everywhere("overlap"),
            lambda s: s["state_dict"].__setitem__("positional_embedding", torch.zeros(shape[0] + shape[1]).as_strided(
                shape, (1, 1))))
    square = [name for name, tensor in weights.items() if tensor.shape == (64, 64)]
    variant("weights sharing one storage", everywhere("its tensors share storage"),
            lambda s: s["state_dict"].update({name: s["state_dict"][square[0]] for name in square}))

    # the zip archive itself
    target = out / "case.pt"
    made("deflated records", everywhere("is compressed (zip method 8)"),
         lambda: rezip(base, target, compress=lambda name: zipfile.ZIP_DEFLATED))
    made(".storage_alignment 0", everywhere("'.storage_alignment' is b'0'"),
         lambda: rezip(base, target, lambda name, data: b"0" if name.endswith("/.storage_alignment") else data))
    made("a data record shorter than its storage", everywhere("claims"),
         lambda: rezip(base, target, lambda name, data: data[:8] if name.endswith("/data/0") else data))
    made("a TorchScript record", everywhere("is none that torch.save writes"),
         lambda: rezip(base, target, extra=[(f"{_folder(base)}/constants.pkl", b"x")]))
    made("truncated", everywhere("not a complete torch checkpoint"),
         lambda: _write(target, base.read_bytes()[:-100]))

    # point 5: only regular files
    made("a FIFO", everywhere("is a FIFO, not a regular file"), lambda: (os.mkfifo(target), target)[1])
    made("a link to /dev/zero", everywhere("is a character device, not a regular file"),
         lambda: (target.symlink_to("/dev/zero"), target)[1])
    made("the real checkpoint", {entry: "ok" for entry in ENTRY_POINTS}, lambda: _write(target, base.read_bytes()))
    return cases


def _folder(archive):
    """The folder inside a torch zip that holds its records."""
    with zipfile.ZipFile(archive) as opened:
        return opened.namelist()[0].split("/", 1)[0]


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    return write_training_checkpoint(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def crafted(real_checkpoint, tmp_path_factory):
    """{name: (expected per entry point, outcome per entry point)}, every case probed in one bounded child."""
    out = tmp_path_factory.mktemp("crafted")
    outcomes, _ = run_probes("crafted", real_checkpoint, out, timeout=600)
    return {name: (expected, {entry: outcomes[(name, entry)] for entry in ENTRY_POINTS})
            for name, expected, _ in crafted_cases(real_checkpoint, out)}


CASE_NAMES = [
    "one-element exp_avg", "one-element exp_avg_sq", "step of five elements", "state of a parameter index no group has",
    "betas as text", "capturable on the CPU", "state_dict missing a key", "state_dict with another shape",
    "state_dict with an extra key", "state_dict with an int weight", "no optimizer", "epoch as text",
    "a list at the top", "stride-0 numpy RNG keys", "numpy RNG keys of another length", "torch RNG state of floats",
    "python RNG state too short", "spec vocab 2**24", "spec of 16 GiB in bounds, empty state_dict",
    "force_context_length 65536", "force_image_size 65536", "preprocess image_size 65536", "resblocks.9999",
    "resblocks past the tower", "mask index 999", "base nested 5000 deep", "base nested 3 deep", "stride-0 weight",
    "overlapping weight", "weights sharing one storage", "deflated records", ".storage_alignment 0",
    "a data record shorter than its storage", "a TorchScript record", "truncated", "a FIFO", "a link to /dev/zero",
    "the real checkpoint",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_hostile_checkpoint_is_one_line_naming_the_key_in_every_loader(crafted, name):
    expected, outcomes = crafted[name]
    for entry in ENTRY_POINTS:
        outcome, fragment = outcomes[entry], expected[entry]
        if fragment == "ok":
            assert outcome == "ok", (entry, outcome)
        else:
            assert outcome.startswith("refused: ") and fragment in outcome, (entry, fragment, outcome)
            assert "\n" not in outcome, (entry, outcome)


def test_every_crafted_case_is_asserted(real_checkpoint, tmp_path):
    assert [name for name, _, _ in crafted_cases(real_checkpoint, tmp_path)] == CASE_NAMES


# --- the trainer: one line and exit 2 where torch's kernels crashed ------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_resuming_a_one_element_moment_estimate_is_one_line_and_exit_2(real_checkpoint, tmp_path, impl):
    """`exp_avg` = torch.zeros(1) made the trainer die with SIGSEGV right after "resumed from" (both AdamW
    implementations index the moment estimates by the parameter's size unchecked)."""
    state = torch.load(real_checkpoint, weights_only=True)
    entry, index = first_adam_state(state)
    entry["exp_avg"] = torch.zeros(1)
    hostile = tmp_path / "hostile.pt"
    torch.save(state, hostile)
    result = run_bounded(["-m", "training.main", "--train-data", "synthetic", "--model", MODEL, "--logs-root",
                          tmp_path / "logs", "--name", "resumed", "--batch-size", "8", "--workers", "0", "--epochs",
                          "2", "--optimizer-impl", impl, "--resume", hostile], data_bytes=PROBE_DATA_BYTES,
                         timeout=240)
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: checkpoint {hostile}: optimizer.state.{index}.exp_avg: torch.float32 [1], the "
                      f"parameter is {errors[0].split('the parameter is ')[-1]}"], result.stderr[-3000:]
    assert "resumed from" not in result.stderr


# --- only regular files: --resume latest, the monitor, the tools ---------------------------------------------


def test_resume_latest_passes_over_a_fifo_and_reads_only_small_records(real_checkpoint, tmp_path):
    from foundation import checkpoint as ckpt_io

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    os.mkfifo(folder / "epoch_latest.pt")  # opening it for reading would block until someone writes
    (folder / "epoch_1.pt").write_bytes(real_checkpoint.read_bytes())
    assert ckpt_io.find_resume_checkpoint(folder) == folder / "epoch_1.pt"
    structure = ckpt_io.inspect_checkpoint(folder / "epoch_1.pt")
    assert structure["epoch"] == 1 and structure["state_dict"]["logit_scale"].device.type == "meta"


@pytest.mark.slow
def test_the_monitor_skips_a_fifo_and_a_link_to_dev_zero(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    os.mkfifo(run / "checkpoints" / "epoch_1.pt")
    (run / "checkpoints" / "epoch_2.pt").symlink_to("/dev/zero")
    for name in ("epoch_1.pt", "epoch_2.pt"):  # settled long ago, so scored at once
        os.utime(run / "checkpoints" / name, (1, 1), follow_symlinks=False)
    result = run_bounded(["-m", "utils.evaluate_checkpoints", "--logs-dir", run, "--eval-data-dir",
                          tiny_corpus / "eval", "--workers", "0", "--device", "cpu", "--once"],
                         data_bytes=PROBE_DATA_BYTES, timeout=180)
    # --once with nothing it could score ends with exit 1 and says so, after a warning per file
    assert result.returncode == 1 and "none of the 2 checkpoints to score could be scored" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "skipping epoch_1.pt: unreadable" in output and "is a FIFO, not a regular file" in output, output[-3000:]
    assert "skipping epoch_2.pt: unreadable" in output and "is a character device" in output, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("special", ["fifo", "zero"])
def test_a_tool_refuses_a_special_file_as_pretrained(tmp_path, special):
    source = tmp_path / "weights.pt"
    os.mkfifo(source) if special == "fifo" else source.symlink_to("/dev/zero")
    out = tmp_path / "out"
    result = run_bounded(["-m", "utils.lowrank", "--pretrained", source, "--out", out, "--ratio", "0.5"],
                         data_bytes=PROBE_DATA_BYTES, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "not a regular file" in result.stderr and not out.exists()


# --- point 9: a fuzz test ------------------------------------------------------------------------------------

FUZZ_SEED = 24
FUZZ_MUTATIONS = 150
BIG = 1 << 40  # elements a stride-0 or overlapping view may claim: terabytes, were they ever copied


def _site(state, rng):
    """(container, key) of a value of `state`: a random field, descended into at random, so that every field
    (weights, optimizer state, RNG state, spec, scalars) is reached, not mostly the largest lists."""
    container = state
    while True:
        keys = list(container) if isinstance(container, dict) else range(len(container))
        key = rng.choice(keys)
        value = container[key]
        if not (isinstance(value, (dict, list)) and value and rng.random() < 0.8):
            return container, key
        container = value


def _mutated_tensor(tensor, rng):
    shape = tuple(tensor.shape) or (1,)
    choices = [
        lambda: torch.zeros(1),
        lambda: torch.zeros(()),
        lambda: tensor.reshape(-1),
        lambda: tensor.unsqueeze(0),
        lambda: torch.zeros(*shape[::-1]),
        lambda: tensor.to(rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                                      torch.uint8, torch.bool, torch.complex64])),
        lambda: torch.zeros((), dtype=tensor.dtype).expand(rng.choice([2 ** 31, BIG])),
        lambda: torch.zeros((), dtype=tensor.dtype).expand(*shape),
        lambda: torch.zeros(sum(shape), dtype=tensor.dtype).as_strided(shape, (1,) * len(shape)),
        lambda: torch.zeros(0, dtype=tensor.dtype),
        lambda: tensor.t() if tensor.dim() == 2 else tensor.flip(0),
        lambda: tensor.float() * float("nan"),
    ]
    return rng.choice(choices)()


def _scalar(rng):
    return rng.choice(["x", "", -1, 2 ** 70, 1.5, float("nan"), float("inf"), None, True, [], {}, [1] * 3,
                       {"kind": "x"}, b"\x00" * 8, (1, 2)])


def _hostile_spec(rng):
    from compress.models.spec import MAX_LAYERS, MAX_SIDE, MAX_VOCAB, MAX_WIDTH

    big = rng.choice([MAX_SIDE, MAX_SIDE + 1, MAX_WIDTH, MAX_WIDTH + 1, MAX_VOCAB, 1 << 24, 1 << 31, -1, 0])
    return rng.choice([
        lambda: inline_spec(vocab_size=big),
        lambda: inline_spec(width=big, heads=1),
        lambda: inline_spec(context_length=big),
        lambda: inline_spec(layers=rng.choice([MAX_LAYERS, MAX_LAYERS + 1])),
        lambda: {"kind": "open_clip", "model": MODEL, "model_kwargs": {"force_context_length": big}},
        lambda: {"kind": "open_clip", "model": MODEL, "model_kwargs": {"force_image_size": big}},
        lambda: {"kind": "open_clip", "model": MODEL, "model_kwargs": {"force_image_size": [big, 32]}},
        lambda: {"kind": "compact_clip", "model": MODEL, "blocks": {
            f"transformer.resblocks.{rng.randrange(4)}": {"heads": rng.randrange(3), "head_dim": big,
                                                          "mlp_width": rng.choice([1, big])}}},
        lambda: {"kind": "compact_clip", "model": MODEL, "text_layers": [rng.randrange(200)]},
        lambda: {"kind": "masked_clip", "base": {"kind": "open_clip", "model": MODEL},
                 "masks": {f"text.{rng.randrange(200)}.mlp": [1.0] * rng.choice([1, 256])}},
        lambda: {"kind": "quantized", "base": {"kind": "open_clip", "model": MODEL}, "scheme": "int8_dynamic",
                 "linears": [rng.choice(["visual.proj", "transformer.resblocks.0.mlp.c_fc", "x" * 400])]},
        lambda: nested(rng.choice([3, 40, 2000]), {"kind": "open_clip", "model": MODEL}),
        lambda: {"kind": "student_clip", "embed_dim": big, "image_tower": {
            "type": "torchvision", "name": "resnet18", "image_size": rng.choice([32, big])},
            "text_tower": {"text_cfg": {"width": 64, "heads": 2, "layers": 1, "context_length": 16}}},
        lambda: {"kind": "image_student", "backbone": {"type": "torchvision", "name": "regnet_y_128gf",
                                                       "image_size": 32}, "embed_dim": 64, "text_encoder": None},
    ])()


def _structural_mutation(state, rng):
    """A description of one random edit of `state` (in place, or a replacement returned second)."""
    container, key = _site(state, rng)
    value = container[key]
    where = f"{key!r} ({type(value).__name__})"
    roll = rng.random()
    if roll < 0.08:
        return f"model_spec replaced, near {where}", dict(state, model_spec=_hostile_spec(rng))
    if roll < 0.12:
        return "top level replaced", rng.choice([[state], (state,), 7, "x", {}])
    if roll < 0.20 and isinstance(container, dict):
        del container[key]
        return f"deleted {where}", None
    if roll < 0.26 and isinstance(container, dict):
        container[f"{key}_renamed" if rng.random() < 0.5 else rng.choice([0, -1, "x"])] = container.pop(key)
        return f"renamed {where}", None
    if roll < 0.32:
        deep = value
        for _ in range(rng.choice([2, 40, 1000])):
            deep = [deep]
        container[key] = deep
        return f"nested {where}", None
    if isinstance(value, torch.Tensor):
        container[key] = _mutated_tensor(value, rng)
        return f"tensor {where} -> {container[key].dtype} {list(container[key].shape)} {container[key].stride()}", None
    if isinstance(value, (dict, list)) and value and rng.random() < 0.5:
        inner = rng.choice(list(value) if isinstance(value, dict) else range(len(value)))
        value[inner] = torch.zeros(rng.choice([1, 7]))
        return f"an item of {where} became a tensor", None
    container[key] = _scalar(rng)
    return f"{where} -> {container[key]!r:.40}", None


def _byte_mutation(source: Path, data: bytes, rng, out: Path) -> str:
    """A description of one random edit of the bytes (`data`) of the file `source`, written to `out`."""
    roll = rng.random()
    if roll < 0.2:
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        with zipfile.ZipFile(source) as archive:
            small = [info.filename for info in archive.infolist() if info.file_size < 1 << 20]
        chosen = rng.choice(small)
        rezip(source, out, compress=lambda name: method if name == chosen else zipfile.ZIP_STORED)
        return f"{chosen} compressed (method {method})"
    if roll < 0.4:
        cut = rng.randrange(len(data))
        out.write_bytes(data[:cut])
        return f"truncated at {cut}"
    if roll < 0.6:
        def flip(name, payload):
            if not name.endswith("data.pkl"):
                return payload
            payload = bytearray(payload)
            for _ in range(rng.choice([1, 4, 32])):
                payload[rng.randrange(len(payload))] = rng.randrange(256)
            return bytes(payload)
        rezip(source, out, flip)
        return "data.pkl bytes flipped"
    if roll < 0.7:
        value = rng.choice([b"0", b"3", b"-64", b"x", b"1" * 30])
        rezip(source, out, lambda name, payload: value if name.endswith(".storage_alignment") else payload)
        return f".storage_alignment {value!r}"
    if roll < 0.8:
        cut = rng.randrange(8)
        rezip(source, out, lambda name, payload: payload[:cut] if name.endswith("/data/1") else payload)
        return f"data/1 cut to {cut} bytes"
    if roll < 0.9:
        rezip(source, out, lambda name, payload: None if name.endswith(rng.choice(["/data/2", "/byteorder",
                                                                                    "/data.pkl"])) else payload)
        return "a record dropped"
    mutated = bytearray(data)
    for _ in range(8):
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    out.write_bytes(bytes(mutated))
    return "file bytes flipped"


def fuzz_cases(base: Path, out: Path, seed: int = FUZZ_SEED, count: int = FUZZ_MUTATIONS):
    """`count` mutants of the checkpoint at `base`, a function of `seed` alone, made one at a time into `out`
    (a generator of (description, None, path), like `crafted_cases`' with the file already made)."""
    rng = random.Random(seed)
    real = torch.load(base, weights_only=True)
    data = base.read_bytes()
    path = out / "mutant.pt"
    for i in range(count):
        if rng.random() < 0.3:
            description = _byte_mutation(base, data, rng, path)
        else:
            state = copy.deepcopy(real)
            description, replacement = _structural_mutation(state, rng)
            save(state if replacement is None else replacement, path)
        yield f"{i:03d} {description}", None, lambda: path


@pytest.mark.slow
def test_fuzz_every_mutant_is_refused_in_one_line_or_loads_a_working_model(real_checkpoint, tmp_path):
    """FUZZ_MUTATIONS seeded mutants of a real checkpoint (shapes, dtypes, strides, keys, types, nesting, specs,
    the zip's records and bytes) through compress.load, eval.load_encoder and the trainer's resume, in one child
    under PROBE_DATA_BYTES and a timeout: never another exception, a crash, a hang or a big allocation."""
    outcomes, max_rss_kb = run_probes("fuzz", real_checkpoint, tmp_path, timeout=900)
    assert len(outcomes) == FUZZ_MUTATIONS * len(ENTRY_POINTS)
    failures = {key: outcome for key, outcome in outcomes.items()
                if not (outcome == "ok" or (outcome.startswith("refused: ") and "\n" not in outcome))}
    assert not failures, json.dumps(failures, indent=1)[:6000]
    refused = {entry: sum(outcomes[key] != "ok" for key in outcomes if key[1] == entry) for entry in ENTRY_POINTS}
    # the mutants reach every check: each entry point refuses some and loads others (edits of what it does not
    # read, or harmless ones), and a resume, which reads every field, refuses at least what the loaders do
    assert all(0 < count < FUZZ_MUTATIONS for count in refused.values()), refused
    assert refused["resume"] >= max(refused["compress.load"], refused["eval.load_encoder"]), refused
    assert max_rss_kb * 1024 < PROBE_DATA_BYTES, max_rss_kb
    print(f"fuzz: {FUZZ_MUTATIONS} mutants, refused by {refused}, peak RSS "
          f"{max_rss_kb / 2 ** 20:.2f} GiB", file=sys.stderr)


def test_fuzz_mutants_depend_on_the_seed_alone(real_checkpoint, tmp_path):
    made = {}
    for folder, seed in (("a", FUZZ_SEED), ("b", FUZZ_SEED), ("c", FUZZ_SEED + 1)):
        (tmp_path / folder).mkdir()
        made[folder] = [name for name, _, _ in fuzz_cases(real_checkpoint, tmp_path / folder, seed, count=20)]
    assert made["a"] == made["b"] != made["c"]
    # structural and byte-level edits both, over fields of every kind
    assert any("truncated" in name or "record" in name or "bytes" in name for name in made["a"])
    assert any("tensor" in name for name in made["a"])
