"""files.py: json_safe, sha256_file, write_bytes_atomic / write_json_atomic."""
import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from files import json_safe, sha256_file, write_bytes_atomic, write_json_atomic

NAN, INF = float("nan"), float("inf")


def same(a, b) -> bool:
    """Equal values of equal types, recursively (so 3 != 3.0, True != 1, (1,) != [1])."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_json_safe_scalars():
    cases = [(NAN, None), (INF, None), (-INF, None), (1.5, 1.5), (0.0, 0.0), (3, 3), (True, True),
             (False, False), (None, None), ("nan", "nan"), ("", ""),
             (np.float32(0.1), float(np.float32(0.1))), (np.float32(NAN), None), (np.float64(-INF), None),
             (np.float64(2.5), 2.5), (np.int64(7), 7), (np.bool_(True), True),
             (torch.tensor(0.25), 0.25), (torch.tensor(NAN), None),
             (torch.tensor(INF, dtype=torch.float64), None), (torch.tensor(3), 3),
             (torch.tensor(True), True)]
    for value, expected in cases:
        assert same(json_safe(value), expected), (value, json_safe(value), expected)


def test_json_safe_containers():
    obj = {"a": {"b": NAN, "c": [INF, -INF, 1, (2, 3.5)], "d": None}, 5: "five",
           "t": torch.tensor([1.0, NAN]), "n": np.array([[1, 2]]), "s": "text", "flag": False}
    expected = {"a": {"b": None, "c": [None, None, 1, [2, 3.5]], "d": None}, "5": "five", "t": [1.0, None],
                "n": [[1, 2]], "s": "text", "flag": False}
    out = json_safe(obj)
    assert same(out, expected)
    json.dumps(out, allow_nan=False)  # strict JSON
    assert obj["a"]["b"] != obj["a"]["b"]  # the input is not modified


def test_json_safe_on_what_the_callers_pass():
    """The old cleaners' outputs on their callers' data: experiment's _finite (training-log records and the
    separation block), core_eval's _plain (SAE-Bench metric groups), unlearning's _json (its result)."""
    record = {"step": 3, "loss": 0.5, "ortho": None, "regrouped": True, "dead_latents": 7,
              "separation": {"kappa_forget": NAN, "kappa_retain": INF, "n_forget": 0, "step": 3,
                             "principal_angles_deg": {"n": 0, "min": NAN},
                             "partner_abs_cos_mean": np.float64(0.5)}}
    assert same(json_safe(record), {"step": 3, "loss": 0.5, "ortho": None, "regrouped": True,
                                    "dead_latents": 7,
                                    "separation": {"kappa_forget": None, "kappa_retain": None,
                                                   "n_forget": 0, "step": 3,
                                                   "principal_angles_deg": {"n": 0, "min": None},
                                                   "partner_abs_cos_mean": 0.5}})
    metrics = {"model_behavior_preservation": {"kl_div_score": 0.875, "kl_div_with_sae": NAN},
               "reconstruction_quality": {"mse": torch.tensor(0.125), "cossim": np.float32(0.5)},
               "token_stats": {"total_tokens_eval_reconstruction": 1024}}
    assert same(json_safe(metrics), {"model_behavior_preservation": {"kl_div_score": 0.875,
                                                                     "kl_div_with_sae": None},
                                     "reconstruction_quality": {"mse": 0.125, "cossim": 0.5},
                                     "token_stats": {"total_tokens_eval_reconstruction": 1024}})
    result = {"eval_config": {"multipliers": (25, 50), "answer_orders_used": [[0, 1, 2, 3]]},
              "selected_features": {0.01: [np.int64(3), 4]}, "rates": np.float64(INF),
              "ce": torch.tensor([0.5, INF])}
    assert same(json_safe(result), {"eval_config": {"multipliers": [25, 50],
                                                    "answer_orders_used": [[0, 1, 2, 3]]},
                                    "selected_features": {"0.01": [3, 4]}, "rates": None, "ce": [0.5, None]})


def test_sha256_file(tmp_path):
    data = b"abc" + bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_write_writes_and_replaces(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=2)
    write_json_atomic(path, {"b": 1}, indent=None)
    assert path.read_text() == '{"b": 1}'
    write_bytes_atomic(path, b"raw")
    assert path.read_bytes() == b"raw" and os.listdir(tmp_path) == ["out.json"]


@pytest.mark.parametrize("failure", ["fsync", "write", "rename"])
def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, failure):
    path = tmp_path / "out.json"
    path.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failure == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    elif failure == "rename":
        monkeypatch.setattr(Path, "replace", fail)
    data = object() if failure == "write" else b"new"  # bytes-like expected: the write itself raises
    with pytest.raises((OSError, TypeError)):
        write_bytes_atomic(path, data)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.json"]
