"""Seed journals: a training run kept as the list of its steps, and replayed bit for bit.

A zero-order step is fully described by its :class:`~zo_kernels.SeedGradient` (the seed, the N
sample ids and the N float64 weights) and the optimizer's hyperparameters at that step. A
:class:`Journal` appends one small record per step to a file, durable (flushed and fsync'ed) before
:meth:`Journal.append` returns; :func:`replay` applies the recorded steps again. From the same
starting values, on the same backend and build, the replayed parameters (and the optimizer's state:
momentum buffers, Adam moments and step counts) equal the recorded run's bit for bit::

    with Journal("run.zoj", params, opt) as journal:     # the header: layout, fingerprint, optimizer
        for batch in data:
            sg = zo_kernels.estimate(loss_fn, params, batch, num_samples=16, sigma=1e-3)
            opt.step(sg)
            journal.append(sg)                            # after the step, before a scheduler's step()

    params, opt = fresh_start()                           # the same starting values, a new optimizer
    done = replay("run.zoj", params, opt)                 # the steps of the run, applied again
    with Journal("run.zoj", params, opt) as journal:      # resume: append after the last record
        ...

File format (version 1; all integers little-endian)::

    file    = prefix header-frame record-frame*
    prefix  = b"ZOKJ" u32 version                                   (8 bytes)
    frame   = u32 length  u32 crc32  payload[length]                (crc32 of the length's 4 bytes + payload)
    header  = UTF-8 JSON: {"format", "version", "shapes", "dtypes", "fingerprint",
                           "optimizer": null | {"class", "defaults", "group_sizes", "groups"},
                           "distribution": null | {"name", "stream", "rank"}, "created_by"}
    record  = u8 flags (bit 0: ids are a range, bit 1: loss present, bit 2: options present)
              u8 stream (0 normal, 1 rademacher)  u32 rank (0: full rank)  u64 seed  f64 sigma  u32 N
              ids: u32 first (a range first .. first + N - 1)  or  N x u32
              N x f64 weights
              [f64 loss]
              [UTF-8 JSON options to the end of the payload: one dict per param group, e.g.
               [{"lr": 0.01, "momentum": 0.9}]; without an optimizer [{"lr": 0.01}]]

A record carries the optimizer's options only when they differ from the previous record's (the first
record always has them), so a run at a fixed learning rate costs ``46 + 8 N`` bytes per step (frame
included) with a contiguous id range and a loss: 174 bytes at N = 16. Each frame is self-delimiting and
checksummed.

What the checks promise:

- A record cut short by a crash (the last frame shorter than its length, or failing its checksum)
  is a *torn tail*: :func:`replay` warns, naming the byte offset and the number of complete records,
  and replays those; reopening the journal for append warns and truncates it. A frame that fails its
  checksum with complete frames after it is corruption, not a crash: a ValueError.
- Every record is parsed and checked before the first step is applied: on any ValueError the
  parameters and the optimizer are untouched.
- The header's ``fingerprint`` is the SHA-256 of the *starting* values (each tensor's dtype, shape
  and bytes, in order). :func:`replay` checks it against ``params`` before applying anything.
  Reopening a journal for append does not: the parameters are then the replayed ones (or a
  checkpoint's, when the journal starts at that checkpoint), whose values the header does not know.
  The layout, the optimizer (class, constructor defaults, param group sizes) and the distribution
  are checked in both cases.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import warnings
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

from ._version import __version__
from .config import as_params, check_leaf, check_real
from .distributions import as_fused
from .ops.spec import STREAMS
from .optim import _ZOOptimizer
from .seed_gradient import SeedGradient

__all__ = ["FORMAT_VERSION", "Journal", "fingerprint", "replay"]

#: The version of the file format this module writes and reads.
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

_MAGIC = b"ZOKJ"
_PREFIX = struct.Struct("<4sI")
_FRAME = struct.Struct("<II")
_FIXED = struct.Struct("<BBIQdI")  # flags, stream, rank, seed, sigma, N
_RANGE, _LOSS, _OPTIONS = 1, 2, 4
_MAX_PAYLOAD = 2**31
_CHUNK = 2**24
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}

Options = List[Dict[str, Any]]


class _Record(NamedTuple):
    """One decoded step: what a SeedGradient needs (ids as a range or a tensor) and the options in force."""

    seed: int
    ids: Union[range, torch.Tensor]
    weights: torch.Tensor
    sigma: float
    stream: str
    rank: Optional[int]
    loss: Optional[float]
    options: Options


class _Contents(NamedTuple):
    header: Dict[str, Any]
    records: List[_Record]
    end: int  # the byte after the last complete record
    size: int  # the file's size


# --- argument checks -------------------------------------------------------------------------------


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike of str, got bytes {path!r}")
    return path


def _check_params(params: Any) -> List[torch.Tensor]:
    """The tensors of ``params`` in order (a generator is read once), each checked."""
    leaves = pytree.tree_leaves(as_params(params))
    if not leaves:
        raise ValueError("params must hold at least one tensor")
    for k, p in enumerate(leaves):
        check_leaf(p, f"params leaf {k}")
    return leaves


def _optimizer_spec(optimizer: Any, leaves: Sequence[torch.Tensor]) -> Optional[Dict[str, Any]]:
    """The header's description of ``optimizer``; raises unless it is a zo_kernels optimizer of exactly ``leaves``."""
    if optimizer is None:
        return None
    if not isinstance(optimizer, _ZOOptimizer):
        raise TypeError(
            f"optimizer must be a zo_kernels.optim optimizer (ZOSGD, ZOAdam) or None, got {type(optimizer).__name__}"
        )
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    if len(stepped) != len(leaves) or any(a is not b for a, b in zip(stepped, leaves)):
        raise ValueError(
            f"optimizer must step the tensors of params, in the same order: it holds {len(stepped)} tensors, "
            f"params has {len(leaves)}, and they are not the same objects in the same order"
        )
    cls = type(optimizer)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "defaults": _plain({k: optimizer.defaults[k] for k in cls._OPTIONS}),
        "group_sizes": [len(group["params"]) for group in optimizer.param_groups],
        "groups": _current_options(optimizer),
    }


