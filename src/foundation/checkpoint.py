"""Crash-safe checkpoints: written to a temp file, fsync'd, then renamed over the target.

A reader (the monitor, a resume) never sees half a file: `os.replace` is atomic on POSIX, and the
fsync before it makes sure the bytes are on disk before the name points at them. Contents are plain
tensors and containers, so every load uses `torch.load(..., weights_only=True)`.

A checkpoint read is untrusted until checked, and checked before torch reads a tensor (`load_checkpoint`):
only a regular file is opened (foundation.files.open_regular: a FIFO or a link to /dev/zero is refused, not
read); it must be a zip archive of stored records, as torch.save writes it (a deflated record could inflate to
any size), with no more records than `MAX_RECORDS`, a `data.pkl` of at most `MAX_PICKLE_BYTES` and records that
add up to no more than the file; its `data.pkl` is unpickled by torch's weights-only unpickler with every
storage on the meta device (nothing allocated), each storage's claimed size equal to its record's; and every
tensor is a plain strided tensor of a numeric dtype that its storage holds, no element twice (no stride 0, no
overlapping strides), in containers nested at most `MAX_NESTING` deep, none containing itself. Only then does
torch.load read the records, each once: the tensors take at most the file's size. A refusal is a
`CheckpointRefused`, one line naming the file and the key.

What a field is used for is checked by its user, against what it is used with: `check_tensors_fit` (a state
dict against a model's), `check_rng_state` (the RNG state against this process's generators), and the
trainer's resume (training.resume: scalar fields, optimizer state against the optimizer's parameters).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from foundation.errors import CheckpointRefused, UserError
from foundation.files import NotRegularFile, open_regular, write_failure

LATEST = "epoch_latest.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# atomic_write's temp files: `.NAME.tmp.PID`
_TEMP_FILE = re.compile(r"^\..+\.tmp\.\d+$")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(binary_file)` into a temp file beside `path`, fsync it, rename it over `path`, fsync the folder:
    readers see the old file or the whole new one. The temp name (`.NAME.tmp.PID`) never looks like a
    checkpoint or a result file to a directory scan."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError("unexpected pos …")
        raise UserError(f"cannot write {path}: {write_failure(e)}; the previous {path.name}, if any, is untouched")
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` as the whole new content of `path`, written crash-safe (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> None:
    # streamed into the temp file rather than serialised to bytes first: a checkpoint can be large
    atomic_write(path, lambda f: torch.save(state, f))


# --- reading a checkpoint: checked before torch reads a tensor ------------------------------------------
# data.pkl holds a checkpoint's structure (each tensor's bytes are a record of their own): tens of kilobytes
# for a CLIP and its AdamW state, a few MB for the largest masked_clip spec (a mask value per unit, 9 bytes
# each: 9.4 MB for ViT-e's 1.2 million units). Unpickling makes objects out of opcodes, up to ~230 bytes of
# them from one opcode byte (an empty set, appended somewhere), so the unpickler is also given at most
# MAX_PICKLE_READS reads (an opcode and its argument are one each; ViT-e's spec takes 2.4 million): the
# structure then takes at most ~0.5 GB, and seconds.
MAX_PICKLE_BYTES = 16 << 20
MAX_PICKLE_READS = 1 << 22
# torch.save's other records besides the tensors' (byteorder, version, .format_version, .storage_alignment,
# .data/*) hold a few bytes each
MAX_TAG_BYTES = 1 << 10
# a record per storage: about three per parameter with AdamW (ViT-e, the largest open_clip ViT, has ~900
# parameters); the zip directory is checked against this before it is parsed
MAX_RECORDS = 1 << 17
# containers within containers: ours nest 7 deep at most (model_spec.base.blocks.NAME.ranks.NAME)
MAX_NESTING = 32
# what our checkpoints hold: float weights and optimizer state, int8 weights, int64 counters, uint8 RNG states
TENSOR_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                           torch.int32, torch.int64, torch.uint8, torch.bool})
_TAG_RECORDS = ("byteorder", "version", ".format_version", ".storage_alignment")
_DATA_RECORD = re.compile(r"data/\d{1,12}")
# torch computes storage offsets modulo .storage_alignment (64 as torch.save writes it; 0 is a SIGFPE)
_MAX_ALIGNMENT = 1 << 20


def _refuse(what: str, reason: str) -> CheckpointRefused:
    return CheckpointRefused(f"{what}: {reason}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """The checkpoint at `path` (a mapping), read only after the checks of the module docstring pass;
    CheckpointRefused (one line) for a file that is missing, not regular, or fails them."""
    what = f"checkpoint {path}"
    with _open_checkpoint(path, what) as f:
        _inspect(f, what)
        return _read(f, what, map_location)


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (io.BytesIO copies anything but bytes)."""

    def __init__(self, buffer):
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        count = max(0, min(len(target), len(self._view) - self._pos))
        target[:count] = self._view[self._pos:self._pos + count]
        self._pos += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def load_checkpoint_buffer(buffer, what: str) -> Dict[str, Any]:
    """`load_checkpoint` of a checkpoint file's bytes held in memory (a bytes-like buffer), `what` naming it."""
    what = f"checkpoint {what}"
    reader = _BufferReader(buffer)
    _inspect(reader, what)
    return _read(reader, what, "cpu")


