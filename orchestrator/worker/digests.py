"""Exact digests of model tensors, in memory (the worker) and on disk (the check), to compare bit for bit.

A tensor's digest is a hash of its raw bytes in C order (what safetensors stores), kept beside
its dtype and shape. The worker hashes the tensors it saves (:func:`state_digests`); the check
streams the saved files (:func:`file_digests`: safetensors, tensor by tensor, through a small
reusable buffer) or a sharded DCP checkpoint (:func:`dcp_digests`, chunk by chunk) and hashes the
same bytes. Equal digests mean equal tensors, whatever the dtype: nothing is rounded or compared
with a tolerance.

Memory stays bounded whatever the model's size: files are read with ``readinto`` into one buffer
per thread (``CHUNK`` bytes), not mapped, so the pages read never count against the process
(an mmap'd 16 GB file would show 16 GB resident by the end). ``safetensors.safe_open`` still
validates every file's header (offsets inside the file, no gap, no overlap) before it is read.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 16 * 2**20
THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))   # parallel streams help NVMe; on 2 cores one is faster
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors' dtype codes -> torch's dtype names (what the records use).
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
             "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "C64": "complex64"}


class NotComparable(Exception):
    """The digests cannot be taken (a format this module does not read): the check cannot run."""


class Unreadable(Exception):
    """A weights file is broken (bad header, truncated, a tensor stored twice): what loads it fails too."""


def algorithm() -> str:
    """The hash the worker records: xxh3-128 (fast, installed with ``datasets``), else sha256."""
    try:
        import xxhash  # noqa: F401
        return "xxh3_128"
    except ImportError:
        return "sha256"


def new_hash(name: str):
    if name == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    if name == "sha256":
        return hashlib.sha256()
    raise NotComparable(f"unknown digest algorithm {name!r}")


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).rsplit(".", 1)[-1]


# -- in memory (the worker) ---------------------------------------------------------------------------
def tensor_digest(tensor, algo: str) -> str:
    """The digest of ``tensor``'s bytes in C order (copied to the CPU first if it lives elsewhere)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    h = new_hash(algo)
    if t.numel():
        data = t.view(torch.uint8).numpy()
        for start in range(0, data.nbytes, CHUNK):   # hashlib and xxhash release the GIL on big buffers
            h.update(data[start:start + CHUNK])
    return h.hexdigest()


def state_digests(state: dict, algo: str, dtypes: dict[str, str] | None = None, threads: int = THREADS) -> dict:
    """``{key: {"dtype", "shape", "digest"}}`` of every tensor in ``state``.

    ``dtypes``: the dtype a key was saved in, when it differs from the tensor's own (then the tensor
    is cast first, one at a time, and its own dtype is kept as ``"trained_dtype"``). Tensors shared
    under two keys (tied weights) are hashed once.
    """
    import torch

    dtypes = dtypes or {}

    def digest(t, want: str) -> str:    # the cast (if any) happens here, one tensor per thread at a time
        return tensor_digest(t if dtype_name(t.dtype) == want else t.to(getattr(torch, want)), algo)

    seen: dict = {}
    jobs: dict = {}
    with ThreadPoolExecutor(threads) as pool:
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            want = dtypes.get(key, dtype_name(t.dtype))
            entry = {"dtype": want, "shape": list(t.shape)}
            if want != dtype_name(t.dtype):
                entry["trained_dtype"] = dtype_name(t.dtype)
            ident = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype, want)
            if not t.numel() or ident not in seen:
                seen[ident] = pool.submit(digest, t, want)
            jobs[key] = (entry, seen[ident])
        return {key: {**entry, "digest": fut.result()} for key, (entry, fut) in jobs.items()}