def _current_options(optimizer: _ZOOptimizer) -> Options:
    """Each param group's options, checked and as plain JSON values (betas as a list)."""
    return _plain(
        [
            dict(zip(optimizer._OPTIONS, optimizer._options(group, f"optimizer.param_groups[{i}]")))
            for i, group in enumerate(optimizer.param_groups)
        ]
    )


def _distribution_spec(distribution: Any) -> Optional[Dict[str, Any]]:
    if distribution is None:
        return None
    fused = as_fused(distribution)
    if fused is None:
        raise TypeError(
            "distribution must be a built-in zo_kernels distribution (Normal(), Rademacher(), Sphere(), LowRank(r)) "
            f"or None, got {type(distribution).__name__}"
        )
    return {"name": repr(fused), "stream": fused.stream, "rank": getattr(fused, "rank", None)}


def _plain(value: Any) -> Any:
    """``value`` as the JSON round trip gives it back (tuples become lists), so that comparisons are exact."""
    return json.loads(json.dumps(value))


def _describe_distribution(stream: str, rank: Optional[int]) -> str:
    return f"LowRank(rank={rank})" if rank is not None else f"{stream} stream"


# --- fingerprint and header ------------------------------------------------------------------------


def fingerprint(params: Any) -> str:
    """``'sha256:<hex>'`` of the tensors of ``params``: each one's dtype, shape and bytes, in order.

    This is what a journal's header records of its starting values (any device; bfloat16 included).
    """
    h = hashlib.sha256()
    for p in _check_params(params):
        h.update(f"{p.dtype}{tuple(p.shape)};".encode())
        data = p.detach().cpu().clone(memory_format=torch.contiguous_format)  # its own storage, exactly its bytes
        size, address = data.numel() * data.element_size(), data.data_ptr()
        for at in range(0, size, _CHUNK):  # in chunks: no second full copy of a large tensor
            h.update(ctypes.string_at(address + at, min(_CHUNK, size - at)))
    return f"sha256:{h.hexdigest()}"


