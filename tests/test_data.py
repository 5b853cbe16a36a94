"""The data stage: sampling, the chat schema, formats, reuse, and losing nothing on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from automation.data import check_row, prepare_data, read_jsonl, sample_size
from automation.errors import ConfigError, DataError
from tests.conftest import chat_row, write_jsonl

REQUIRED = {"train_split": "train_sft", "test_split": "test_sft", "sample_split": "test_gen"}
SFT = {"train_sft", "test_sft"}


def run(folder: Path, out: Path, percent: float = 100, **kwargs):
    return prepare_data(dataset=str(folder), sample_percent=percent, required_splits=REQUIRED, sft_splits=SFT,
                        out_dir=out, search_from=[Path.cwd()], progress=False, **kwargs)


def test_takes_the_first_percent_of_every_split_in_order(chat_dataset, tmp_path):
    result = run(chat_dataset, tmp_path / "out", percent=25)
    assert {s: st.rows for s, st in result.splits.items()} == {
        "train_sft": 10, "test_sft": 2, "train_gen": 2, "test_gen": 2}  # 25 % of 40 and of 10 (2.5 -> 2)
    rows = read_jsonl(tmp_path / "out" / "train_sft.jsonl")
    assert [r["prompt"] for r in rows] == [f"train_sft question {i}?" for i in range(10)]
    assert result.splits["train_sft"].source_rows == 40


@pytest.mark.parametrize(("total", "percent", "expected"), [(207865, 5, 10393), (23110, 5, 1156), (10, 25, 2),
                                                              (10, 35, 4), (3, 100, 3), (1, 1, 0)])
def test_sample_size_matches_datasets_percent_slicing(total, percent, expected):
    assert sample_size(total, percent) == expected


def test_stats_count_turns_and_lengths(tmp_path):
    folder = tmp_path / "d"
    write_jsonl(folder / "train_sft.jsonl", [chat_row("q1", "a1"), chat_row("q2", "a2", "q3", "a3")])
    write_jsonl(folder / "test_sft.jsonl", [chat_row("q", "a")])
    write_jsonl(folder / "test_gen.jsonl", [chat_row("q", "a")])
    stats = run(folder, tmp_path / "out").splits["train_sft"]
    assert stats.rows == 2 and stats.user_turns_max == 2 and stats.user_turns_mean == 1.5
    assert stats.chars_p50 == 4 and stats.chars_p99 == 8


def test_rerun_with_unchanged_inputs_reuses_the_output(chat_dataset, tmp_path):
    first = run(chat_dataset, tmp_path / "out")
    stamp = (tmp_path / "out" / "train_sft.jsonl").stat().st_mtime_ns
    second = run(chat_dataset, tmp_path / "out")
    assert not first.reused and second.reused
    assert (tmp_path / "out" / "train_sft.jsonl").stat().st_mtime_ns == stamp
    assert second.splits == first.splits
    third = run(chat_dataset, tmp_path / "out", percent=50)  # changed input: recomputed
    assert not third.reused and third.splits["train_sft"].rows == 20


def test_tampered_output_is_rebuilt(chat_dataset, tmp_path):
    run(chat_dataset, tmp_path / "out")
    (tmp_path / "out" / "test_sft.jsonl").write_text("")
    assert not run(chat_dataset, tmp_path / "out").reused
    assert len(read_jsonl(tmp_path / "out" / "test_sft.jsonl")) == 10


def test_output_is_deterministic(chat_dataset, tmp_path):
    run(chat_dataset, tmp_path / "a")
    run(chat_dataset, tmp_path / "b")
    for split in ("train_sft", "test_sft", "train_gen", "test_gen"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()


BROKEN = [
    "{not json",
    {"prompt": "q", "prompt_id": "abc", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"prompt": "q", "prompt_id": "0" * 64, "messages": [{"role": "assistant", "content": "a"}]},
    {"prompt": "q", "prompt_id": "0" * 64, "messages": [{"role": "user", "content": "q"}]},
    {"prompt": "", "prompt_id": "0" * 64, "messages": []},
    {"prompt": "q", "prompt_id": "0" * 64, "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
    [1, 2],
]


def broken_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    good = [chat_row(f"q{i}", f"a{i}") for i in range(5)]
    write_jsonl(folder / "train_sft.jsonl", good[:2] + BROKEN + good[2:])
    write_jsonl(folder / "test_sft.jsonl", good)
    write_jsonl(folder / "test_gen.jsonl", [chat_row("only a question")])  # fine: not an SFT split
    return folder


def test_bad_rows_fail_the_stage_with_split_and_row_numbers(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        run(broken_dataset(tmp_path), out)
    message = str(caught.value)
    assert "7 invalid row(s) in split 'train_sft'" in message
    for expected in ["train_sft row 2: not valid JSON",
                     "train_sft row 3: prompt_id must be a 64-character lowercase hex sha256",
                     "train_sft row 4: messages[0].role is 'assistant', expected 'user'",
                     "train_sft row 5: SFT rows must end with an assistant message",
                     "train_sft row 6: prompt must be a non-empty string; messages must be a non-empty list",
                     "train_sft row 7: messages[0].content must be a non-empty string",
                     "train_sft row 8: row is a list"]:
        assert expected in message
    assert "--drop-invalid" in message
    assert not out.exists() or not list(out.glob("*.jsonl")), "nothing half-written"


def test_failed_run_keeps_the_previous_output(chat_dataset, tmp_path):
    out = tmp_path / "out"
    run(chat_dataset, out)
    before = (out / "train_sft.jsonl").read_bytes()
    with pytest.raises(DataError):
        run(broken_dataset(tmp_path), out)
    assert (out / "train_sft.jsonl").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


def test_drop_invalid_drops_and_counts(tmp_path):
    result = run(broken_dataset(tmp_path), tmp_path / "out", drop_invalid=True)
    assert result.splits["train_sft"].rows == 5 and result.splits["train_sft"].dropped == 7
    assert all(not check_row(r, sft=True) for r in read_jsonl(tmp_path / "out" / "train_sft.jsonl"))


def test_parquet_in_the_hub_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hub-layout"
    (folder / "data").mkdir(parents=True)
    for split, n in {"train_sft": 20, "test_sft": 4, "test_gen": 4}.items():
        table = pa.Table.from_pylist([chat_row(f"{split} {i}", "answer") for i in range(n)])
        pq.write_table(table, folder / "data" / f"{split}-00000-of-00001-0123abcd.parquet")
    result = run(folder, tmp_path / "out", percent=50)
    assert {s: st.rows for s, st in result.splits.items()} == {"train_sft": 10, "test_sft": 2, "test_gen": 2}
    assert read_jsonl(tmp_path / "out" / "test_gen.jsonl")[0]["prompt"] == "test_gen 0"


def test_folder_per_split_layout(tmp_path):
    folder = tmp_path / "per-split"
    for split in ("train_sft", "test_sft", "test_gen"):
        write_jsonl(folder / split / "part-0.jsonl", [chat_row(f"{split} a", "x")])
        write_jsonl(folder / split / "part-1.jsonl", [chat_row(f"{split} b", "y")])
    result = run(folder, tmp_path / "out")
    assert result.splits["train_sft"].rows == 2


def test_missing_split_lists_what_exists(chat_dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"data.sample_split='nope' not found .* it has: test_gen, test_sft, train_gen, train_sft"):
        prepare_data(dataset=str(chat_dataset), sample_percent=100, required_splits=dict(REQUIRED, sample_split="nope"),
                     sft_splits=SFT, out_dir=tmp_path / "o", search_from=[Path.cwd()], progress=False)


def test_percent_selecting_nothing_is_an_error(chat_dataset, tmp_path):
    with pytest.raises(ConfigError, match="selects no rows"):
        run(chat_dataset, tmp_path / "out", percent=1)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such folder .* and not a hub id"):
        run(Path("definitely not here"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .* split files"):
        run(tmp_path / "empty", tmp_path / "out")


def test_large_split_streams_only_the_sample(tmp_path):
    """Only the sampled rows are parsed: a corrupt tail beyond the sample does not matter."""
    folder = tmp_path / "big"
    rows = [json.dumps(chat_row(f"q{i}", "a")) for i in range(1000)] + ["{corrupt"] * 1000
    write_jsonl(folder / "train_sft.jsonl", rows)
    write_jsonl(folder / "test_sft.jsonl", [chat_row("q", "a")] * 2)
    write_jsonl(folder / "test_gen.jsonl", [chat_row("q", "a")] * 2)
    result = run(folder, tmp_path / "out", percent=50)
    assert result.splits["train_sft"].rows == 1000 and result.splits["train_sft"].source_rows == 2000


# ---------------------------------------------------------------------------------------------
# The process pool: large inputs are processed one split per worker process. `pool_min_bytes=0`
# sends even these small datasets to the pool; `_usable_cpus` is pinned to 2 so the pool is used
# on a one-CPU machine too.

IN_PROCESS = 1 << 62  # a threshold no test dataset reaches


@pytest.fixture
def pool_spy(monkeypatch):
    """Two CPUs, and a record of the runs that went through the pool."""
    import automation.data as data

    calls = []
    real = data._in_pool

    def spy(jobs, workers, progress):
        calls.append(workers)
        return real(jobs, workers, progress)

    monkeypatch.setattr(data, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(data, "_in_pool", spy)
    return calls


def mixed_dataset(tmp_path: Path) -> Path:
    """Four splits in three layouts (JSONL, parquet, a folder of parts), non-ASCII text, a few bad rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "mixed"
    rows = [chat_row(f"question {i} — café ☕ {'x' * (i % 7)}?", f"answer {i} ü", f"more {i}", f"fin {i}")
            for i in range(60)]
    write_jsonl(folder / "train_sft.jsonl", rows[:25] + BROKEN[:3] + rows[25:40])
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[40:52]), folder / "data" / "test_sft-00000-of-00001-ab.parquet")
    write_jsonl(folder / "train_gen" / "part-0.jsonl", [chat_row(f"gen {i} 日本") for i in range(9)])
    write_jsonl(folder / "train_gen" / "part-1.jsonl", [chat_row(f"gen {i}") for i in range(9, 15)])
    write_jsonl(folder / "test_gen.jsonl", [chat_row(f"tg {i}") for i in range(7)])
    return folder