# -- safetensors files (the check) --------------------------------------------------------------------
def read_header(path: Path) -> tuple[int, dict]:
    """``(offset of the data, {name: {"dtype", "shape", "data_offsets"}})`` of one safetensors file,
    after ``safe_open`` accepted it (it checks the offsets against the file's size)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:    # only the header is read: no torch needed
            names = set(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors' own error types vary by version
        raise Unreadable(f"{path} is not a readable safetensors file: {exc}") from exc
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if set(header) != names:
        raise Unreadable(f"{path}: the header lists {len(header)} tensors, safetensors reads {len(names)}")
    return 8 + n, header


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files ``from_pretrained`` reads, in its order of preference (``model.safetensors``,
    else the index), and, when sharded, the index's ``{tensor: file}`` map."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE], None
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return [folder / f for f in sorted(set(weight_map.values()))], weight_map
    return sorted(folder.glob("*.safetensors")), None


def _stream(path: Path, start: int, length: int, algo: str, buffer: bytearray) -> str:
    h = new_hash(algo)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left:
            n = f.readinto(view[:min(left, len(buffer))])
            if not n:
                raise Unreadable(f"{path}: ends {left} bytes early")
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def file_digests(paths: list[Path], algo: str, threads: int = THREADS) -> dict:
    """``{name: {"dtype", "shape", "digest", "file"}}`` of every tensor in ``paths``, streamed.

    The tensors are read in file order, cut into ``threads`` contiguous runs read side by side (one
    sequential stream each). Peak memory: ``threads`` buffers of ``CHUNK`` bytes. A broken file (or a
    name found in two files) raises Unreadable.
    """
    tasks, out = [], {}
    for path in paths:
        data_start, header = read_header(path)
        for name, info in header.items():
            if name in out:
                raise Unreadable(f"{name} is stored twice ({out[name]['file']} and {path.name})")
            begin, end = info["data_offsets"]
            out[name] = {"dtype": ST_DTYPES.get(info["dtype"], info["dtype"]), "shape": list(info["shape"]),
                         "file": path.name}
            tasks.append((name, path, data_start + begin, end - begin))
    groups = _contiguous_groups(sorted(tasks, key=lambda t: (str(t[1]), t[2])), threads)

    def run(group):   # one sequential read per group: the disk's readahead works, the threads share the rest
        buffer = bytearray(CHUNK)
        return [(name, _stream(path, start, length, algo, buffer)) for name, path, start, length in group]

    with ThreadPoolExecutor(max(1, len(groups))) as pool:
        for results in pool.map(run, groups):
            for name, digest in results:
                out[name]["digest"] = digest
    return out


def _contiguous_groups(tasks: list, n: int) -> list[list]:
    """``tasks`` (in file order) cut into at most ``n`` runs of about equal bytes."""
    total = sum(t[3] for t in tasks)
    groups: list[list] = [[]]
    done = 0
    for task in tasks:
        if groups[-1] and done >= total * len(groups) / n:
            groups.append([])
        groups[-1].append(task)
        done += task[3]
    return [g for g in groups if g]


# -- sharded DCP checkpoints (the best checkpoint of load_best_model_at_end) --------------------------
def dcp_digests(folder: Path, algo: str, prefix: str = "model.", max_chunk_bytes: int = 512 * 2**20) -> dict:
    """``{key: {"dtype", "shape", "digest"}}`` of the tensors under ``prefix`` in a DCP checkpoint, chunk by chunk.

    FSDP2 shards along dim 0, so a tensor's chunks are row blocks: hashed in row order they give the
    bytes of the whole tensor. Raises NotComparable for another layout, a transformed (compressed)
    item, or a chunk over ``max_chunk_bytes`` (read whole into memory, twice: the bound on the check).
    """
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata()
    out = {}
    for fqn, md in sorted(meta.state_dict_metadata.items()):
        if not fqn.startswith(prefix) or not isinstance(md, TensorStorageMetadata):
            continue
        size = list(md.size)
        chunks = sorted(md.chunks, key=lambda c: tuple(c.offsets))
        rows = 0
        h = new_hash(algo)
        for c in chunks:
            if list(c.offsets)[1:] != [0] * (len(size) - 1) or list(c.sizes)[1:] != size[1:] or \
                    (size and c.offsets[0] != rows):
                raise NotComparable(f"{fqn} in {folder} is not split in row blocks")
            info = meta.storage_data[MetadataIndex(fqn, c.offsets)]
            if getattr(info, "transform_descriptors", None):
                raise NotComparable(f"{fqn} in {folder} is stored transformed ({info.transform_descriptors})")
            if info.length > max_chunk_bytes:
                raise NotComparable(f"{fqn} in {folder}: a chunk of {info.length / 2**20:.0f} MiB is over the "
                                    f"check's {max_chunk_bytes / 2**20:.0f} MiB per read")
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = io.BytesIO(f.read(info.length))
            t = torch.load(blob, map_location="cpu", weights_only=True).contiguous().reshape(-1)
            if t.numel():
                h.update(t.view(torch.uint8).numpy())
            rows += c.sizes[0] if size else 0
        if size and rows != size[0]:
            raise NotComparable(f"{fqn} in {folder}: its chunks cover {rows} of {size[0]} rows")
        out[fqn[len(prefix):]] = {"dtype": dtype_name(md.properties.dtype), "shape": size, "digest": h.hexdigest()}
    if not out:
        raise NotComparable(f"{folder}: no tensor under {prefix!r}")
    return out