def _layout(leaves: Sequence[torch.Tensor]) -> Tuple[List[List[int]], List[str]]:
    return [list(p.shape) for p in leaves], [str(p.dtype) for p in leaves]


def _check_layout(header: Dict[str, Any], leaves: Sequence[torch.Tensor], what: str) -> None:
    """ValueError naming the first tensor of ``leaves`` whose shape or dtype differs from the header's."""
    shapes, dtypes = _layout(leaves)
    if len(shapes) != len(header["shapes"]):
        raise ValueError(f"{what} has {len(shapes)} tensors; the journal's layout has {len(header['shapes'])}")
    for k, (s, d, hs, hd) in enumerate(zip(shapes, dtypes, header["shapes"], header["dtypes"])):
        if (s, d) != (hs, hd):
            raise ValueError(
                f"{what} does not have the journal's layout: tensor {k} is {s} {d}, the journal's is {hs} {hd}"
            )


def _check_optimizer(header: Dict[str, Any], spec: Optional[Dict[str, Any]]) -> None:
    """ValueError naming what differs between the journal's optimizer and ``spec`` (the one given)."""
    recorded = header["optimizer"]
    if recorded is None and spec is None:
        return
    if spec is None:
        raise ValueError(
            f"the journal was recorded with optimizer {recorded['class']} {recorded['defaults']}: pass optimizer= "
            "an optimizer of that class with those hyperparameters"
        )
    if recorded is None:
        raise ValueError(
            f"the journal was recorded without an optimizer (plain SGD, sg.apply_), but optimizer is {spec['class']}: "
            "pass optimizer=None"
        )
    if spec["class"] != recorded["class"]:
        raise ValueError(f"optimizer is {spec['class']}, but the journal was recorded with {recorded['class']}")
    differ = [
        f"{k}={spec['defaults'].get(k)!r} (the journal's: {recorded['defaults'].get(k)!r})"
        for k in sorted(set(spec["defaults"]) | set(recorded["defaults"]))
        if spec["defaults"].get(k) != recorded["defaults"].get(k)
    ]
    if differ:
        raise ValueError(f"optimizer hyperparameters differ from the journal's: {', '.join(differ)}")
    if spec["group_sizes"] != recorded["group_sizes"]:
        raise ValueError(
            f"optimizer's param groups hold {spec['group_sizes']} tensors, the journal's {recorded['group_sizes']}"
        )


def _check_distribution(
    header: Dict[str, Any], records: Sequence[_Record], spec: Optional[Dict[str, Any]], what: str
) -> None:
    """ValueError if ``spec`` (a distribution given by the caller) differs from the journal's."""
    if spec is None:
        return
    recorded = header["distribution"]
    if recorded is not None and (recorded["stream"], recorded["rank"], recorded["name"]) != (
        spec["stream"],
        spec["rank"],
        spec["name"],
    ):
        raise ValueError(f"{what} is {spec['name']}, but the journal was recorded with {recorded['name']}")
    if records and (records[0].stream, records[0].rank) != (spec["stream"], spec["rank"]):
        first = _describe_distribution(records[0].stream, records[0].rank)
        raise ValueError(f"{what} is {spec['name']}, but the journal's steps use {first}")


# --- encoding --------------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))) + payload


