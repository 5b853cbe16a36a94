"""The data stage: the first N % of every split of a chat dataset, checked and written as JSONL.

This is the reference flow's download step (`load_dataset(id, split="train_sft[0%:5%]")` then
`to_json`), made safe for a pipeline:

- sources: a Hugging Face hub id (through `datasets`, streamed), or a local folder with
  `{split}.jsonl` / `{split}.parquet` files, a `data/` folder in the hub's layout
  (`data/{split}-00000-of-00001.parquet`), or one sub-folder per split;
- memory is bounded by the sample: row counts come from file metadata (parquet) or a byte scan
  (JSONL), and only the first rows are parsed;
- rows in the ultrachat_200k, OpenAI or ShareGPT format (chat_rows.py; detected, or as
  `data.format` says) are checked and written in one form, ultrachat_200k's with an optional
  system message first; bad rows are reported with split, row number and what is wrong, and fail
  the stage unless `drop_invalid`;
- outputs are written atomically next to a manifest; a rerun with the same inputs reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from automation.chat_rows import (
    DETECT_ROWS,
    ChatFormat,
    ChatOptions,
    canonical,
    check,
    check_row,
    check_written,
)
from automation.errors import ConfigError, DataError
from automation.workspace import write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: data.format, columns, roles and system_message; the format in the stats
SUFFIXES = (".jsonl", ".json", ".parquet")
__all__ = ["check_row", "prepare_data", "read_jsonl", "sample_size"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_REPORTED_BAD_ROWS = 20
PROGRESS_MIN_ROWS = 20_000  # splits sampled to fewer rows get no progress bar
WRITE_BUFFER = 1 << 20  # bytes of a split's output buffered between writes

# The splits are independent, so they are processed in a pool of worker processes (one per split,
# at most one per CPU) when the work adds up to at least this many bytes: the sampled share of the
# split files (sample_percent of their sizes: parsed, checked, written), plus their whole size x
# SCAN_COST for JSONL (the line count reads every byte, ~14x faster than parsing). Below it,
# starting the workers ("spawn": a fresh interpreter importing this module, ~0.1-0.2 s) would cost
# about what it saves: one process checks ~130-160 MB/s, so 64 MiB is ~0.5 s of work. The bundled
# sample (~1 MB) stays in-process; a 2 GB dataset at 5 % or more goes to the pool.
POOL_MIN_BYTES = 64 << 20
SCAN_COST = 1 / 14


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """Where the dataset's splits are: local files per split, or a hub id."""

    description: str
    files: dict[str, list[Path]] = field(default_factory=dict)
    hub_id: str | None = None

    @property
    def splits(self) -> list[str]:
        if self.hub_id:
            return list(_hub_split_sizes(self.hub_id))
        return sorted(self.files)

    def fingerprint(self) -> dict[str, Any]:
        if self.hub_id:
            return {"hub_id": self.hub_id}
        return {split: [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
                for split, files in sorted(self.files.items())}


def _split_of(file: Path) -> str:
    """`train_sft-00000-of-00001-abc.parquet` -> `train_sft`; `test_gen.jsonl` -> `test_gen`."""
    stem = file.name[: -len(file.suffix)]
    return re.split(r"-\d{5}-of-\d{5}", stem)[0]


def discover_local(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for base in (folder, folder / "data"):
        if not base.is_dir():
            continue
        for entry in sorted(base.iterdir()):
            if entry.is_file() and entry.suffix in SUFFIXES:
                found.setdefault(_split_of(entry), []).append(entry)
            elif entry.is_dir() and base == folder and entry.name != "data":
                files = sorted(f for f in entry.iterdir() if f.is_file() and f.suffix in SUFFIXES)
                if files:
                    found.setdefault(entry.name, []).extend(files)
    return found


def resolve_source(dataset: str, search_from: list[Path]) -> Source:
    """A local folder (tried relative to each of `search_from`) or else a hub id."""
    candidates = [Path(dataset)] if Path(dataset).is_absolute() else [base / dataset for base in search_from]
    for folder in candidates:
        if folder.is_dir():
            files = discover_local(folder)
            if not files:
                raise ConfigError(f"data.dataset {dataset!r}: folder {folder} holds no "
                                  f"{'/'.join(SUFFIXES)} split files (expected e.g. train_sft.jsonl)")
            return Source(description=str(folder), files=files)
    if _HUB_ID.match(dataset):
        return Source(description=f"hub:{dataset}", hub_id=dataset)
    raise ConfigError(f"data.dataset {dataset!r}: no such folder (looked in "
                      f"{', '.join(str(c) for c in candidates)}) and not a hub id of the form org/name")


def _hub_split_sizes(hub_id: str) -> dict[str, int]:
    from datasets import load_dataset_builder

    try:
        info = load_dataset_builder(hub_id).info
    except Exception as err:  # datasets raises many kinds (offline, not found, auth)
        raise DataError(f"cannot read dataset {hub_id!r} from the hub: {err}. Without network "
                        "(HF_HUB_OFFLINE=1), point data.dataset at a local folder.") from err
    if not info.splits:
        raise DataError(f"dataset {hub_id!r} publishes no split sizes; download it and use the local folder")
    return {name: split.num_examples for name, split in info.splits.items()}


def _count_jsonl(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def count_rows(source: Source, split: str) -> int:
    if source.hub_id:
        return _hub_split_sizes(source.hub_id)[split]
    total = 0
    for file in source.files[split]:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(file).metadata.num_rows
        else:
            total += _count_jsonl(file)
    return total


def iter_rows(source: Source, split: str, limit: int) -> Iterator[tuple[Any, str | None]]:
    """The first `limit` rows of a split, in order, each with its line when the source is JSONL
    (newline-terminated, written out as it is: re-serialising was a third of the stage's time at
    full scale); an unparseable line yields the exception."""
    if limit <= 0:
        return
    if source.hub_id:
        from datasets import load_dataset

        stream = load_dataset(source.hub_id, split=split, streaming=True)
        for row in stream.take(limit):
            yield row, None
        return
    produced = 0
    for file in source.files[split]:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(file).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield row, None
                    produced += 1
                    if produced >= limit:
                        return
            continue
        with file.open("r", encoding="utf-8") as handle:
            # Read with universal newlines, so every line ends in one "\n" (the last may have
            # none): JSON's trailing whitespace, parsed as it is rather than copied without it.
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield _parse_error(line.rstrip("\r\n")), None
                else:
                    yield row, line if line.endswith("\n") else line + "\n"
                produced += 1
                if produced >= limit:
                    return


def _parse_error(text: str) -> ValueError:
    """What is wrong with a line that is not JSON, its column counted in the line itself."""
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return ValueError(f"not valid JSON: {err.msg} at column {err.colno}")
    raise AssertionError("a line that is not JSON with its newline parsed without it")


def sample_size(total: int, percent: float) -> int:
    """Rows of `split[0%:N%]`, rounded to the closest row as `datasets` does."""
    return int(round(total * percent / 100.0))


# ---------------------------------------------------------------------------------------------
# Statistics


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[rank]


@dataclass
class SplitStats:
    split: str
    rows: int
    source_rows: int
    dropped: int = 0
    user_turns_mean: float = 0.0
    user_turns_max: int = 0
    chars_p50: int = 0
    chars_p90: int = 0
    chars_p99: int = 0
    sha256: str = ""
    format: str = ""  # the format the rows were read in (chat_rows.FORMATS)
    system_rows: int = 0  # kept rows with a system message

    @classmethod
    def of(cls, split: str, shapes: list[tuple[int, int]], source_rows: int, dropped: int, *, format: str = "",
           system_rows: int = 0) -> SplitStats:
        """`shapes`: (user turns, characters) of each kept row."""
        turns = [t for t, _ in shapes]
        lengths = sorted(c for _, c in shapes)
        return cls(
            split=split, rows=len(shapes), source_rows=source_rows, dropped=dropped, format=format,
            system_rows=system_rows,
            user_turns_mean=round(sum(turns) / len(turns), 2) if turns else 0.0,
            user_turns_max=max(turns, default=0),
            chars_p50=_percentile(lengths, 50), chars_p90=_percentile(lengths, 90),
            chars_p99=_percentile(lengths, 99),
        )


@dataclass
class DataResult:
    out_dir: Path
    splits: dict[str, SplitStats]
    reused: bool
    source: str

    def file(self, split: str) -> Path:
        return self.out_dir / f"{split}.jsonl"


# ---------------------------------------------------------------------------------------------
# The stage


def prepare_data(
    *,
    dataset: str,
    sample_percent: float,
    required_splits: dict[str, str],
    sft_splits: set[str],
    out_dir: Path,
    search_from: list[Path],
    drop_invalid: bool = False,
    progress: bool = True,
    pool_min_bytes: int | None = None,
    chat: ChatOptions | None = None,
) -> DataResult:
    """Sample, check and write every split. `required_splits` maps role (train_split, ...) to name;
    `chat` says the rows' format and names (default: detected, the usual names).

    The splits are processed in parallel worker processes when the input is large (see
    `POOL_MIN_BYTES`, which `pool_min_bytes` overrides); the outputs are the same either way."""
    source = resolve_source(dataset, search_from)
    available = source.splits
    missing = {role: name for role, name in required_splits.items() if name not in available}
    if missing:
        listing = ", ".join(f"data.{role}={name!r}" for role, name in missing.items())
        raise ConfigError(f"{listing} not found in {source.description}; it has: {', '.join(available)}")

    chat = chat or ChatOptions()
    fingerprint = _fingerprint(source, sample_percent, drop_invalid, sft_splits, chat)
    manifest_path = out_dir / "manifest.json"
    reused = _reusable(manifest_path, fingerprint, out_dir)
    if reused is not None:
        log.info("data unchanged since the last run; reusing %s", out_dir)
        return DataResult(out_dir, reused, True, source.description)

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [_SplitJob(source=source, split=split, percent=sample_percent, tmp=out_dir / f".{split}.jsonl.tmp",
                      sft=split in sft_splits, required=split in required_splits.values(),
                      drop_invalid=drop_invalid, progress=progress, slot=slot, chat=chat)
            for slot, split in enumerate(available)]
    stats: dict[str, SplitStats] = {}
    failures: list[str] = []
    try:
        workers = _pool_workers(source, jobs, POOL_MIN_BYTES if pool_min_bytes is None else pool_min_bytes)
        results = _in_pool(jobs, workers, progress) if workers > 1 else _in_process(jobs)
        # In split order whichever way they were computed, so the first error raised, the order of
        # the failures and the warnings are those of a run that does the splits one by one.
        with contextlib.closing(results):
            for split, done in results:
                log.info("data: split %r read in the %s format (%s)", split, done.stats.format, done.format_reason)
                if done.bad_count and not drop_invalid:
                    shown = "\n".join(f"  {split} row {index}: {'; '.join(p)}" for index, p in done.bad_shown)
                    more = (f"\n  ... and {done.bad_count - MAX_REPORTED_BAD_ROWS} more"
                            if done.bad_count > MAX_REPORTED_BAD_ROWS else "")
                    failures.append(f"{done.bad_count} invalid row(s) in split {split!r} ({done.stats.format} "
                                    f"format, {done.format_reason}):\n{shown}{more}")
                if done.bad_count and drop_invalid:
                    log.warning("dropped %d invalid row(s) of split %r", done.bad_count, split)
                stats[split] = done.stats
        if failures:
            raise DataError("\n".join(failures) + "\nFix the rows, or rerun with --drop-invalid to drop them.")
        for role, name in required_splits.items():
            if stats[name].rows == 0:
                raise DataError(f"split {name!r} ({role}) has no valid rows left")
        for job in jobs:
            os.replace(job.tmp, out_dir / f"{job.split}.jsonl")
        manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "source": source.description,
                    "splits": {s: asdict(v) for s, v in stats.items()}}
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        # Every split's temporary file, written in full or in part (none is left once renamed);
        # the pool, if any, is shut down by now, so no worker is still writing one.
        for job in jobs:
            job.tmp.unlink(missing_ok=True)
    return DataResult(out_dir, stats, False, source.description)


@dataclass(frozen=True)
class _SplitJob:
    """One split's work: count, sample, check, write `tmp`. Picklable, to run in a worker."""

    source: Source
    split: str
    percent: float
    tmp: Path
    sft: bool
    required: bool
    drop_invalid: bool
    progress: bool
    slot: int  # the split's index: its place in the shared progress counters of a pool
    chat: ChatOptions = ChatOptions()


@dataclass
class _SplitDone:
    stats: SplitStats
    bad_count: int
    bad_shown: list[tuple[int, list[str]]]  # the first MAX_REPORTED_BAD_ROWS bad rows
    format_reason: str = ""  # why the split was read in its format


def _run_split(job: _SplitJob) -> _SplitDone:
    total = count_rows(job.source, job.split)
    limit = sample_size(total, job.percent)
    if limit == 0 and job.required:
        raise ConfigError(f"data.sample_percent={job.percent:g} of split {job.split!r} "
                          f"({total} rows) selects no rows; raise sample_percent")
    if _worker_counters is not None:
        reporter = _shared_progress(_worker_counters, job.slot, limit, enabled=job.progress)
    else:
        reporter = None
    rows = iter_rows(job.source, job.split, limit)
    # The format is told from the first rows, which are then processed with the rest.
    head = list(itertools.islice(rows, DETECT_ROWS))
    fmt, reason = job.chat.detect(row for row, _ in head if not isinstance(row, Exception))
    kept, bad, system_rows = _write_split(itertools.chain(head, rows), job.split, limit, job.tmp, fmt,
                                          sft=job.sft, progress=job.progress, reporter=reporter)
    stats = SplitStats.of(job.split, kept, source_rows=total, dropped=len(bad) if job.drop_invalid else 0,
                          format=fmt.name, system_rows=system_rows)
    stats.sha256 = file_sha256(job.tmp)
    return _SplitDone(stats, len(bad), bad[:MAX_REPORTED_BAD_ROWS], reason)


def _write_split(rows: Iterator[tuple[Any, str | None]], split: str, limit: int, tmp: Path, fmt: ChatFormat, *,
                 sft: bool, progress: bool, reporter=None
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, list[str]]], int]:
    """Write the split's valid rows (of its first `limit`) to `tmp` in the written form;
    (user turns, characters) of each kept row, (row number, problems) of each bad one, and how
    many kept rows have a system message."""
    kept: list[tuple[int, int]] = []
    bad: list[tuple[int, list[str]]] = []
    bar = reporter if reporter is not None else _progress(f"{split}", limit, enabled=progress)
    # A 1 MiB buffer: with the default (8 KiB) nearly every row of a few KiB was a write(2) of its
    # own, ~4.5 us of the ~32 us a row of ultrachat costs (bench/RESULTS.md, issue 15).
    with tmp.open("w", encoding="utf-8", buffering=WRITE_BUFFER) as out, bar as advance:
        if fmt.is_canonical:
            system_rows = _write_as_read(rows, out, advance, kept, bad, sft)
        else:
            system_rows = _write_mapped(rows, fmt, out, advance, kept, bad, sft)
    return kept, bad, system_rows