def inspect_checkpoint(path: str | Path) -> Dict[str, Any]:
    """The structure of the checkpoint at `path` after `load_checkpoint`'s checks, every tensor on the meta
    device: its fields, shapes and dtypes, from its small records only (no tensor's bytes are read)."""
    what = f"checkpoint {path}"
    with _open_checkpoint(path, what) as f:
        return _inspect(f, what)


def _open_checkpoint(path: str | Path, what: str) -> BinaryIO:
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise CheckpointRefused(f"{what} does not exist") from None
    except NotRegularFile as e:  # a FIFO, a device, a folder: refused before a byte is read
        raise CheckpointRefused(f"checkpoint {e}") from None
    except (OSError, ValueError) as e:  # no permission, a NUL byte in the path
        raise _refuse(what, f"cannot be opened ({getattr(e, 'strerror', None) or e})") from None


def _inspect(f: BinaryIO, what: str) -> Dict[str, Any]:
    size = f.seek(0, io.SEEK_END)
    try:
        end = zipfile._EndRecData(f)  # the end-of-directory record: its entry count, before the directory is parsed
        if end is None:
            raise zipfile.BadZipFile("no end of a zip directory")
        if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_RECORDS:
            raise _refuse(what, f"{end[zipfile._ECD_ENTRIES_TOTAL]:,} records, more than {MAX_RECORDS:,}")
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise _refuse(what, f"not a complete torch checkpoint (truncated, or another format: torch.save writes a zip "
                            f"archive; {_first_line(e)})") from None
    with archive:
        prefix, records = _records(archive, size, what)
        _check_tags(archive, prefix, records, what)
        state = _scan(archive, prefix, records, what)
    if not isinstance(state, dict):
        raise _refuse(what, f"holds a {type(state).__name__}, not a mapping of fields")
    return state


def _records(archive: zipfile.ZipFile, size: int, what: str) -> Tuple[str, Dict[str, int]]:
    """(the archive's folder `NAME/`, {record name inside it: size}), every record stored as torch.save stores
    it and the records together no larger than the file."""
    infos = archive.infolist()
    if not infos:
        raise _refuse(what, "an empty zip archive")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    records: Dict[str, int] = {}
    for info in infos:
        if not info.filename.startswith(prefix):
            raise _refuse(what, f"record {info.filename[:100]!r} is outside the archive's folder {prefix!r}")
        name = info.filename[len(prefix):]
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse(what, f"record {name[:100]!r} is compressed (zip method {info.compress_type}): torch.save "
                                "stores records as they are, and a compressed one can inflate to any size")
        if info.flag_bits & 0x1:
            raise _refuse(what, f"record {name[:100]!r} is encrypted")
        if info.compress_size != info.file_size:
            raise _refuse(what, f"record {name[:100]!r} claims {info.file_size:,} bytes but stores "
                                f"{info.compress_size:,}")
        if name in records:
            raise _refuse(what, f"record {name[:100]!r} is there twice")
        if name == "data.pkl":
            limit = MAX_PICKLE_BYTES
        elif name in _TAG_RECORDS or name.startswith(".data/"):
            limit = MAX_TAG_BYTES
        elif _DATA_RECORD.fullmatch(name):
            limit = size
        else:
            raise _refuse(what, f"record {name[:100]!r} is none that torch.save writes")
        if info.file_size > limit:
            raise _refuse(what, f"record {name[:100]!r} holds {info.file_size:,} bytes, more than {limit:,}")
        records[name] = info.file_size
    if "data.pkl" not in records:
        raise _refuse(what, "no data.pkl record: not a torch checkpoint")
    total = sum(records.values())
    if total > size:  # records that overlap: the same bytes read many times over
        raise _refuse(what, f"its records add up to {total:,} bytes, more than the file's {size:,}")
    return prefix, records