def output_files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.mark.parametrize("percent", [100, 60])
def test_pool_output_is_byte_identical_to_in_process(tmp_path, pool_spy, percent):
    folder = mixed_dataset(tmp_path)
    alone = run(folder, tmp_path / "alone", percent=percent, drop_invalid=True, pool_min_bytes=IN_PROCESS)
    assert pool_spy == []
    pooled = run(folder, tmp_path / "pooled", percent=percent, drop_invalid=True, pool_min_bytes=0)
    assert pool_spy == [2]
    assert output_files(tmp_path / "pooled") == output_files(tmp_path / "alone")  # manifest included
    assert set(output_files(tmp_path / "pooled")) == {"manifest.json", "train_sft.jsonl", "test_sft.jsonl",
                                                      "train_gen.jsonl", "test_gen.jsonl"}
    assert pooled.splits == alone.splits and list(pooled.splits) == list(alone.splits)
    assert pooled.splits["train_sft"].dropped == (3 if percent == 100 else 1)  # 60 % of 43 rows: 25 good, 1 bad


def test_pool_reports_bad_rows_by_split_and_row_number(tmp_path, pool_spy):
    folder = broken_dataset(tmp_path)
    with pytest.raises(DataError) as alone:
        run(folder, tmp_path / "alone", pool_min_bytes=IN_PROCESS)
    with pytest.raises(DataError) as pooled:
        run(folder, tmp_path / "pooled", pool_min_bytes=0)
    assert pool_spy == [2]
    assert str(pooled.value) == str(alone.value)
    assert "7 invalid row(s) in split 'train_sft'" in str(pooled.value)
    assert "train_sft row 4: messages[0].role is 'assistant', expected 'user'" in str(pooled.value)
    assert not list((tmp_path / "pooled").iterdir()), "nothing half-written"
    dropped = run(folder, tmp_path / "dropped", drop_invalid=True, pool_min_bytes=0)
    assert dropped.splits["train_sft"].rows == 5 and dropped.splits["train_sft"].dropped == 7


