"""Residual-stream activations, harvested once and cached on disk.

A cache entry is a folder named by the hash of everything that determines its contents (model, layer, data
versions, context length, token budget, data seed). It holds, per split,
  {split}_acts.npy    [n_tokens, d_model]          activations at the hook, BOS positions dropped, in the
                                                   model's dtype: float32, or bfloat16 stored as its bits
                                                   (uint16; numpy has no bfloat16), half the bytes
  {split}_labels.npy  uint8   [n_tokens]           1 = forget-domain token, 0 = retain-domain token
and manifest.json, written last, with the key, shapes and sha256 of every file. No manifest, no entry: a
harvest that died halfway is redone. Arrays are read memory-mapped, so the cache never has to fit in memory.
"""
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import distributed
from files import sha256_file

FORMAT_VERSION = 1
FORGET, RETAIN = 1, 0
STORAGE = {torch.float32: (np.float32, torch.float32), torch.bfloat16: (np.uint16, torch.int16)}


def as_float32(rows: np.ndarray) -> np.ndarray:
    """Stored activations -> float32 (exact: a bfloat16 is the top half of a float32's bits)."""
    if rows.dtype == np.uint16:
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows


def cache_key(fields: dict) -> str:
    blob = json.dumps(fields | {"format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def reserve(path: Path) -> None:
    """Allocate the whole (sparse, memory-mapped) file on disk now: a full disk is then an OSError
    (ENOSPC) here, not a SIGBUS when a page is first written. Where the OS has no posix_fallocate
    (macOS) the file stays sparse."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


@torch.inference_mode()
def harvest_split(model, hook_name: str, layer: int, tokens: torch.Tensor, labels: torch.Tensor,
                  batch_size: int, acts_path: Path, desc: str) -> None:
    """Run `model` up to `layer` on token contexts [n, T]; write the hook's activations for positions 1..T-1
    (BOS dropped) to `acts_path` as [n*(T-1), d] in the model's dtype (STORAGE), and each token's context
    label alongside.

    Under torchrun each rank runs its share of the batches (the same batches a single process runs, so the
    same bytes) into the one file rank 0 created."""
    n, T = tokens.shape
    shape = (n * (T - 1), model.cfg.d_model)
    stored, bits = STORAGE[model.cfg.dtype]
    if distributed.is_main():
        np.lib.format.open_memmap(acts_path, mode="w+", dtype=stored, shape=shape).flush()
        reserve(acts_path)
    distributed.barrier()
    acts = np.load(acts_path, mmap_mode="r+")
    starts = range(0, n, batch_size)
    for start in tqdm(starts[distributed.shard(len(starts))], desc=desc, unit="batch",
                      disable=not distributed.is_main()):
        batch = tokens[start:start + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=hook_name, stop_at_layer=layer + 1)
        resid = cache[hook_name][:, 1:, :].reshape(-1, model.cfg.d_model)
        if not torch.isfinite(resid).all():
            raise ValueError(f"{desc}: non-finite activations at {hook_name} (layer {layer}) in batch "
                             f"{start // batch_size} (contexts {start}-{start + len(batch) - 1}); the model "
                             f"overflows there: try --llm_dtype=float32 or check the model's weights")
        acts[start * (T - 1):start * (T - 1) + len(resid)] = resid.cpu().view(bits).numpy().view(stored)
    acts.flush()
    del acts
    distributed.barrier()
    if distributed.is_main():
        np.save(acts_path.with_name(acts_path.name.replace("_acts", "_labels")),
                labels.to(torch.uint8).repeat_interleave(T - 1).numpy())


def build_cache(entry: Path, key_fields: dict, model, hook_name: str, layer: int, splits: dict,
                batch_size: int) -> None:
    """Harvest every split {name: (tokens [n, T], context labels [n])} into a fresh cache entry.

    Work happens in a temporary sibling folder that is renamed into place once the manifest is written, so a
    reader never sees a half-written entry and two runs with the same key never write into the same folder.
    Under torchrun the ranks share the harvest (harvest_split); rank 0 writes the manifest and renames.
    """
    tmp = entry.with_name(f"{entry.name}.tmp-{distributed.broadcast_object(os.getpid())}")
    if distributed.is_main():
        remove_orphans(entry)
        tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    try:
        for split, (tokens, labels) in splits.items():
            harvest_split(model, hook_name, layer, tokens, labels, batch_size, tmp / f"{split}_acts.npy",
                          f"harvest {split}")
            for suffix in ("acts", "labels") if distributed.is_main() else ():
                path = tmp / f"{split}_{suffix}.npy"
                files[path.name] = {"sha256": sha256_file(path),
                                    "shape": list(np.load(path, mmap_mode="r").shape)}
        if distributed.is_main():
            (tmp / "manifest.json").write_text(json.dumps({"key": key_fields, "files": files}, indent=1,
                                                          default=str))
    except BaseException as e:  # disk full, Ctrl-C, a failing model: leave no partial files behind
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"disk full while writing the activation cache under {entry.parent} "
                                   f"(partial files removed; the entry needs about "
                                   f"{_entry_bytes(splits, model.cfg) / 1e9:.1f} GB): "
                                   f"free space or point --cache_dir elsewhere") from None
        raise
    if distributed.is_main():
        if entry.exists():  # another run with the same key finished first: its entry is as good as ours
            shutil.rmtree(tmp)
        else:
            tmp.rename(entry)
    distributed.barrier()  # no rank reads the entry before it is in place


def remove_orphans(entry: Path) -> None:
    """Remove the temporary folders `<entry>.tmp-<pid>` whose process is gone: a harvest killed outright
    (SIGKILL, power loss) never reaches build_cache's cleanup, and its partial files would stay for good.
    A folder whose pid is alive (another run harvesting the same key) is left alone."""
    for tmp in entry.parent.glob(f"{entry.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _entry_bytes(splits: dict, model_cfg) -> int:
    """Size of a cache entry: activations in the model's dtype and uint8 labels for every non-BOS token."""
    n_tokens = sum(tokens.shape[0] * (tokens.shape[1] - 1) for tokens, _ in splits.values())
    return n_tokens * (model_cfg.dtype.itemsize * model_cfg.d_model + 1)


def load_split(entry: Path, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(acts [n, d] memory-mapped, labels [n]) of one split; checksums are verified against the manifest."""
    manifest = json.loads((entry / "manifest.json").read_text())
    arrays = []
    for suffix in ("acts", "labels"):
        path = entry / f"{split}_{suffix}.npy"
        if verify and sha256_file(path) != manifest["files"][path.name]["sha256"]:
            raise RuntimeError(f"cache file {path} does not match its manifest checksum: "
                               f"delete {entry} to rebuild")
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    return arrays[0], np.asarray(arrays[1])


def typical_rows(acts: np.ndarray, max_norm_multiple: float,
                 chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(indices of rows with ‖x‖ <= max_norm_multiple · median ‖x‖, all row norms [n]);
    0 keeps every row.

    Some models put norms ~100x the median on a few tokens (attention sinks, e.g. SmolLM2 on the token
    after BOS); left in, they dominate the squared-error loss and the input scale. dictionary_learning
    filters the same way.
    """
    norms = np.concatenate([np.linalg.norm(as_float32(acts[i:i + chunk]), axis=1)
                            for i in range(0, len(acts), chunk)])
    if max_norm_multiple <= 0:
        return np.arange(len(acts)), norms
    return np.flatnonzero(norms <= max_norm_multiple * np.median(norms)), norms


def shuffled_batches(acts: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
                     rows: np.ndarray = None, skip: int = 0, part: slice = slice(None)):
    """Endless stream of (x [B, d] float32, whatever the stored dtype; labels [B] uint8) over `rows`
    (default all): a fresh random permutation every epoch. `skip` batches are passed over without reading them (a resumed run continues the
    same stream). `part` slices each batch: a data-parallel rank reads its share of the global batch only.

    Rows are gathered in sorted order from the memory map (sequential-ish reads); the batch is the same set of
    rows a fully shuffled in-memory array would give.
    """
    rng = np.random.default_rng(seed)
    rows = np.arange(len(acts)) if rows is None else rows
    n = len(rows)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {n:,} training activations: "
                         f"lower --batch_size")
    for _ in range(skip // per_epoch):
        rng.permutation(n)  # advance the generator past the skipped epochs
    first = skip % per_epoch
    while True:
        order = rows[rng.permutation(n)]
        for start in range(first * batch_size, n - batch_size + 1, batch_size):
            idx = np.sort(order[start:start + batch_size])[part]
            yield (torch.from_numpy(np.ascontiguousarray(as_float32(acts[idx]))),
                   torch.from_numpy(labels[idx]))
        first = 0
