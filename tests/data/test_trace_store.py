"""The tensorstore trace store: round trips, selection, batches, sharding, crash safety and locking."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxreason.data.trace_store import (
    FLAG_BASELINE,
    FLAG_CORRECT,
    FLAG_SEARCH,
    TooLongError,
    Trace,
    TraceStore,
    TraceStoreLockedError,
    pad_traces,
)


def random_traces(seed: int, count: int, iteration: int = 0) -> list[Trace]:
    """Traces with 1..300 tokens and 0..20 steps (fewer when the solution is shorter)."""
    rng = np.random.default_rng(seed)
    traces = []
    for _ in range(count):
        length = int(rng.integers(1, 301))
        prompt_len = int(rng.integers(0, length))
        solution = length - prompt_len
        steps = int(rng.integers(0, min(20, solution) + 1))
        step_ends = np.sort(rng.choice(np.arange(prompt_len + 1, length + 1), steps, replace=False))
        traces.append(Trace(
            problem_id=int(rng.integers(0, 2**40)), iteration=iteration,
            tokens=rng.integers(0, 50_000, length).astype(np.int32), prompt_len=prompt_len,
            step_ends=step_ends.astype(np.int32), step_values=rng.random(steps).astype(np.float32),
            reward=float(rng.integers(0, 2)), flags=int(rng.integers(0, 8))))
    return traces


def assert_same(got: list[Trace], want: list[Trace]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a.problem_id, a.iteration, a.prompt_len, a.reward, a.flags) == (
            b.problem_id, b.iteration, b.prompt_len, b.reward, b.flags)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.step_ends, b.step_ends)
        np.testing.assert_array_equal(a.step_values, b.step_values)
        assert a.tokens.dtype == np.int32 and a.step_ends.dtype == np.int32 and a.step_values.dtype == np.float32


def test_round_trip_and_reopen(tmp_path):
    traces = random_traces(0, 200)
    with TraceStore.create(tmp_path / "s") as store:
        store.append(traces[:120])
        store.append(traces[120:])
        assert len(store) == 200
        assert_same(store.read(range(200)), traces)
    reader = TraceStore(tmp_path / "s")
    assert len(reader) == 200
    order = np.random.default_rng(1).permutation(200)[:50]
    assert_same(reader.read(order), [traces[i] for i in order])  # sparse rows: per-row reads
    assert_same([reader.get(7), reader.get(7)], [traces[7], traces[7]])
    assert reader.read([]) == []
    with pytest.raises(IndexError, match="200"):
        reader.get(200)
    with pytest.raises(PermissionError):
        reader.append(traces[:1])


def test_ten_thousand_traces_in_batches(tmp_path):
    traces = random_traces(1, 10_000)
    store = TraceStore.create(tmp_path / "s")
    for start in range(0, 10_000, 2_500):
        store.append(traces[start:start + 2_500])
    store.close()
    reader = TraceStore(tmp_path / "s")
    assert len(reader) == 10_000
    assert_same(reader.read(np.arange(10_000)), traces)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["num_tokens"] == sum(len(t.tokens) for t in traces)
    assert manifest["num_steps"] == sum(len(t.step_ends) for t in traces)


def test_reader_follows_writer_with_refresh(tmp_path):
    writer = TraceStore.create(tmp_path / "s")
    writer.append(random_traces(2, 10))
    reader = TraceStore(tmp_path / "s")
    more = random_traces(3, 5000)  # grows every array past the reader's view of its shape
    writer.append(more)
    assert len(reader) == 10  # readers see commits only when they ask
    assert reader.refresh() == 5010
    assert_same(reader.read([5009]), more[-1:])


def test_reader_sees_rows_written_into_chunks_it_has_read(tmp_path):
    """A read-only handle (another process of a multi-host run) that read the partly filled last chunks, then
    refreshes after the writer appended into those chunks: it reads the new rows, not its cached chunks."""
    writer = TraceStore.create(tmp_path / "s")
    first = random_traces(4, 7)
    writer.append(first)
    reader = TraceStore(tmp_path / "s")
    assert_same(reader.read(range(7)), first)  # caches the rows' and tokens' first chunks
    np.testing.assert_array_equal(reader.select(flags_all=FLAG_CORRECT), writer.select(flags_all=FLAG_CORRECT))
    more = random_traces(5, 9)
    writer.append(more)  # lands in the same chunks
    assert reader.refresh() == 16
    assert_same(reader.read(range(16)), first + more)
    np.testing.assert_array_equal(reader.select(flags_all=FLAG_CORRECT), writer.select(flags_all=FLAG_CORRECT))
    with pytest.raises(PermissionError, match="not open for appending"):
        reader.append(more)


def test_select(tmp_path):
    store = TraceStore.create(tmp_path / "s")
    traces = random_traces(4, 30, iteration=0) + random_traces(5, 30, iteration=1)
    store.append(traces)
    flags = np.array([t.flags for t in traces])
    iterations = np.array([t.iteration for t in traces])
    np.testing.assert_array_equal(store.select(), np.arange(60))
    np.testing.assert_array_equal(store.select(iteration=1), np.arange(30, 60))
    np.testing.assert_array_equal(store.select(flags_all=FLAG_CORRECT | FLAG_SEARCH),
                                  np.flatnonzero((flags & 3) == 3))
    np.testing.assert_array_equal(store.select(iteration=0, flags_all=FLAG_SEARCH, flags_none=FLAG_CORRECT),
                                  np.flatnonzero((iterations == 0) & (flags & 2 > 0) & (flags & 1 == 0)))
    assert store.select(iteration=7).dtype == np.int64 and len(store.select(iteration=7)) == 0


def _small_traces():
    # prompt [5, 6], steps end at 4 and 6 (positions 3 and 5); 6 tokens
    long = Trace(problem_id=11, iteration=0, tokens=np.array([5, 6, 7, 8, 9, 10], np.int32), prompt_len=2,
                 step_ends=np.array([4, 6], np.int32), step_values=np.array([0.25, 1.0], np.float32),
                 reward=1.0, flags=FLAG_CORRECT | FLAG_SEARCH)
    short = Trace(problem_id=12, iteration=0, tokens=np.array([3, 4, 5], np.int32), prompt_len=1,
                  step_ends=np.array([3], np.int32), step_values=np.array([0.5], np.float32),
                  reward=0.0, flags=FLAG_BASELINE)
    return [long, short]


def test_padded_batch_hand_checked(tmp_path):
    store = TraceStore.create(tmp_path / "s")
    store.append(_small_traces())
    batch = store.padded_batch([0, 1], max_len=7, pad_id=-1)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 8, 9, 10, -1], [3, 4, 5, -1, -1, -1, -1]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["value_targets"], [[0, 0, 0, 0.25, 0, 1.0, 0], [0, 0, 0.5, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["value_mask"], [[0, 0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["reward"], [1.0, 0.0])
    np.testing.assert_array_equal(batch["problem_id"], [11, 12])
    assert batch["tokens"].dtype == np.int32 and batch["value_targets"].dtype == np.float32
    with pytest.raises(ValueError, match="max_len"):
        pad_traces(_small_traces(), max_len=0)


def test_a_trace_longer_than_max_len_is_an_error_never_cut():
    with pytest.raises(TooLongError, match=r"1 trace\(s\) \(the first of problem 11\) longer than max_len = 5 "
                                           r"\(the first has 6 tokens\)") as e:
        pad_traces(_small_traces(), max_len=5)
    assert e.value.rows == [0] and e.value.lengths == [6]


def test_nan_step_value_means_no_target(tmp_path):
    long, short = _small_traces()
    long.step_values = np.array([np.nan, 1.0], np.float32)
    store = TraceStore.create(tmp_path / "s")
    store.append([long, short])
    assert_same(TraceStore(tmp_path / "s").read([0, 1]), [long, short])  # NaN survives the round trip
    batch = store.padded_batch([0, 1], max_len=6)
    np.testing.assert_array_equal(batch["value_targets"], [[0, 0, 0, 0, 0, 1.0], [0, 0, 0.5, 0, 0, 0]])
    np.testing.assert_array_equal(batch["value_mask"], [[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]])


@pytest.mark.parametrize("mesh_shape, axes, batch_axes", [
    ((8,), ("data",), "data"),
    ((2, 4), ("data", "fsdp"), ("data", "fsdp")),
])
def test_sharded_batch(tmp_path, mesh_shape, axes, batch_axes):
    traces = [dataclasses.replace(t, problem_id=1000 + i) for i, t in enumerate(random_traces(6, 40))]
    traces[0].problem_id = 2**40  # does not fit jax's default int32
    store = TraceStore.create(tmp_path / "s")
    store.append(traces)
    mesh = jax.make_mesh(mesh_shape, axes)
    sharding = NamedSharding(mesh, P(batch_axes, None))
    indices = np.arange(39, 23, -1)  # 16 rows, out of order
    got = store.sharded_batch(indices, max_len=304, sharding=sharding)
    want = store.padded_batch(indices, max_len=304)
    assert set(got) == set(want)
    for key, value in got.items():
        assert isinstance(value, jax.Array) and value.shape == want[key].shape
        expected = sharding if value.ndim == 2 else NamedSharding(mesh, P(batch_axes))
        assert value.sharding.is_equivalent_to(expected, value.ndim), key
        assert len(value.addressable_shards) == 8 and value.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)
    with pytest.raises(ValueError, match="not divisible by 8 shards"):
        store.sharded_batch(np.arange(12), max_len=64, sharding=sharding)
    with pytest.raises(ValueError, match="problem_id out of int32 range"):
        store.sharded_batch(np.arange(8), max_len=304, sharding=sharding)


def _bad(field, value):
    return [random_traces(7, 1)[0], Trace(**{**vars(_small_traces()[0]), field: value})]


@pytest.mark.parametrize("field, value, message", [
    ("step_ends", np.array([4, 4]), "step_ends must be strictly increasing"),
    ("step_ends", np.array([4, 7]), "step_ends must be <= len"),
    ("step_ends", np.array([2, 4]), "step_ends must end after the prompt"),
    ("step_values", np.array([0.5]), "step_values has shape"),
    ("step_values", np.array([0.5, np.inf]), "step_values must be finite or NaN"),
    ("step_values", np.array([-np.inf, 0.5]), "step_values must be finite or NaN"),
    ("prompt_len", 7, "prompt_len must be an integer in"),
    ("tokens", np.array([[1, 2]]), "tokens must be 1-D"),
    ("reward", float("inf"), "reward must be finite"),
])
def test_validation_names_field_and_position(tmp_path, field, value, message):
    store = TraceStore.create(tmp_path / "s")
    with pytest.raises(ValueError, match=f"trace 1 in the batch: {message}"):
        store.append(_bad(field, value))
    assert len(store) == 0 and len(TraceStore(tmp_path / "s")) == 0  # nothing of the batch is committed


def test_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "plain")):
        TraceStore(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="is not a jaxreason trace store"):
        TraceStore(tmp_path / "missing", mode="a")
    assert not (tmp_path / "plain" / "writer.lock").exists()
    (tmp_path / "plain" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        TraceStore.create(tmp_path / "plain")


def test_second_writer_is_refused(tmp_path):
    writer = TraceStore.create(tmp_path / "s")
    with pytest.raises(TraceStoreLockedError, match="already open for appending"):
        TraceStore(tmp_path / "s", mode="a")
    TraceStore(tmp_path / "s").select()  # readers take no lock
    writer.close()
    with TraceStore(tmp_path / "s", mode="a") as second:
        second.append(random_traces(8, 3))
        assert len(second) == 3


# Appends two committed batches, then dies by SIGKILL inside the third append at the exact moment the
# manifest would be replaced: all of the batch's data and the new manifest's temp file are on disk.
_CRASHING_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from test_trace_store import random_traces
from jaxreason.data.trace_store import TraceStore
store = TraceStore.create(sys.argv[1])
store.append(random_traces(10, 50))
store.append(random_traces(11, 70))
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
store.append(random_traces(12, 800))
"""


def test_writer_killed_mid_append_leaves_only_committed_rows(tmp_path):
    path = tmp_path / "s"
    done = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(path), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    committed = random_traces(10, 50) + random_traces(11, 70)
    assert (path / "manifest.json.tmp").exists()  # it died after writing everything but the rename
    reader = TraceStore(path)
    assert len(reader) == 120
    assert reader._arrays["tokens"].shape[0] > sum(len(t.tokens) for t in committed)  # tail is on disk
    assert_same(reader.read(range(120)), committed)

    with TraceStore(path, mode="a") as writer:  # the dead writer's lock died with it
        late = random_traces(13, 30)
        writer.append(late)  # overwrites the uncommitted tail
    assert reader.refresh() == 150
    assert_same(reader.read(range(150)), committed + late)
    assert_same(TraceStore(path).read(range(150)), committed + late)