def test_pool_failure_keeps_the_previous_output(chat_dataset, tmp_path, pool_spy):
    out = tmp_path / "out"
    run(chat_dataset, out, pool_min_bytes=0)
    before = output_files(out)
    # A worker raising something other than DataError: undecodable bytes in one split, while the
    # other workers write theirs in full.
    (chat_dataset / "train_gen.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(UnicodeDecodeError) as alone:
        run(chat_dataset, tmp_path / "alone", pool_min_bytes=IN_PROCESS)
    with pytest.raises(UnicodeDecodeError) as pooled:
        run(chat_dataset, out, pool_min_bytes=0)
    assert str(pooled.value) == str(alone.value)
    assert output_files(out) == before
    assert not list(out.glob(".*.tmp"))
    # An error the worker raises on purpose comes back as the same type with the same message.
    with pytest.raises(ConfigError, match=r"sample_percent=1 of split 'test_gen' \(10 rows\) selects no rows"):
        run(chat_dataset, out, percent=1, pool_min_bytes=0)
    assert output_files(out) == before and len(pool_spy) == 3


def test_pool_progress_counts_rows_in_shared_memory(tmp_path, monkeypatch, pool_spy):
    """With progress on, workers count a long split's rows into memory the parent reads to draw its bars."""
    import automation.data as data

    seen = []
    real = data._PoolProgress.__init__

    def spy(self, counters, labels):
        seen.append((counters, labels))
        real(self, counters, labels)

    monkeypatch.setattr(data._PoolProgress, "__init__", spy)
    folder = tmp_path / "long"
    write_jsonl(folder / "train_sft.jsonl", [json.dumps(chat_row(f"q{i}", "a")) for i in range(data.PROGRESS_MIN_ROWS + 1)])
    write_jsonl(folder / "test_sft.jsonl", [chat_row("q", "a")])
    write_jsonl(folder / "test_gen.jsonl", [chat_row("q", "a")])
    prepare_data(dataset=str(folder), sample_percent=100, required_splits=REQUIRED, sft_splits=SFT,
                 out_dir=tmp_path / "out", search_from=[Path.cwd()], progress=True, pool_min_bytes=0)
    [(counters, labels)] = seen
    slot = labels.index("train_sft")
    assert list(counters[2 * slot: 2 * slot + 2]) == [data.PROGRESS_MIN_ROWS + 1] * 2
    assert sum(counters[2 * labels.index("test_sft"): 2 * labels.index("test_sft") + 2]) == 0  # too short for a bar


def test_pool_falls_back_to_this_process_when_workers_die(chat_dataset, tmp_path, monkeypatch, pool_spy, caplog):
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    class DeadPool:
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            return future

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    run(chat_dataset, tmp_path / "alone", pool_min_bytes=IN_PROCESS)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", DeadPool)
    run(chat_dataset, tmp_path / "fallback", pool_min_bytes=0)
    assert pool_spy == [2] and "worker processes failed" in caplog.text
    assert output_files(tmp_path / "fallback") == {
        name: content for name, content in output_files(tmp_path / "alone").items()}


def test_when_the_pool_is_used(tmp_path, monkeypatch):
    import automation.data as data
    from automation.data import POOL_MIN_BYTES, Source, _pool_workers, _SplitJob

    def jobs(source, splits, percent=100):
        return [_SplitJob(source=source, split=s, percent=percent, tmp=tmp_path / f".{s}.tmp", sft=False,
                          required=True, drop_invalid=False, progress=False, slot=i) for i, s in enumerate(splits)]

    big = tmp_path / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(POOL_MIN_BYTES)  # sparse: its size is all that is read
    local = Source("local", files={"a": [big], "b": [big], "c": [big]})
    monkeypatch.setattr(data, "_usable_cpus", lambda: 2)
    assert _pool_workers(local, jobs(local, "abc"), POOL_MIN_BYTES) == 2  # min(3 splits, 2 CPUs)
    assert _pool_workers(local, jobs(local, "a"), 0) == 0  # one split
    assert _pool_workers(local, jobs(local, "abc", percent=1), POOL_MIN_BYTES) == 0  # little to read
    hub = Source("hub:org/name", hub_id="org/name")
    assert _pool_workers(hub, jobs(hub, "abc"), 0) == 0  # streamed from the hub: in-process
    monkeypatch.setattr(data, "_usable_cpus", lambda: 1)
    assert _pool_workers(local, jobs(local, "abc"), 0) == 0  # one CPU


def test_the_sample_dataset_stays_in_process(tmp_path, pool_spy):
    result = run(Path(__file__).resolve().parent.parent / "data" / "ultrachat-sample", tmp_path / "out")
    assert pool_spy == [] and sum(s.rows for s in result.splits.values()) == 260


def test_errors_survive_pickling():
    """Errors raised in a worker process are pickled to reach the caller: same type, same message."""
    import pickle

    from automation.data import _survives_pickling
    from automation.errors import AutomationError, BackendError, ExperimentInvalid, Issue

    issues = [Issue("a.yaml", 3, "data.sample_percent", "must be > 0"), Issue("a.yaml", None, "", "bad")]
    for err in [AutomationError("x"), ConfigError("c"), DataError("d\ne"), BackendError("b"), ExperimentInvalid(issues)]:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err) and _survives_pickling(err)
    assert pickle.loads(pickle.dumps(ExperimentInvalid(issues))).issues == issues

    class Odd(Exception):
        def __init__(self, code: int, detail: str):
            super().__init__(f"{code}: {detail}")

    assert not _survives_pickling(Odd(1, "a"))  # the worker sends it as a DataError instead
