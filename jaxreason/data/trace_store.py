"""Append-only store of search and sampling traces on tensorstore (zarr3), read back as training batches.

A trace is one row: `problem_id`, `iteration`, the full token ids (prompt + solution), `prompt_len`, the
reasoning steps as `step_ends` (index in `tokens` one past each step's last token) with one value target
per step in `step_values` (NaN: no target for that step), a final `reward` and a `flags` bit field
(`FLAG_*`). Ragged fields are stored flat, one array per field, and each row records where its slices end
(the jagged-array layout):

    <store>/manifest.json         committed counts {num_rows, num_tokens, num_steps}: all a reader trusts
    <store>/writer.lock           flock-ed by the single writer
    <store>/rows/<column>         zarr3 [rows]: problem_id i64, iteration i32, prompt_len i32, reward f32,
                                  flags i32, tokens_end i64, steps_end i64 (cumulative ends into flat/)
    <store>/flat/tokens           zarr3 [total tokens] i32; row r is tokens[tokens_end[r-1]:tokens_end[r]]
    <store>/flat/step_ends        zarr3 [total steps] i32 (relative to the row's tokens), sliced by steps_end
    <store>/flat/step_values      zarr3 [total steps] f32, sliced by steps_end

Commit protocol. `append` writes the new rows past the committed end (growing the arrays first, metadata
only), waits until tensorstore has written and fsync-ed every chunk, then publishes the new counts by
replacing `manifest.json` atomically (temp file, fsync, `os.replace`, fsync of the folder). Readers see
only rows below the manifest's count, so a writer killed mid-append leaves no partial record visible;
the next writer starts at the committed end and overwrites the uncommitted tail. Chunk files are replaced
atomically too, so readers may run while the writer appends (`refresh` picks up new commits).
One writer at a time: mode "a" takes an exclusive `fcntl.flock`; a second writer gets
`TraceStoreLockedError`. Handles are not thread-safe.

Chunk sizes. Row columns use 4096-row chunks (16-32 KiB): an append rewrites at most a few, and `select`
scans whole columns in few reads. Flat arrays use 64Ki-element chunks (256 KiB raw, zstd): a random-row
read decompresses one or two chunks, an append rewrites only the partly filled last chunk, and a billion
tokens make ~15k files, which local and network file systems handle.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts

from jaxreason.verifiers.positions import score_position

FLAG_CORRECT = 1 << 0  # the final answer is correct
FLAG_SEARCH = 1 << 1  # produced by tree search
FLAG_BASELINE = 1 << 2  # produced by baseline sampling
FLAG_ROLLOUT = 1 << 3  # a sampled solution whose step values come from rollouts (PRM warm-up)
FLAG_EVAL = 1 << 4  # a sample of a held-out problem, kept for evaluation
FLAG_HINTED = 1 << 5  # drawn with the gold answer in the prompt (STaR's rationalization); stored without it

FORMAT = "jaxreason.trace_store"
VERSION = 1
ROW_CHUNK = 4096
FLAT_CHUNK = 1 << 16

_ROW_COLUMNS = {
    "problem_id": np.int64,
    "iteration": np.int32,
    "prompt_len": np.int32,
    "reward": np.float32,
    "flags": np.int32,
    "tokens_end": np.int64,
    "steps_end": np.int64,
}
_FLAT_COLUMNS = {"tokens": np.int32, "step_ends": np.int32, "step_values": np.float32}
_INT32 = np.iinfo(np.int32)


class TraceStoreLockedError(RuntimeError):
    """Another writer holds the store's lock."""


@dataclasses.dataclass
class Trace:
    """One search or sampling trace. tokens: [T] int32; step_ends, step_values: [S] int32 / float32.

    A NaN step value means the step has no value target (it is masked out of the value loss).
    """

    problem_id: int
    iteration: int
    tokens: np.ndarray
    prompt_len: int
    step_ends: np.ndarray
    step_values: np.ndarray
    reward: float
    flags: int = 0


