"""The run's file plumbing: JSON-safe values, the sha256 of a file, atomic file writes."""
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch


def json_safe(obj):
    """obj in plain JSON types, recursively: str keys, lists, Python scalars (ints stay ints),
    nan/inf -> None."""
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    # tolist: Python scalars, nested lists for arrays
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    return obj


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at `path`, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: a reader sees the old file or the new one, never half
    of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:  # disk full, Ctrl-C: the old file stays, no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj, indent: "int | None" = 2) -> None:
    """json.dumps(obj, indent=indent) written with write_bytes_atomic."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode())