def _check_tags(archive: zipfile.ZipFile, prefix: str, records: Dict[str, int], what: str) -> None:
    """The small records torch's reader interprets itself hold what torch.save writes in them."""
    def tag(name: str) -> Optional[bytes]:
        return archive.read(prefix + name) if name in records else None

    if tag("byteorder") not in (None, b"little", b"big"):
        raise _refuse(what, "record 'byteorder' is neither little nor big")
    alignment = tag(".storage_alignment")
    if alignment is not None and not (alignment.isdigit() and 0 < int(alignment) <= _MAX_ALIGNMENT
                                      and int(alignment) & (int(alignment) - 1) == 0):
        raise _refuse(what, f"record '.storage_alignment' is {alignment[:20]!r}, not a power of two up to "
                            f"{_MAX_ALIGNMENT}")
    for name in ("version", ".format_version"):
        value = tag(name)
        if value is not None and not value.strip().isdigit():
            raise _refuse(what, f"record {name!r} is {value[:20]!r}, not a number")


def _scan(archive: zipfile.ZipFile, prefix: str, records: Dict[str, int], what: str) -> Any:
    """data.pkl unpickled as torch.load(weights_only=True) does, with every storage on the meta device after
    its claimed size is checked against its record; then every value `_check_tree`d."""
    from torch import _weights_only_unpickler  # the unpickler torch.load(weights_only=True) runs

    def storage(saved_id: Any) -> torch.storage.TypedStorage:
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5):
            raise _refuse(what, f"a storage reference {str(saved_id)[:80]} is not one torch.save writes")
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise _refuse(what, f"a storage reference {str(saved_id)[:80]} is not one torch.save writes")
        nbytes = numel * dtype.itemsize
        stored = records.get(f"data/{key}")
        if stored != nbytes:
            held = "there is no such record" if stored is None else f"its record holds {stored:,}"
            raise _refuse(what, f"storage {key[:20]} claims {nbytes:,} bytes, {held}")
        return torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(nbytes, device="meta"), dtype=dtype,
                                          _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(_CountedReads(archive.read(prefix + "data.pkl"), what),
                                                  encoding="utf-8")
    unpickler.persistent_load = storage
    try:
        tree = unpickler.load()
    except CheckpointRefused:
        raise
    except Exception as e:  # an unsafe global, a malformed pickle, a rebuild that does not fit its storage
        raise _refuse(what, f"cannot be read ({_first_line(e)})") from None
    _check_tree(tree, what)
    return tree


class _CountedReads:
    """data.pkl as a file for the unpickler, which refuses a read past MAX_PICKLE_READS of them."""

    def __init__(self, data: bytes, what: str):
        self._file, self._left, self._what = io.BytesIO(data), MAX_PICKLE_READS, what

    def _spend(self) -> None:
        self._left -= 1
        if self._left < 0:
            raise _refuse(self._what, f"data.pkl takes more than {MAX_PICKLE_READS:,} reads to unpickle (no "
                                      "checkpoint's structure is that large)")

    def read(self, size: int = -1) -> bytes:
        self._spend()
        return self._file.read(size)

    def readline(self) -> bytes:
        self._spend()
        return self._file.readline()


def _path(path: str, key: Any) -> str:
    key = str(key)[:80]
    return f"{path}.{key}" if path else key


def _shown(path: str) -> str:
    """A key path as a message shows it: whole up to 200 characters, else its two ends."""
    return path if len(path) <= 200 else f"{path[:100]}...{path[-90:]}"


