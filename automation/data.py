"""The data stage: the first N % of every split of a chat dataset, checked and written as JSONL.

This is the reference flow's download step (`load_dataset(id, split="train_sft[0%:5%]")` then
`to_json`), made safe for a pipeline:

- sources: a Hugging Face hub id (through `datasets`, streamed), or a local folder with
  `{split}.jsonl` / `{split}.parquet` files, a `data/` folder in the hub's layout
  (`data/{split}-00000-of-00001.parquet`), or one sub-folder per split;
- memory is bounded by the sample: row counts come from file metadata (parquet) or a byte scan
  (JSONL), and only the first rows are parsed;
- every row is checked against the ultrachat_200k schema; bad rows are reported with split and
  row number and fail the stage unless `drop_invalid`;
- outputs are written atomically next to a manifest; a rerun with the same inputs reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from automation.errors import ConfigError, DataError
from automation.workspace import write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIXES = (".jsonl", ".json", ".parquet")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_REPORTED_BAD_ROWS = 20


# ---------------------------------------------------------------------------------------------
# Row schema


def check_row(row: Any, *, sft: bool) -> list[str]:
    """Problems of one row against the ultrachat_200k schema (empty list: the row is fine)."""
    if not isinstance(row, dict):
        return [f"row is a {type(row).__name__}, expected an object with prompt, prompt_id, messages"]
    problems = []
    prompt, prompt_id, messages = row.get("prompt"), row.get("prompt_id"), row.get("messages")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("prompt must be a non-empty string")
    if not isinstance(prompt_id, str) or not _HEX64.match(prompt_id):
        problems.append("prompt_id must be a 64-character lowercase hex sha256")
    if not isinstance(messages, list) or not messages:
        problems.append("messages must be a non-empty list")
        return problems
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if not isinstance(message, dict):
            problems.append(f"messages[{index}] must be an object with role and content")
            continue
        role, content = message.get("role"), message.get("content")
        if role != expected:
            problems.append(f"messages[{index}].role is {role!r}, expected {expected!r} "
                            "(turns alternate, starting with the user)")
        if not isinstance(content, str) or not content.strip():
            problems.append(f"messages[{index}].content must be a non-empty string")
    if sft and len(messages) % 2 == 1 and not problems:
        problems.append("SFT rows must end with an assistant message")
    return problems


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
    """The first `limit` rows of a split, in order, each with its JSON text when the source is
    JSONL (written out as it is: re-serialising was a third of the stage's time at full scale);
    an unparseable line yields the exception."""
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
            for line in handle:
                text = line.rstrip("\r\n")
                try:
                    yield json.loads(text), text
                except json.JSONDecodeError as err:
                    yield ValueError(f"not valid JSON: {err.msg} at column {err.colno}"), None
                produced += 1
                if produced >= limit:
                    return


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

    @classmethod
    def of(cls, split: str, shapes: list[tuple[int, int]], source_rows: int, dropped: int) -> SplitStats:
        """`shapes`: (user turns, characters) of each kept row."""
        turns = [t for t, _ in shapes]
        lengths = sorted(c for _, c in shapes)
        return cls(
            split=split, rows=len(shapes), source_rows=source_rows, dropped=dropped,
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
) -> DataResult:
    """Sample, check and write every split. `required_splits` maps role (train_split, ...) to name."""
    source = resolve_source(dataset, search_from)
    available = source.splits
    missing = {role: name for role, name in required_splits.items() if name not in available}
    if missing:
        listing = ", ".join(f"data.{role}={name!r}" for role, name in missing.items())
        raise ConfigError(f"{listing} not found in {source.description}; it has: {', '.join(available)}")

    fingerprint = _fingerprint(source, sample_percent, drop_invalid, sft_splits)
    manifest_path = out_dir / "manifest.json"
    reused = _reusable(manifest_path, fingerprint, out_dir)
    if reused is not None:
        log.info("data unchanged since the last run; reusing %s", out_dir)
        return DataResult(out_dir, reused, True, source.description)

    out_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, Path] = {}
    stats: dict[str, SplitStats] = {}
    failures: list[str] = []
    try:
        for split in available:
            total = count_rows(source, split)
            limit = sample_size(total, sample_percent)
            if limit == 0 and split in required_splits.values():
                raise ConfigError(f"data.sample_percent={sample_percent:g} of split {split!r} "
                                  f"({total} rows) selects no rows; raise sample_percent")
            tmp = out_dir / f".{split}.jsonl.tmp"
            kept, bad = _write_split(source, split, limit, tmp, sft=split in sft_splits, progress=progress)
            pending[split] = tmp
            if bad and not drop_invalid:
                shown = "\n".join(f"  {split} row {index}: {'; '.join(p)}" for index, p in bad[:MAX_REPORTED_BAD_ROWS])
                more = f"\n  ... and {len(bad) - MAX_REPORTED_BAD_ROWS} more" if len(bad) > MAX_REPORTED_BAD_ROWS else ""
                failures.append(f"{len(bad)} invalid row(s) in split {split!r}:\n{shown}{more}")
            if bad and drop_invalid:
                log.warning("dropped %d invalid row(s) of split %r", len(bad), split)
            stats[split] = SplitStats.of(split, kept, source_rows=total, dropped=len(bad) if drop_invalid else 0)
            stats[split].sha256 = _sha256(tmp)
        if failures:
            raise DataError("\n".join(failures) + "\nFix the rows, or rerun with --drop-invalid to drop them.")
        for role, name in required_splits.items():
            if stats[name].rows == 0:
                raise DataError(f"split {name!r} ({role}) has no valid rows left")
        for split, tmp in pending.items():
            os.replace(tmp, out_dir / f"{split}.jsonl")
        pending.clear()
        manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "source": source.description,
                    "splits": {s: asdict(v) for s, v in stats.items()}}
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
    return DataResult(out_dir, stats, False, source.description)


def _write_split(source: Source, split: str, limit: int, tmp: Path, *, sft: bool, progress: bool
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, list[str]]]]:
    kept: list[tuple[int, int]] = []
    bad: list[tuple[int, list[str]]] = []
    bar = _progress(f"{split}", limit, enabled=progress)
    with tmp.open("w", encoding="utf-8") as out, bar as advance:
        for index, (row, text) in enumerate(iter_rows(source, split, limit)):
            problems = [str(row)] if isinstance(row, Exception) else check_row(row, sft=sft)
            if problems:
                bad.append((index, problems))
            else:
                out.write((text if text is not None else json.dumps(row, ensure_ascii=False)) + "\n")
                messages = row["messages"]
                kept.append((sum(1 for m in messages if m["role"] == "user"), sum(len(m["content"]) for m in messages)))
            advance()
    return kept, bad


class _progress:
    """A rich progress bar for long splits; silent for small ones and when disabled."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total = label, total
        self.enabled = enabled and total >= 20_000
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


def _fingerprint(source: Source, percent: float, drop_invalid: bool, sft: set[str]) -> str:
    payload = {"format": FORMAT_VERSION, "source": source.fingerprint(), "percent": percent,
               "drop_invalid": drop_invalid, "sft": sorted(sft)}
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
        if not file.is_file() or _sha256(file) != st.sha256:
            return None
    return stats


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()



def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