class TraceStore:
    """A trace store folder opened for reading (mode "r") or appending (mode "a", exclusive).

    Row indices run over committed rows only: [0, len(store)).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r"):
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._lock_file = None
        manifest = _read_manifest(self.path)
        if mode == "a":
            self._lock_file = _lock(self.path)
            manifest = _read_manifest(self.path)  # a writer that held the lock may have committed meanwhile
        self._counts = manifest
        context = ts.Context({"file_io_sync": True, "cache_pool": {"total_bytes_limit": 64 << 20}})
        try:
            self._arrays = {
                name: ts.open(_spec(self.path / sub / name), context=context,
                              open=True, read=True, write=mode == "a").result()
                for sub, name in _array_names()
            }
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, path: str | os.PathLike) -> TraceStore:
        """Make an empty store in a new or empty folder and return it open for appending."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"cannot create a trace store at {path}: it exists and is not an empty folder")
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
        try:
            context = ts.Context({"file_io_sync": True})
            for sub, name in _array_names():
                columns = _ROW_COLUMNS if sub == "rows" else _FLAT_COLUMNS
                chunk = ROW_CHUNK if sub == "rows" else FLAT_CHUNK
                ts.open(_spec(path / sub / name, np.dtype(columns[name]), chunk), context=context,
                        create=True).result()
            _write_manifest(path, {"num_rows": 0, "num_tokens": 0, "num_steps": 0})  # last: marks a store
        finally:
            _unlock(lock)
        return cls(path, mode="a")

    def close(self) -> None:
        """Release the writer lock (if any). Idempotent."""
        if self._lock_file is not None:
            _unlock(self._lock_file)
            self._lock_file = None

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._counts["num_rows"]

    def refresh(self) -> int:
        """Re-read the manifest to see rows another process committed since; returns the row count."""
        self._counts = _read_manifest(self.path)
        return len(self)

    # -- writing --------------------------------------------------------------------------------------

    def append(self, traces: Sequence[Trace]) -> None:
        """Append a batch of traces as one commit: all become visible at once, or none (on a crash).

        Every record is validated first; a bad one raises ValueError naming its field and batch position,
        and nothing is written.
        """
        if self.mode != "a" or self._lock_file is None:
            raise PermissionError(f"trace store {self.path} is not open for appending (mode='a')")
        records = [_validate(t, k) for k, t in enumerate(traces)]
        if not records:
            return
        n0, t0, s0 = (self._counts[k] for k in ("num_rows", "num_tokens", "num_steps"))
        num_tokens = np.array([len(r.tokens) for r in records], np.int64)
        num_steps = np.array([len(r.step_ends) for r in records], np.int64)
        rows = {
            "problem_id": np.array([r.problem_id for r in records], np.int64),
            "iteration": np.array([r.iteration for r in records], np.int32),
            "prompt_len": np.array([r.prompt_len for r in records], np.int32),
            "reward": np.array([r.reward for r in records], np.float32),
            "flags": np.array([r.flags for r in records], np.int32),
            "tokens_end": t0 + np.cumsum(num_tokens),
            "steps_end": s0 + np.cumsum(num_steps),
        }
        flat = {
            "tokens": np.concatenate([r.tokens for r in records]),
            "step_ends": np.concatenate([r.step_ends for r in records]),
            "step_values": np.concatenate([r.step_values for r in records]),
        }
        starts = {**dict.fromkeys(rows, n0), "tokens": t0, "step_ends": s0, "step_values": s0}
        data = {**rows, **flat}
        # grow first (metadata only); a crashed writer may have left them larger, which is fine
        for name, values in data.items():
            end = starts[name] + len(values)
            if self._arrays[name].shape[0] < end:
                self._arrays[name] = self._arrays[name].resize(
                    exclusive_max=[end], resize_metadata_only=True, expand_only=True).result()
        writes = [self._arrays[name][starts[name]:starts[name] + len(v)].write(v)
                  for name, v in data.items() if len(v)]
        for write in writes:
            write.result()  # durable (file_io_sync) before the manifest points at it
        counts = {"num_rows": n0 + len(records), "num_tokens": int(rows["tokens_end"][-1]),
                  "num_steps": int(rows["steps_end"][-1])}
        _write_manifest(self.path, counts)
        self._counts = counts

    # -- reading --------------------------------------------------------------------------------------

    def get(self, i: int) -> Trace:
        """Row i (0 <= i < len(self))."""
        return self.read([i])[0]

    def read(self, indices: Sequence[int] | np.ndarray) -> list[Trace]:
        """The traces at these row indices, in the given order (repeats allowed)."""
        idx = self._check_indices(indices)
        if len(idx) == 0:
            return []
        self._resolve_arrays()
        cols = {name: self._arrays[name][idx].read() for name in
                ("problem_id", "iteration", "prompt_len", "reward", "flags")}
        prev = np.maximum(idx - 1, 0)  # the previous row's end is this row's start
        ends = {name: self._arrays[name][np.concatenate([prev, idx])].read()
                for name in ("tokens_end", "steps_end")}
        cols = {name: f.result() for name, f in cols.items()}
        bounds = {}
        for name, future in ends.items():
            both = future.result()
            bounds[name] = (np.where(idx > 0, both[:len(idx)], 0), both[len(idx):])
        tokens = _gather(self._arrays["tokens"], *bounds["tokens_end"])
        step_ends = _gather(self._arrays["step_ends"], *bounds["steps_end"])
        step_values = _gather(self._arrays["step_values"], *bounds["steps_end"])
        return [
            Trace(problem_id=int(cols["problem_id"][k]), iteration=int(cols["iteration"][k]),
                  tokens=tokens[k], prompt_len=int(cols["prompt_len"][k]), step_ends=step_ends[k],
                  step_values=step_values[k], reward=float(cols["reward"][k]), flags=int(cols["flags"][k]))
            for k in range(len(idx))
        ]

    def select(self, iteration: int | None = None, flags_all: int = 0, flags_none: int = 0) -> np.ndarray:
        """Row indices [N] int64 (ascending) whose iteration matches (None: any), with every bit of
        `flags_all` set and every bit of `flags_none` clear."""
        n = len(self)
        self._resolve_arrays()
        keep = np.ones(n, bool)
        if iteration is not None:
            keep &= self._arrays["iteration"][:n].read().result() == iteration
        if flags_all or flags_none:
            flags = self._arrays["flags"][:n].read().result()
            keep &= (flags & flags_all) == flags_all
            keep &= (flags & flags_none) == 0
        return np.flatnonzero(keep).astype(np.int64)

    def padded_batch(self, indices: Sequence[int] | np.ndarray, max_len: int, pad_id: int = 0
                     ) -> dict[str, np.ndarray]:
        """The rows at `indices` as a right-padded batch; see `pad_traces`."""
        return pad_traces(self.read(indices), max_len, pad_id)

    def sharded_batch(self, indices: Sequence[int] | np.ndarray, max_len: int,
                      sharding: jax.sharding.NamedSharding, pad_id: int = 0) -> dict[str, jax.Array]:
        """`padded_batch` as global jax.Arrays: [B, max_len] arrays laid out with `sharding`, [B] arrays
        with its first (batch) entry only.

        `indices` is the global batch, the same on every process; each process reads only the rows its
        devices hold. B must divide evenly over the mesh axes of the batch dimension. Integer columns take
        jax's default width (problem_id becomes int32 unless jax_enable_x64; out-of-range ids raise).
        """
        idx = np.asarray(indices, np.int64).reshape(-1)
        batch = len(idx)
        spec = sharding.spec
        batch_axes = spec[0] if len(spec) else None
        names = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else batch_axes
        shards = math.prod(sharding.mesh.shape[a] for a in names)
        if batch % shards:
            raise ValueError(f"batch size {batch} is not divisible by {shards} shards of the batch axis "
                             f"{tuple(names)} of mesh {dict(sharding.mesh.shape)}")
        devices_rows = sharding.addressable_devices_indices_map((batch, max_len)).values()
        local_rows = np.unique(np.concatenate([np.arange(batch)[index[0]] for index in devices_rows]))
        local = self.padded_batch(idx[local_rows], max_len, pad_id)
        where = np.full(batch, -1, np.int64)
        where[local_rows] = np.arange(len(local_rows))  # global row -> row of `local`
        int_dtype = jax.dtypes.canonicalize_dtype(np.int64)
        ids = local["problem_id"]
        if len(ids) and (ids.min() < np.iinfo(int_dtype).min or ids.max() > np.iinfo(int_dtype).max):
            raise ValueError(f"problem_id out of {int_dtype} range; enable jax_enable_x64 for 64-bit ids")
        local["problem_id"] = ids.astype(int_dtype)
        row_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(batch_axes))
        out = {}
        for key, value in local.items():
            shape = (batch, *value.shape[1:])
            out[key] = jax.make_array_from_callback(
                shape, sharding if value.ndim == 2 else row_sharding,
                lambda index, value=value: value[(where[index[0]], *index[1:])])
        return out

    # -- internals ------------------------------------------------------------------------------------

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices).reshape(-1)
        if len(idx) and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"row indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            raise IndexError(f"row index {idx[bad][0]} out of range for {len(self)} committed rows in {self.path}")
        return idx

    def _resolve_arrays(self) -> None:
        """Re-read array metadata where a writer has grown an array past this handle's shape."""
        need = {**dict.fromkeys(_ROW_COLUMNS, self._counts["num_rows"]),
                "tokens": self._counts["num_tokens"],
                **dict.fromkeys(("step_ends", "step_values"), self._counts["num_steps"])}
        for name, size in need.items():
            if self._arrays[name].shape[0] < size:
                self._arrays[name] = self._arrays[name].resolve().result()