def _write_as_read(rows, out, advance, kept: list, bad: list, sft: bool) -> int:
    """`_write_split` for rows already in the written form: each goes out as the very line it
    came in (when the source is JSONL; re-serialising was a third of the stage's time at full
    scale). The data stage's hot loop on ultrachat-sized data: nothing in it that could be done
    once per split."""
    system_rows = 0
    write, keep = out.write, kept.append
    for index, (row, line) in enumerate(rows):
        if isinstance(row, Exception):
            bad.append((index, [str(row)]))
        else:
            problems, chars, turns, has_system = check_written(row, sft)
            if problems:
                bad.append((index, problems))
            else:
                write(line if line is not None else json.dumps(row, ensure_ascii=False) + "\n")
                system_rows += has_system
                keep((turns, chars))
        advance()
    return system_rows


def _write_mapped(rows, fmt: ChatFormat, out, advance, kept: list, bad: list, sft: bool) -> int:
    """`_write_split` for rows in another format (or with names mapped, or a system message to
    add): checked in `fmt`, then brought to the written form and serialised."""
    system_rows = 0
    for index, (row, _) in enumerate(rows):
        if isinstance(row, Exception):
            bad.append((index, [str(row)]))
            advance()
            continue
        problems, _, turns, system_text = check(row, fmt, sft=sft)
        if problems:
            bad.append((index, problems))
        else:
            written = canonical(row, fmt, system_text)
            out.write(json.dumps(written, ensure_ascii=False) + "\n")
            chars = sum(len(m["content"]) for m in written["messages"])  # with data.system_message
            system_rows += written["messages"][0]["role"] == "system"
            kept.append((turns, chars))
        advance()
    return system_rows


