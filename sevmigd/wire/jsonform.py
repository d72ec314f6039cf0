"""JSON form of protocol messages ("meaning" in the golden vectors of protocol/vectors/, and for tools).

Owns: `to_json(msg) -> dict` and `from_json(dict) -> msg`, a lossless mapping: bytes as {"hex": "..."},
pfn columns as lists of ints, AbortCode as its integer, tuples as lists.
Must never: do file I/O (the vector generator and tests read/write files).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import messages as m
from .errors import AbortCode


def _enc(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"hex": bytes(v).hex()}
    if isinstance(v, np.ndarray):
        return [int(x) for x in v]
    if isinstance(v, AbortCode):
        return int(v)
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    return v


def _dec(v):
    if isinstance(v, dict):
        if set(v) == {"hex"}:
            return bytes.fromhex(v["hex"])
        return {k: _dec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def to_json(msg) -> dict:
    return {"type": type(msg).__name__,
            "fields": {f.name: _enc(getattr(msg, f.name)) for f in dataclasses.fields(msg)}}


def from_json(d: dict):
    cls = getattr(m, d["type"])
    f = {k: _dec(v) for k, v in d["fields"].items()}
    if cls is m.Pages:
        f["enc_pfns"] = np.asarray(f["enc_pfns"], dtype=np.uint64)
        f["shr_pfns"] = np.asarray(f["shr_pfns"], dtype=np.uint64)
    if "features" in f:
        f["features"] = tuple(f["features"])
    if "code" in f:
        f["code"] = AbortCode(f["code"])
    if cls is m.VcpuState and f["regs"] is not None:
        f["regs"] = tuple(f["regs"])
    return cls(**f)