def _check_tree(tree: Any, what: str) -> None:
    """Every value of `tree` a plain one (containers, numbers, text, tensors passing `check_tensor`); no
    container nested deeper than MAX_NESTING or inside itself. Each object is visited once, however many
    times the pickle refers to it."""
    done, open_containers = set(), set()
    todo: List[Tuple[Any, str, int, bool]] = [(tree, "", 0, False)]
    while todo:
        value, path, depth, leaving = todo.pop()
        if leaving:
            open_containers.discard(id(value))
            done.add(id(value))
        elif isinstance(value, torch.Tensor):
            if id(value) not in done:
                check_tensor(value, f"{what}: {_shown(path) or 'the top level'}")
                done.add(id(value))
        elif isinstance(value, (dict, list, tuple)):
            if id(value) in open_containers:
                raise _refuse(what, f"{_shown(path) or 'the top level'} contains itself")
            if id(value) in done:
                continue
            if depth >= MAX_NESTING:
                raise _refuse(what, f"{_shown(path)} is nested more than {MAX_NESTING} containers deep")
            open_containers.add(id(value))
            todo.append((value, path, depth, True))
            if isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(key, bool) or not isinstance(key, (str, int)):
                        raise _refuse(what, f"{_shown(path) or 'the top level'} has a key of type "
                                            f"{type(key).__name__}")
                    todo.append((item, _path(path, key), depth + 1, False))
            else:
                todo.extend((item, _path(path, i), depth + 1, False) for i, item in enumerate(value))
        elif not (value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device))):
            raise _refuse(what, f"{_shown(path) or 'the top level'} is a {type(value).__name__}, which no "
                                "checkpoint holds")