# ---------------------------------------------------------------------------------------------
# Running the splits: one by one in this process, or in a pool of worker processes


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pool_workers(source: Source, jobs: list[_SplitJob], min_bytes: int) -> int:
    """How many worker processes to use; 0 or 1: none, run in this process."""
    if source.hub_id:
        # Hub datasets are streamed through `datasets` (network, its cache, credentials):
        # awkward to reopen in every worker, and bounded by the network, not the CPU.
        return 0
    workers = min(len(jobs), _usable_cpus())
    if workers < 2:
        return 0
    return workers if sum(_split_work(job) for job in jobs) >= min_bytes else 0


def _split_work(job: _SplitJob) -> float:
    """The split's work, in bytes parsed (see POOL_MIN_BYTES)."""
    sampled = max(0.0, min(job.percent, 100.0)) / 100
    work = 0.0
    for file in job.source.files.get(job.split, []):
        size = file.stat().st_size
        work += size * sampled + (0 if file.suffix == ".parquet" else size * SCAN_COST)
    return work


def _in_process(jobs: list[_SplitJob]) -> Iterator[tuple[str, _SplitDone]]:
    for job in jobs:
        yield job.split, _run_split(job)


def _in_pool(jobs: list[_SplitJob], workers: int, progress: bool) -> Iterator[tuple[str, _SplitDone]]:
    """The splits' results in split order, computed by `workers` processes. Close the generator
    (contextlib.closing) so that, when the caller stops early, the splits not started are cancelled
    and the running ones finished before it goes on to delete their temporary files."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # "spawn": a fresh interpreter per worker, so no lock, thread or open file of this process
    # (logging, rich's refresh thread, a caller's own threads) is copied into the workers half-held,
    # as "fork" would; and it behaves the same on Linux and macOS.
    context = multiprocessing.get_context("spawn")
    # Per split: rows sampled (set when it gets a progress bar) and rows done, written by the
    # worker doing the split, read here to draw the bars. Plain shared memory, no lock: one writer
    # per slot, and a value read mid-update only misdraws a bar for 0.2 s.
    try:
        counters = context.RawArray("q", 2 * len(jobs)) if progress else None
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                   initializer=_init_worker, initargs=(counters,))
    except (OSError, ImportError, NotImplementedError) as err:  # no working semaphores here
        log.warning("data: cannot start worker processes (%s); processing the splits one by one", err)
        pool = None
    if pool is None:
        yield from _in_process(jobs)
        return
    bars = _PoolProgress(counters, [job.split for job in jobs]) if progress else None
    yielded = 0  # splits handed to the caller
    broken = None
    try:
        try:
            # Largest first, so that the small splits fill in at the end rather than a large one
            # starting last (with 4 splits on 2 workers, this is close to an even split of the work).
            futures = {job.split: pool.submit(_run_split_in_worker, job)
                       for job in sorted(jobs, key=_split_work, reverse=True)}
            for job in jobs:
                future = futures[job.split]
                while bars is not None and not future.done():
                    wait([future], timeout=0.2)
                    bars.refresh()
                yield job.split, future.result()  # a worker's exception is raised here, as raised there
                yielded += 1
        except BrokenProcessPool as err:
            broken = err
        if broken is not None:
            # A worker died (killed, out of memory) or could not start (e.g. under a caller's
            # script that runs this at import time, unguarded by `if __name__ == "__main__"`).
            # Once the pool is shut down nothing writes the temporary files any more, and each
            # split rewrites its own from the start: do the rest here.
            log.warning("data: worker processes failed (%s); processing the remaining splits one by one",
                        broken)
            pool.shutdown(wait=True, cancel_futures=True)
            yield from _in_process(jobs[yielded:])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bars is not None:
            bars.close()


_worker_counters = None  # in a pool worker with progress on: the shared progress counters


def _init_worker(counters) -> None:
    global _worker_counters
    _worker_counters = counters


def _run_split_in_worker(job: _SplitJob) -> _SplitDone:
    try:
        return _run_split(job)
    except Exception as err:
        if _survives_pickling(err):
            raise  # rebuilt in the parent as the same type with the same message
        # An exception that pickle cannot rebuild would break the pool instead of reaching the
        # caller: send its type and message (the worker's traceback comes along as the cause).
        raise DataError(f"split {job.split!r}: {type(err).__name__}: {err}") from err


def _survives_pickling(err: BaseException) -> bool:
    try:
        copy = pickle.loads(pickle.dumps(err))
    except Exception:
        return False
    return type(copy) is type(err) and str(copy) == str(err)


class _progress:
    """A rich progress bar for long splits; silent for small ones and when disabled."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total = label, total
        self.enabled = enabled and total >= PROGRESS_MIN_ROWS
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(f"data {self.label}", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()


class _shared_progress:
    """In a pool worker: `_progress`'s counterpart, counting rows into the shared counters that
    the parent draws as bars (`_PoolProgress`)."""

    EVERY = 1024  # rows between updates of the shared count

    def __init__(self, counters, slot: int, total: int, enabled: bool):
        self.counters, self.slot, self.total = counters, slot, total
        self.enabled = enabled and total >= PROGRESS_MIN_ROWS
        self.done = 0

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        self.counters[2 * self.slot] = self.total

        def advance() -> None:
            self.done += 1
            if self.done % self.EVERY == 0:
                self.counters[2 * self.slot + 1] = self.done

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.counters[2 * self.slot + 1] = self.done


class _PoolProgress:
    """In the parent of a pool: one transient rich bar per long split, as `_progress` draws in a
    run without workers, fed from the workers' shared counters."""

    def __init__(self, counters, labels: list[str]):
        self.counters, self.labels = counters, labels
        self._bar = None
        self._tasks: dict[int, Any] = {}

    def refresh(self) -> None:
        for slot, label in enumerate(self.labels):
            total, done = self.counters[2 * slot], self.counters[2 * slot + 1]
            if total <= 0:
                continue
            if self._bar is None:
                from rich.progress import Progress

                self._bar = Progress(transient=True)
                self._bar.start()
            if slot not in self._tasks:
                self._tasks[slot] = self._bar.add_task(f"data {label}", total=total)
            self._bar.update(self._tasks[slot], completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fingerprint(source: Source, percent: float, drop_invalid: bool, sft: set[str], chat: ChatOptions) -> str:
    payload = {"format": FORMAT_VERSION, "source": source.fingerprint(), "percent": percent,
               "drop_invalid": drop_invalid, "sft": sorted(sft), "chat": chat.fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _reusable(manifest_path: Path, fingerprint: str, out_dir: Path) -> dict[str, SplitStats] | None:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint or manifest.get("format") != FORMAT_VERSION:
        return None
    stats = {s: SplitStats(**v) for s, v in manifest["splits"].items()}
    for split, st in stats.items():
        file = out_dir / f"{split}.jsonl"
        if not file.is_file() or file_sha256(file) != st.sha256:
            return None
    return stats


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (the manifest's digest of a split)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()



def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