def _encode(sg: SeedGradient, options: Optional[Options]) -> bytes:
    ids = sg.sample_ids.detach().cpu().to(torch.int64)
    n = ids.numel()
    contiguous = n > 0 and torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + n))
    flags = (_RANGE if contiguous else 0) | (_LOSS if sg.loss is not None else 0) | (_OPTIONS if options else 0)
    parts = [_FIXED.pack(flags, STREAMS.index(sg.stream), sg.rank or 0, sg.seed, sg.sigma, n)]
    parts.append(struct.pack("<I", int(ids[0])) if contiguous else struct.pack(f"<{n}I", *ids.tolist()))
    parts.append(struct.pack(f"<{n}d", *sg.weights.detach().cpu().to(torch.float64).tolist()))  # exact: floats
    if sg.loss is not None:
        parts.append(struct.pack("<d", sg.loss))
    if options:
        parts.append(json.dumps(options, separators=(",", ":")).encode())
    return b"".join(parts)


def _header_bytes(header: Dict[str, Any]) -> bytes:
    return _PREFIX.pack(_MAGIC, FORMAT_VERSION) + _frame(json.dumps(header, separators=(",", ":")).encode())


# --- decoding --------------------------------------------------------------------------------------


def _decode(payload: bytes, previous: Optional[Options], where: str) -> _Record:
    """One record's payload, checked; ``previous`` is the options in force before it (None: none yet)."""
    if len(payload) < _FIXED.size:
        raise ValueError(f"{where}: {len(payload)} bytes, shorter than a record's fixed part ({_FIXED.size})")
    flags, stream_code, rank, seed, sigma, n = _FIXED.unpack_from(payload)
    if flags & ~(_RANGE | _LOSS | _OPTIONS) or stream_code >= len(STREAMS):
        raise ValueError(f"{where}: unknown flags {flags:#x} or stream code {stream_code}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{where}: sigma must be finite and > 0, got {sigma}")
    at = _FIXED.size
    id_bytes = 4 if flags & _RANGE else 4 * n
    fixed_end = at + id_bytes + 8 * n + (8 if flags & _LOSS else 0)
    if len(payload) < fixed_end or (len(payload) > fixed_end and not flags & _OPTIONS):
        raise ValueError(f"{where}: {len(payload)} bytes do not hold N={n} ids and weights")
    if flags & _RANGE:
        (first,) = struct.unpack_from("<I", payload, at)
        if first + n > 2**32:
            raise ValueError(f"{where}: sample ids {first} .. {first + n - 1} exceed 2**32 - 1")
        ids: Union[range, torch.Tensor] = range(first, first + n)
    else:
        ids = torch.tensor(struct.unpack_from(f"<{n}I", payload, at), dtype=torch.int64)
    at += id_bytes
    weights = torch.tensor(struct.unpack_from(f"<{n}d", payload, at), dtype=torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{where}: the weights are not all finite")
    at += 8 * n
    loss = None
    if flags & _LOSS:
        (loss,) = struct.unpack_from("<d", payload, at)
        at += 8
    if flags & _OPTIONS:
        try:
            options = json.loads(payload[at:].decode())
        except ValueError as exc:
            raise ValueError(f"{where}: the options are not valid JSON ({exc})") from None
        if not isinstance(options, list) or not all(isinstance(group, dict) for group in options):
            raise ValueError(f"{where}: the options must be a list of one dict per param group, got {options!r:.80}")
    elif previous is None:
        raise ValueError(f"{where}: the first record must carry the options (the learning rate)")
    else:
        options = previous
    return _Record(seed, ids, weights, sigma, STREAMS[stream_code], rank or None, loss, options)


def _read_header(data: bytes, path: str) -> Tuple[Dict[str, Any], int]:
    """The header and the offset of the first record; ValueError if ``data`` is not a journal of this version."""
    if len(data) < _PREFIX.size or data[:4] != _MAGIC:
        raise ValueError(
            f"path {path!r} is not a zo_kernels journal (its first bytes are {data[:4]!r}, not {_MAGIC!r})"
        )
    (version,) = struct.unpack_from("<I", data, 4)
    if version != FORMAT_VERSION:
        raise ValueError(f"path {path!r} is a journal of format version {version}; this zo_kernels reads version 1")
    frame = _frame_at(data, _PREFIX.size)
    if frame is None or isinstance(frame, str):
        raise ValueError(f"path {path!r}: the journal's header is damaged ({frame or 'cut short'})")
    try:
        header = json.loads(data[_PREFIX.size + _FRAME.size : frame].decode())
    except ValueError as exc:
        raise ValueError(f"path {path!r}: the journal's header is not valid JSON ({exc})") from None
    keys = {"format", "version", "shapes", "dtypes", "fingerprint", "optimizer", "distribution"}
    if not isinstance(header, dict) or not keys <= set(header):
        raise ValueError(f"path {path!r}: the journal's header lacks {sorted(keys - set(header or {}))}")
    if any(d not in _DTYPES for d in header["dtypes"]) or len(header["dtypes"]) != len(header["shapes"]):
        raise ValueError(f"path {path!r}: the journal's header has an unknown layout {header['dtypes']}")
    return header, frame


def _frame_at(data: bytes, at: int) -> Union[None, str, int]:
    """The end of the frame at ``at``; None if the data ends inside it, a message if its checksum fails."""
    if len(data) - at < _FRAME.size:
        return None
    length, crc = _FRAME.unpack_from(data, at)
    end = at + _FRAME.size + length
    if length > _MAX_PAYLOAD or end > len(data):
        return None
    if zlib.crc32(data[at + _FRAME.size : end], zlib.crc32(data[at : at + 4])) != crc:
        return f"checksum mismatch in the frame at byte offset {at}"
    return end


def _parse(data: bytes, path: str) -> _Contents:
    """Every complete record of the journal ``data``, checked; a torn tail is left out (see ``end``)."""
    header, at = _read_header(data, path)
    records: List[_Record] = []
    options: Optional[Options] = None
    expected = header["distribution"]
    while at < len(data):
        end = _frame_at(data, at)
        if end is None or (isinstance(end, str) and _last_frame(data, at)):
            break  # a torn tail: what a crash while appending leaves
        where = f"path {path!r}: record {len(records)} (byte offset {at})"
        if isinstance(end, str):
            raise ValueError(f"{where}: {end}, with complete records after it: the journal is corrupted")
        record = _decode(data[at + _FRAME.size : end], options, where)
        if expected is not None:
            if (record.stream, record.rank) != (expected["stream"], expected["rank"]):
                got = _describe_distribution(record.stream, record.rank)
                raise ValueError(f"{where}: a step of {got}, but the journal is of {expected['name']}")
        elif records and (record.stream, record.rank) != (records[0].stream, records[0].rank):
            got, first = (_describe_distribution(r.stream, r.rank) for r in (record, records[0]))
            raise ValueError(f"{where}: a step of {got}, but the journal's first step is of {first}")
        groups = len(header["optimizer"]["group_sizes"]) if header["optimizer"] else 1
        if len(record.options) != groups:
            raise ValueError(f"{where}: options for {len(record.options)} param groups, the journal has {groups}")
        records.append(record)
        options = record.options
        at = end
    return _Contents(header, records, at, len(data))


def _last_frame(data: bytes, at: int) -> bool:
    """Whether the frame at ``at``, by its own length, reaches the end of ``data`` (nothing complete follows)."""
    (length,) = struct.unpack_from("<I", data, at)
    return at + _FRAME.size + length >= len(data)


def _torn_message(path: str, contents: _Contents, action: str) -> str:
    return (
        f"journal {path!r} ends in a torn record at byte offset {contents.end} ({contents.size - contents.end} bytes "
        f"after the last complete record, as a crash while appending leaves it): {action} the "
        f"{len(contents.records)} complete records before it"
    )


def _check_options(record: _Record, optimizer: Optional[_ZOOptimizer], where: str) -> None:
    for i, group in enumerate(record.options):
        if optimizer is None:
            if set(group) != {"lr"}:
                raise ValueError(f"{where}: a step without an optimizer records only 'lr', got {sorted(group)}")
            check_real(group["lr"], f"{where}: 'lr'")
        else:
            missing = set(optimizer._OPTIONS) - set(group)
            if missing:
                raise ValueError(f"{where}: param group {i} lacks the options {sorted(missing)}")
            optimizer._options(group, f"{where}: param group {i}")


def _seed_gradient(record: _Record, header: Dict[str, Any]) -> SeedGradient:
    ids = record.ids
    return SeedGradient(
        seed=record.seed,
        sample_ids=torch.arange(ids.start, ids.stop, dtype=torch.int64) if isinstance(ids, range) else ids,
        weights=record.weights,
        sigma=record.sigma,
        stream=record.stream,
        shapes=[torch.Size(s) for s in header["shapes"]],
        dtypes=[_DTYPES[d] for d in header["dtypes"]],
        loss=record.loss,
        rank=record.rank,
    )


def _set_options(optimizer: _ZOOptimizer, options: Options) -> None:
    for group, recorded in zip(optimizer.param_groups, options):
        for key in optimizer._OPTIONS:
            value = recorded[key]
            group[key] = tuple(value) if isinstance(value, list) else value


# --- the public API --------------------------------------------------------------------------------


def replay(path: PathLike, params: Any, optimizer: Optional[_ZOOptimizer] = None, *, distribution: Any = None) -> int:
    """Apply the steps recorded in the journal at ``path`` to ``params``; return how many were applied.

    With ``optimizer`` (of the class and hyperparameters the journal was recorded with), each step
    is ``optimizer.step(sg)`` with every param group's options set to the recorded ones first, so
    momentum buffers, Adam moments and step counts are rebuilt, and learning-rate schedules replayed;
    the groups keep the last step's options afterwards. Without one, each step is
    ``sg.apply_(params, lr)`` with the recorded ``lr`` (a journal written without an optimizer). From
    the starting values the journal was recorded from, on the same backend and build, the result
    equals the recorded run bit for bit.

    Args:
        path: the journal (a str or os.PathLike).
        params: the tensors the journal was recorded for, in the same order (a list, any pytree, or an
            iterable such as ``model.parameters()``), holding the starting values; updated in place.
        optimizer: a ``zo_kernels.optim`` optimizer of exactly those tensors, or None.
        distribution: if given, the journal must have been recorded with this distribution
            (``Normal()``, ``LowRank(r)``, ...).

    Returns:
        The number of steps applied: every complete record. A torn last record (a crash while
        appending) is skipped with a warning naming its byte offset.

    Raises:
        TypeError: for an argument of the wrong type (naming it).
        ValueError: if the file is not a journal or is corrupted, or if ``params`` differ from the
            journal's starting values (fingerprint) or layout, or ``optimizer`` or ``distribution``
            from the journal's. Every check runs before anything is applied: on an error, ``params``
            and ``optimizer`` are untouched.
    """
    path = _check_path(path)
    leaves = _check_params(params)
    spec = _optimizer_spec(optimizer, leaves)
    wanted = _distribution_spec(distribution)
    with open(path, "rb") as f:
        contents = _parse(f.read(), path)
    header = contents.header
    _check_layout(header, leaves, "params")
    _check_optimizer(header, spec)
    _check_distribution(header, contents.records, wanted, "distribution")
    for k, record in enumerate(contents.records):
        if k == 0 or record.options is not contents.records[k - 1].options:
            _check_options(record, optimizer, f"path {path!r}: record {k}")
    found = fingerprint(leaves)
    if found != header["fingerprint"]:
        raise ValueError(
            f"params do not match the journal's fingerprint (its starting values): {found} differs from "
            f"{header['fingerprint']}; replay from the values the run started from (same initialisation, or the "
            "checkpoint the journal starts at)"
        )
    if contents.end != contents.size:
        warnings.warn(_torn_message(path, contents, "replaying"), RuntimeWarning, stacklevel=2)
    options: Optional[Options] = None
    for record in contents.records:
        sg = _seed_gradient(record, header)
        if optimizer is None:
            sg.apply_(leaves, record.options[0]["lr"])
            continue
        if record.options is not options:
            _set_options(optimizer, record.options)
            options = record.options
        optimizer.step(sg)
    return len(contents.records)


class Journal:
    """An append-only record of a run's steps at ``path``: the header when created, one record per :meth:`append`.

    A context manager (``with Journal(...) as journal``); :meth:`close` ends it too. If ``path`` does
    not exist, the journal is created atomically (written to ``path + '.tmp'``, fsync'ed, renamed)
    with a header holding the layout of ``params``, the fingerprint of their current values (the
    starting values), ``optimizer``'s class and hyperparameters and ``distribution``. If it exists,
    the journal is *resumed*: its header is checked against ``params``' layout, ``optimizer`` and
    ``distribution`` (not the fingerprint: the values are then the replayed ones), a torn tail is
    truncated (with a warning), and records are appended after the last complete one.
    :attr:`steps` counts the records. While open, the file is locked (``flock``) against a second writer.

    Resuming does not apply the recorded steps: call :func:`replay` first (its return value equals
    :attr:`steps`), then open the journal and continue.

    Args:
        path: the journal file (a str or os.PathLike).
        params: the tensors stepped (a list, any pytree, or an iterable such as ``model.parameters()``).
        optimizer: the ``zo_kernels.optim`` optimizer stepping exactly those tensors, or None (then
            :meth:`append` takes the ``lr`` of a plain ``sg.apply_(params, lr)`` step).
        distribution: optionally, the distribution every step must use (``Normal()``, ``LowRank(r)``,
            ...); recorded in the header and checked on append, resume and replay. Without it, the
            first step's distribution is the journal's.
    """

    def __init__(
        self, path: PathLike, params: Any, optimizer: Optional[_ZOOptimizer] = None, *, distribution: Any = None
    ) -> None:
        self.path = _check_path(path)
        self._leaves = _check_params(params)
        spec = _optimizer_spec(optimizer, self._leaves)
        wanted = _distribution_spec(distribution)
        self._optimizer = optimizer
        self._fd: Optional[int] = None
        if os.path.exists(self.path):
            self._fd = os.open(self.path, os.O_RDWR)
            try:
                self._lock()
                self._resume(spec, wanted)
            except BaseException:
                self._release()
                raise
        else:
            shapes, dtypes = _layout(self._leaves)
            self._header = {
                "format": "zo_kernels.journal",
                "version": FORMAT_VERSION,
                "shapes": shapes,
                "dtypes": dtypes,
                "fingerprint": fingerprint(self._leaves),
                "optimizer": spec,
                "distribution": wanted,
                "created_by": {"zo_kernels": __version__, "torch": torch.__version__},
            }
            self._create()
            self._options: Optional[Options] = None
            self._stream_rank = None if wanted is None else (wanted["stream"], wanted["rank"])
            self.steps = 0
        #: The number of bytes of the last record appended (0 before the first).
        self.last_record_bytes = 0

    def _create(self) -> None:
        data = _header_bytes(self._header)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path)
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            self._lock()
        except BaseException:
            self._release()
            raise
        self._end = len(data)

    def _resume(self, spec: Optional[Dict[str, Any]], wanted: Optional[Dict[str, Any]]) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0)
        contents = _parse(data, self.path)
        self._header = contents.header
        _check_layout(self._header, self._leaves, "params")
        _check_optimizer(self._header, spec)
        _check_distribution(self._header, contents.records, wanted, "distribution")
        if contents.end != contents.size:
            warnings.warn(_torn_message(self.path, contents, "truncating it, keeping"), RuntimeWarning, stacklevel=3)
            os.ftruncate(self._fd, contents.end)
            os.fsync(self._fd)
        self._end = contents.end
        self.steps = len(contents.records)
        self._options = contents.records[-1].options if contents.records else None
        recorded = self._header["distribution"]
        if recorded is not None:
            self._stream_rank = (recorded["stream"], recorded["rank"])
        else:
            self._stream_rank = (contents.records[0].stream, contents.records[0].rank) if contents.records else None

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): a second writer is not detected
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"journal {self.path!r} is open for writing elsewhere (its lock is held)") from None

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._fd is None

    def append(self, sg: SeedGradient, lr: Optional[float] = None) -> int:
        """Record the step just applied with ``sg``; durable (flushed and fsync'ed) when this returns.

        With an optimizer, call it right after ``optimizer.step(sg)`` (before an LR scheduler's
        ``step()``): the record holds each param group's options as they are now, i.e. those the
        step used. Without one, pass the ``lr`` of the ``sg.apply_(params, lr)`` step.

        Args:
            sg: the :class:`~zo_kernels.SeedGradient` of the step, for the journal's parameters.
            lr: the learning rate, for a journal without an optimizer only.

        Returns:
            The number of records in the journal, this one included.

        Raises:
            TypeError: ``sg`` is not a SeedGradient, ``lr`` is missing or given where not expected.
            ValueError: ``sg``'s layout or distribution differs from the journal's, its weights are
                not finite, ``lr`` is not a finite number, or the journal is closed.
        """
        if self._fd is None:
            raise ValueError(f"journal {self.path!r} is closed")
        if not isinstance(sg, SeedGradient):
            raise TypeError(f"sg must be a SeedGradient (from zo_kernels.estimate), got {type(sg).__name__}")
        layout = ([list(s) for s in sg.shapes], [str(d) for d in sg.dtypes])
        if layout != (self._header["shapes"], self._header["dtypes"]):
            raise ValueError(
                f"sg has the layout {list(zip(*layout))}, the journal's params "
                f"{list(zip(self._header['shapes'], self._header['dtypes']))}"
            )
        if self._stream_rank is not None and (sg.stream, sg.rank) != self._stream_rank:
            raise ValueError(
                f"sg is of {_describe_distribution(sg.stream, sg.rank)}, but the journal's steps are of "
                f"{_describe_distribution(*self._stream_rank)}"
            )
        if not bool(torch.isfinite(sg.weights).all()):
            raise ValueError("sg.weights must be finite")
        ids = sg.sample_ids
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < 2**32):
            raise ValueError(f"sg.sample_ids must be in [0, 2**32), got {int(ids.min())} .. {int(ids.max())}")
        if not (isinstance(sg.seed, int) and 0 <= sg.seed < 2**64):
            raise ValueError(f"sg.seed must be an int in [0, 2**64), got {sg.seed!r}")
        if self._optimizer is not None:
            if lr is not None:
                raise TypeError("lr is for a journal without an optimizer: the optimizer's param groups give it")
            options = _current_options(self._optimizer)
        else:
            if lr is None:
                raise TypeError("lr is required: this journal has no optimizer, its steps are sg.apply_(params, lr)")
            options = [{"lr": check_real(lr, "lr")}]
        payload = _encode(sg, None if options == self._options else options)
        frame = _frame(payload)
        try:
            written = os.pwrite(self._fd, frame, self._end)
            if written != len(frame):
                raise OSError(f"short write: {written} of {len(frame)} bytes")
            os.fsync(self._fd)
        except BaseException:
            # A partial record would be a torn tail; cut it so that the journal stays a clean prefix.
            try:
                os.ftruncate(self._fd, self._end)
            except OSError:
                pass
            raise
        self._end += len(frame)
        self._options = options
        self._stream_rank = (sg.stream, sg.rank)
        self.steps += 1
        self.last_record_bytes = len(frame)
        return self.steps

    def close(self) -> None:
        """Release the file (every record is already durable). Closing twice is allowed."""
        self._release()

    def __del__(self) -> None:
        # A journal dropped without close() still releases its descriptor and lock (its records are already durable).
        if getattr(self, "_fd", None) is not None:
            self._release()

    def __enter__(self) -> Journal:
        """The journal itself."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close the journal."""
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"Journal({self.path!r}, {self.steps} steps, {state})"


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path``'s directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