def check_tensor(tensor: torch.Tensor, where: str) -> None:
    """`tensor` is what torch.save writes of a parameter, buffer or optimizer state: a plain strided tensor of
    a `TENSOR_DTYPES` dtype, inside its storage, no element reached twice (no stride 0 over a dimension of
    more than one element, no strides that overlap). CheckpointRefused naming `where` otherwise: a stride-0
    view of one stored value can claim any number of elements, which the first copy of it allocates."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise CheckpointRefused(f"{where}: a {tensor.layout} tensor{' (quantized)' if tensor.is_quantized else ''}; "
                                "only plain strided tensors are read")
    if tensor.dtype not in TENSOR_DTYPES:
        raise CheckpointRefused(f"{where}: a {tensor.dtype} tensor, a dtype no checkpoint of ours holds")
    if tensor.numel() == 0:
        return
    extent, last = 1, 0
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride == 0:
            raise CheckpointRefused(f"{where}: a stride-0 view (shape {list(tensor.shape)} over one stored value "
                                    "repeated)")
        if stride < extent:
            raise CheckpointRefused(f"{where}: strides {list(tensor.stride())} for shape {list(tensor.shape)} "
                                    "overlap (elements stored once and read many times)")
        extent = stride * size
        last += (size - 1) * stride
    needed = (tensor.storage_offset() + last + 1) * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise CheckpointRefused(f"{where}: reaches byte {needed:,} of its storage, which holds {held:,}")


def _read(f: BinaryIO, what: str, map_location) -> Dict[str, Any]:
    f.seek(0)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # the records disagree with what the checks read (torch checks each record's size)
        raise _refuse(what, f"cannot be read ({_first_line(e)})") from None


def check_tensors_fit(found: Any, expected: Mapping[str, torch.Tensor], where: str) -> None:
    """`found` (a checkpoint's state dict) fits `expected` (a built model's `state_dict(keep_vars=True)`, on any
    device, `meta` included): the same names, each tensor of the same shape and of the same dtype (a floating
    one may be of another floating dtype: half-precision weights load into a float32 model), each passing
    `check_tensor`; and the tensors hold, in distinct storages, the bytes the model's distinct tensors need (no
    storage read in place of many). CheckpointRefused naming the first entry that does not (`where.NAME`)."""
    if not isinstance(found, Mapping):
        raise CheckpointRefused(f"{where}: a {type(found).__name__}, not a mapping of tensors")
    for name, tensor in found.items():
        if not isinstance(name, str):
            raise CheckpointRefused(f"{where}: key {str(name)[:80]!r} is not a text")
        entry = f"{where}.{name[:200]}"
        if name not in expected:
            raise CheckpointRefused(f"{entry}: not a tensor of the model")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointRefused(f"{entry}: a {type(tensor).__name__}, not a tensor")
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointRefused(f"{entry}: shape {list(tensor.shape)}, the model's is {list(want.shape)}")
        check_tensor(tensor, entry)
        if tensor.dtype != want.dtype and not (tensor.is_floating_point() and want.is_floating_point()):
            raise CheckpointRefused(f"{entry}: {tensor.dtype}, the model's is {want.dtype}")
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointRefused(f"{where}.{missing[0]}: missing, the model has it{more}")
    storages = {}
    for tensor in found.values():
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    held = sum(storages.values())
    needed = sum(found[name].numel() * found[name].element_size()
                 for name in {id(tensor): name for name, tensor in expected.items()}.values())
    if needed > held:
        raise CheckpointRefused(f"{where}: its tensors share storage: they hold {held:,} bytes, the model's "
                                f"tensors need {needed:,}")


def epoch_checkpoints(checkpoint_dir: str | Path) -> Dict[int, Path]:
    """`epoch_N.pt` files of a run, by N."""
    found = {}
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.iterdir():
            m = _EPOCH_FILE.match(p.name)
            if m:
                found[int(m.group(1))] = p
    return found


def checkpoint_progress(path: str | Path) -> Optional[Tuple[int, int]]:
    """(epoch, step) stored in a checkpoint, from its small records only (`inspect_checkpoint`: no tensor's
    bytes are read, however large the file), or None, with a warning, for a file refused or without them."""
    try:
        state = inspect_checkpoint(path)
    except CheckpointRefused as refusal:
        logging.warning("passing over %s", refusal)
        return None
    epoch, step = state.get("epoch", 0), state.get("step", 0)
    if not all(type(value) is int and value >= 0 for value in (epoch, step)):
        logging.warning("passing over checkpoint %s: its epoch and step are not counts (%.40r, %.40r)", path,
                        epoch, step)
        return None
    return epoch, step


def resume_candidates(checkpoint_dir: str | Path) -> Iterator[Tuple[Path, Tuple[int, int]]]:
    """(path, (epoch, step)) of the run's readable checkpoints, most advanced first (a generator).

    Ordered by (epoch, step) as stored inside: the epoch says how much of the run is done, and the global
    step orders checkpoints within an epoch (a mid-epoch epoch_latest.pt after epoch_N.pt). So a stale
    epoch_latest.pt from before the last epoch checkpoint does not win, even when its step is higher: one
    left by a run that had more steps per epoch (another batch size or data), from which the run was
    restarted at an earlier epoch_N.pt.

    Only small records are read (`checkpoint_progress`), and only where the order needs them: epoch_N.pt
    holds N completed epochs, so a file named below epoch_latest.pt's epoch ranks below it by its name, and
    its record is read only when the caller asks for the next candidate (the first ones did not load)."""
    checkpoint_dir = Path(checkpoint_dir)
    ranked: List[Tuple[Path, Tuple[int, int]]] = []
    latest = checkpoint_dir / LATEST
    latest_progress = checkpoint_progress(latest) if latest.exists() else None
    if latest_progress is not None:
        ranked.append((latest, latest_progress))
    below: List[Tuple[int, Path]] = []
    for epoch, path in epoch_checkpoints(checkpoint_dir).items():
        if latest_progress is not None and epoch < latest_progress[0]:
            below.append((epoch, path))
            continue
        progress = checkpoint_progress(path)
        if progress is not None:
            ranked.append((path, progress))
    yield from sorted(ranked, key=lambda item: item[1], reverse=True)
    for _, path in sorted(below, key=lambda item: item[0], reverse=True):
        progress = checkpoint_progress(path)
        if progress is not None:
            yield path, progress


def find_resume_checkpoint(checkpoint_dir: str | Path) -> Optional[Path]:
    """The most advanced readable checkpoint of a run (`resume_candidates`' first), or None."""
    return next((path for path, _ in resume_candidates(checkpoint_dir)), None)


def checkpoint_fingerprint(path: str | Path) -> str:
    """A hash of a checkpoint's contents from its zip directory alone: every record's name (without the
    archive's folder, which follows the file name it was saved under), size and CRC-32, which torch.save
    computes as it writes. Two files with the same fingerprint hold the same bytes in every record; reading
    it costs the zip's central directory, not the file."""
    digest = hashlib.sha256()
    with open_regular(path) as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            record = info.filename.split("/", 1)[-1]
            digest.update(f"{record}\0{info.file_size}\0{info.CRC}\n".encode("utf-8"))
    return digest.hexdigest()


def remove_stale_temp_files(folder: str | Path) -> List[Tuple[Path, int]]:
    """Delete `atomic_write`'s temp files (`.NAME.tmp.PID`) in `folder`: what a process killed mid-write left
    (each up to a whole checkpoint). Only for a folder no other process writes to at the same time (the
    trainer holds its run's lock). Returns (path, size) of each file removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _TEMP_FILE.match(path.name) and path.is_file():
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append((path, size))
    return removed


# --- random number generator state -----------------------------------------------------------------
# numpy's state holds an ndarray and python's a tuple of ints: both are turned into tensors/lists so
# the checkpoint stays loadable under weights_only=True.


def capture_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
         np_state["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_rng_state(state: Any, where: str) -> None:
    """`state` (what `capture_rng_state` wrote) is what `restore_rng_state` can hand this process's generators:
    torch's state a uint8 vector of the size torch's own has; numpy's MT19937 key words (as many as numpy's
    own, each below 2**32), a position within them and a cached Gaussian; python's state of the version and
    length `random.getstate()` has, words below 2**32 and an index within them; CUDA's, one uint8 vector per
    device this process sees at most. CheckpointRefused naming the key otherwise."""
    def refuse(key: str, reason: str) -> CheckpointRefused:
        return CheckpointRefused(f"{where}.{key}: {reason}")

    def tensor_like(key: str, value: Any, like: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or value.dtype != like.dtype or value.shape != like.shape:
            got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise refuse(key, f"expected a {like.dtype} tensor of shape {list(like.shape)}, got {got}")
        check_tensor(value, f"{where}.{key}")

    def fields(key: str, value: Any, required: Tuple[str, ...], optional: Tuple[str, ...] = ()) -> None:
        if not isinstance(value, dict):
            raise refuse(key, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - set(required) - set(optional), key=str)
        missing = [name for name in required if name not in value]
        if unknown or missing:
            raise refuse(key, f"unknown field {str(unknown[0])[:40]!r}" if unknown else f"{missing[0]!r} missing")

    def count(key: str, value: Any, lo: int, hi: int) -> None:
        if type(value) is not int or not lo <= value <= hi:
            raise refuse(key, f"expected an integer in [{lo}, {hi}], got {repr(value)[:40]}")

    def real(key: str, value: Any, none: bool = False) -> None:
        if not ((none and value is None) or (type(value) in (int, float) and math.isfinite(value))):
            raise refuse(key, f"expected a finite number{' or None' if none else ''}, got {repr(value)[:40]}")

    if not isinstance(state, dict):
        raise CheckpointRefused(f"{where}: expected a mapping, got {type(state).__name__}")
    fields("", state, ("torch", "numpy", "python"), ("cuda",))
    tensor_like("torch", state["torch"], torch.get_rng_state())

    np_live = np.random.get_state()
    fields("numpy", state["numpy"], ("keys", "pos", "has_gauss", "cached_gaussian"))
    np_state = state["numpy"]
    tensor_like("numpy.keys", np_state["keys"], torch.zeros(np_live[1].shape, dtype=torch.int64))
    if bool(((np_state["keys"] < 0) | (np_state["keys"] >= 1 << 32)).any()):
        raise refuse("numpy.keys", "a key word outside [0, 2**32)")
    count("numpy.pos", np_state["pos"], 0, len(np_live[1]))
    count("numpy.has_gauss", np_state["has_gauss"], 0, 1)
    real("numpy.cached_gaussian", np_state["cached_gaussian"])

    py_version, py_words, _ = random.getstate()
    fields("python", state["python"], ("version", "state", "gauss"))
    py_state = state["python"]
    if py_state["version"] != py_version or type(py_state["version"]) is not int:
        raise refuse("python.version", f"{repr(py_state['version'])[:40]}, this python's is {py_version}")
    words = py_state["state"]
    if not isinstance(words, (list, tuple)) or len(words) != len(py_words):
        raise refuse("python.state", f"expected a list of {len(py_words)} integers")
    for i, word in enumerate(words[:-1]):
        count(f"python.state.{i}", word, 0, (1 << 32) - 1)
    count(f"python.state.{len(words) - 1}", words[-1], 0, len(words) - 1)  # the position in the words
    real("python.gauss", py_state["gauss"], none=True)

    cuda = state.get("cuda")
    if cuda is not None:
        if not isinstance(cuda, (list, tuple)):
            raise refuse("cuda", f"expected a list of per-device states, got {type(cuda).__name__}")
        if torch.cuda.is_available():  # restored only here: each must be what this build's generators hold
            if len(cuda) > torch.cuda.device_count():
                raise refuse("cuda", f"{len(cuda)} device states, this process sees {torch.cuda.device_count()} "
                                     "device(s)")
            for i, device_state in enumerate(cuda):
                tensor_like(f"cuda.{i}", device_state, torch.cuda.get_rng_state(i))