class TooLongError(ValueError):
    """Rows of a training batch longer than its max_len: cutting them would drop their last tokens (the EOS, the
    last value targets). `rows` are their indices in the batch, `lengths` their token counts."""

    def __init__(self, rows: Sequence[int], lengths: Sequence[int], max_len: int, what: str):
        self.rows, self.lengths = list(rows), list(lengths)
        super().__init__(f"{len(self.rows)} {what} longer than max_len = {max_len} (the first has "
                         f"{self.lengths[0]} tokens): raise max_len, or set the stage's `overlong: drop`")


def check_lengths(lengths: Sequence[int], max_len: int, what: str) -> None:
    """Raises `TooLongError` for the rows whose length is above `max_len`."""
    rows = [i for i, n in enumerate(lengths) if n > max_len]
    if rows:
        raise TooLongError(rows, [lengths[i] for i in rows], max_len, what)


def pad_traces(traces: Sequence[Trace], max_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded training batch from traces.

    Returns tokens [B, max_len] int32 (pad_id past the end), attention_mask [B, max_len] int32 (1 on real
    tokens), loss_mask [B, max_len] int32 (1 on real non-prompt tokens, the SFT targets), value_targets
    [B, max_len] float32 (each step's value at its last token, step_ends - 1), value_mask [B, max_len]
    int32 (1 there, except for steps whose value is NaN: no target, mask 0 and target 0), reward [B] float32,
    problem_id [B] int64.
    A trace longer than max_len is a `TooLongError` naming it, never cut.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    lengths = [len(t.tokens) for t in traces]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        check_lengths(lengths, max_len, f"trace(s) (the first of problem {traces[too_long[0]].problem_id})")
    batch = len(traces)
    tokens = np.full((batch, max_len), pad_id, np.int32)
    attention_mask = np.zeros((batch, max_len), np.int32)
    loss_mask = np.zeros((batch, max_len), np.int32)
    value_targets = np.zeros((batch, max_len), np.float32)
    value_mask = np.zeros((batch, max_len), np.int32)
    for b, trace in enumerate(traces):
        length = lengths[b]
        tokens[b, :length] = trace.tokens
        attention_mask[b, :length] = 1
        loss_mask[b, min(trace.prompt_len, length):length] = 1
        ends = np.asarray(trace.step_ends)
        values = np.asarray(trace.step_values, np.float32)
        kept = ~np.isnan(values)
        value_targets[b, score_position(ends[kept])] = values[kept]
        value_mask[b, score_position(ends[kept])] = 1
    return {
        "tokens": tokens,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "value_targets": value_targets,
        "value_mask": value_mask,
        "reward": np.array([t.reward for t in traces], np.float32),
        "problem_id": np.array([t.problem_id for t in traces], np.int64),
    }


def unique_traces(traces: Sequence[Trace]) -> list[Trace]:
    """The traces without repeats: one per distinct (problem, token sequence), the first of each."""
    seen, out = set(), []
    for t in traces:
        key = (t.problem_id, np.asarray(t.tokens).tobytes())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _validate(trace: Trace, k: int) -> Trace:
    """Checked copy of batch record k with canonical dtypes; ValueError names the field and k."""

    def fail(field: str, why: str):
        raise ValueError(f"trace {k} in the batch: {field} {why}")

    def ints(field: str, value) -> np.ndarray:
        arr = np.asarray(value)
        if arr.ndim != 1:
            fail(field, f"must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return np.zeros(0, np.int32)
        if not np.issubdtype(arr.dtype, np.integer):
            fail(field, f"must hold integers, got dtype {arr.dtype}")
        if arr.min() < _INT32.min or arr.max() > _INT32.max:
            fail(field, "must fit in int32")
        return arr.astype(np.int32)

    def scalar_int(field: str, value, low: int, high: int) -> int:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
            fail(field, f"must be an integer in [{low}, {high}], got {value!r}")
        return int(value)

    tokens = ints("tokens", trace.tokens)
    step_ends = ints("step_ends", trace.step_ends)
    step_values = np.asarray(trace.step_values, np.float32)
    prompt_len = scalar_int("prompt_len", trace.prompt_len, 0, len(tokens))
    if step_values.shape != step_ends.shape:
        fail("step_values", f"has shape {step_values.shape} but step_ends has {step_ends.shape}")
    if len(step_ends):
        if np.any(np.diff(step_ends) <= 0):
            fail("step_ends", "must be strictly increasing")
        if step_ends[0] <= prompt_len:
            fail("step_ends", f"must end after the prompt (> prompt_len={prompt_len}), got {step_ends[0]}")
        if step_ends[-1] > len(tokens):
            fail("step_ends", f"must be <= len(tokens)={len(tokens)}, got {step_ends[-1]}")
    if np.isinf(step_values).any():
        fail("step_values", "must be finite or NaN (no target)")
    if not np.isfinite(trace.reward):
        fail("reward", f"must be finite, got {trace.reward}")
    int64 = np.iinfo(np.int64)
    return Trace(
        problem_id=scalar_int("problem_id", trace.problem_id, int64.min, int64.max),
        iteration=scalar_int("iteration", trace.iteration, _INT32.min, _INT32.max),
        tokens=tokens, prompt_len=prompt_len, step_ends=step_ends, step_values=step_values,
        reward=float(trace.reward), flags=scalar_int("flags", trace.flags, 0, _INT32.max),
    )


def _gather(array: ts.TensorStore, starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """Slices array[starts[k]:ends[k]] for each k, reading a covering span once when the rows are dense."""
    lo, hi, total = int(starts.min()), int(ends.max()), int((ends - starts).sum())
    if hi - lo <= 2 * total:  # e.g. sequential reads: one read beats many small ones
        span = array[lo:hi].read().result()
        return [span[s - lo:e - lo] for s, e in zip(starts, ends)]
    futures = [array[int(s):int(e)].read() for s, e in zip(starts, ends)]  # concurrent reads
    return [f.result() for f in futures]


def _array_names():
    return [("rows", name) for name in _ROW_COLUMNS] + [("flat", name) for name in _FLAT_COLUMNS]


def _spec(path: Path, dtype: np.dtype | None = None, chunk: int | None = None) -> dict:
    """zarr3 spec on a local folder; with dtype and chunk, the metadata of a new empty 1-D array."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "recheck_cached_metadata": True}  # lets `resolve` see a writer's resizes
    if dtype is not None:
        spec["metadata"] = {
            "shape": [0],
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
            "fill_value": 0,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 3}}],
        }
    return spec


def _read_manifest(path: Path) -> dict[str, int]:
    file = path / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a jaxreason trace store (no {file.name})")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{file} is not a {FORMAT} version {VERSION} manifest")
    return {k: int(manifest[k]) for k in ("num_rows", "num_tokens", "num_steps")}


def _write_manifest(path: Path, counts: dict[str, int]) -> None:
    """Atomically replace the manifest: readers see the old or the new one, never a torn file."""
    tmp = path / "manifest.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **counts}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / "manifest.json")
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def _lock(path: Path):
    file = open(path / "writer.lock", "a")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise TraceStoreLockedError(
            f"trace store {path} is already open for appending by another writer (lock {file.name})") from None
    return file


def _unlock(file) -> None:
    fcntl.flock(file, fcntl.LOCK_UN)
    file.close()
