"""Where a dataset's rows come from: one file, a directory the `datasets` library's `save_to_disk`
wrote, or `load_dataset`-style data_files (glob patterns, a list of files, split -> files).

Files: JSONL (an object a line), JSON (a list of objects), Parquet, and Arrow (the IPC stream
format `datasets` writes, or the IPC file format). A save_to_disk directory is one dataset (Arrow
shards `data-*.arrow` in the order state.json lists them, beside dataset_info.json) or a
DatasetDict (dataset_dict.json names the splits, each a dataset directory of that name); pyarrow
reads it, the `datasets` package is not needed.

data_files entries are "split=pattern" or a bare pattern (split "train", as in `load_dataset`); a
pattern is a file or a glob (`*`, `?`, `[...]`, `**`), matches sorted. Text before the first "="
that is a split name makes the entry a split's, so a path whose first part holds "=" is written
"train=year=2024/part.parquet".

Each row comes with its source, for messages: "file:line" (JSONL, 1-based as editors number
lines), "file:row i" (JSON list, Parquet, Arrow; 0-based as `rows[i]` reads it), "dir:row i" for
a save_to_disk dataset (counted across its shards, as `dataset[i]` does).
"""

from __future__ import annotations

import glob
import importlib
import itertools
import json
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")
DEFAULT_SPLIT = "train"
_SPLIT = re.compile(r"^\w+(\.\w+)*$")  # the split names `datasets` accepts
_GLOB = re.compile(r"[*?\[]")

Row = tuple[str, object, str | None]  # (source, row, why it is unreadable or None)


def is_split_name(name: object) -> bool:
    return isinstance(name, str) and bool(_SPLIT.match(name))


# ----------------------------------------------------------------------------- files


def _jsonl_rows(path: str) -> Iterator[Row]:
    # Bytes, decoded per line, so one line of bad UTF-8 is one bad row, not a failed file.
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line), None
            except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
                yield f"{path}:{number}", None, f"not valid JSON ({error})"


def _json_rows(path: str) -> Iterator[Row]:
    try:
        with open(path, encoding="utf-8") as file:
            rows = json.load(file)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, expected a list of rows")
    for index, row in enumerate(rows):
        yield f"{path}:row {index}", row, None


def _pyarrow(module: str, path: object):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(
            f"reading {path} needs pyarrow; install it with: pip install 'ftjax[math]'"
        ) from error


def _parquet_rows(path: str) -> Iterator[Row]:
    pq = _pyarrow("pyarrow.parquet", path)
    try:
        file = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's ArrowInvalid and friends
        raise ValueError(f"{path} is not a readable Parquet file ({error})") from error
    index = 0
    for batch in file.iter_batches(batch_size=1024):  # batches, so `limit` stops reading early
        for row in batch.to_pylist():
            yield f"{path}:row {index}", row, None
            index += 1


def _arrow_batches(path: pathlib.Path) -> Iterator[list[dict]]:
    """The rows of an Arrow IPC stream (what `datasets` writes) or IPC file, a batch at a time."""
    pa, ipc = _pyarrow("pyarrow", path), _pyarrow("pyarrow.ipc", path)
    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_stream(source)
            batches = iter(reader)
        except Exception:  # not a stream: maybe the IPC file format (Feather v2)
            source.seek(0)
            try:
                reader = ipc.open_file(source)
            except Exception as error:
                raise ValueError(f"{path} is not a readable Arrow file ({error})") from error
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        try:
            for batch in batches:
                yield batch.to_pylist()
        except Exception as error:  # a truncated or corrupt stream
            raise ValueError(f"{path} is not a readable Arrow file ({error})") from error


def _arrow_rows(paths: Sequence[pathlib.Path], label: str) -> Iterator[Row]:
    """Rows of Arrow files read as one table: "label:row i", i counted across the files."""
    index = 0
    for path in paths:
        for rows in _arrow_batches(path):
            for row in rows:
                yield f"{label}:row {index}", row, None
                index += 1


def file_rows(path: str) -> Iterator[Row]:
    """The rows of one data file, read by its extension."""
    file = pathlib.Path(path)
    if file.is_dir():
        raise ValueError(f"data file {path!r} is a directory, not a file")
    if not file.is_file():
        raise ValueError(f"data file {path!r} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".arrow":
        return _arrow_rows([file], path)
    raise ValueError(f"data file {path!r} has extension {suffix!r}; known: {FILE_EXTENSIONS}")


# ----------------------------------------------------------------------------- save_to_disk


def _read_json_object(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def is_saved_dataset(directory: pathlib.Path) -> bool:
    """Whether `directory` is what `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _shards(directory: pathlib.Path) -> tuple[list[pathlib.Path], object]:
    """(the Arrow shards of one saved dataset in their order, its split name or None)."""
    state = _read_json_object(directory / "state.json")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{directory / 'state.json'} lists no data files ('_data_files')")
    shards = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or pathlib.Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{directory / 'state.json'} lists a bad data file: {entry!r}")
        shard = directory / name
        if not shard.is_file():
            raise ValueError(f"{shard} is listed in state.json but does not exist")
        shards.append(shard)
    return shards, state.get("_split")


def _chosen_split(splits: Sequence[str], split: str | None, where: str) -> str:
    if split is None:
        if len(splits) != 1:
            raise ValueError(f"{where} has splits {list(splits)}; choose one with DataConfig.split")
        return splits[0]
    if split not in splits:
        raise ValueError(f"{where} has no split {split!r}; it has {list(splits)}")
    return split


def saved_rows(directory: pathlib.Path, split: str | None) -> Iterator[Row]:
    """The rows of a save_to_disk directory; of a DatasetDict, those of `split`."""
    if (directory / "dataset_dict.json").is_file():
        splits = _read_json_object(directory / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(is_split_name(s) for s in splits) or not splits:
            raise ValueError(f"{directory / 'dataset_dict.json'} has no list of split names")
        directory = directory / _chosen_split(splits, split, str(directory))
        if not directory.is_dir():
            raise ValueError(f"{directory} is named in dataset_dict.json but does not exist")
        split = None
    shards, own_split = _shards(directory)
    if split is not None and split != own_split:
        raise ValueError(
            f"DataConfig.split is {split!r} but {directory} holds one dataset (split {own_split!r})"
        )
    return _arrow_rows(shards, str(directory))


# ----------------------------------------------------------------------------- data_files


def normalize_data_files(value: object) -> tuple[str, ...]:
    """`load_dataset`'s data_files (a pattern, a list of them, or a split -> pattern(s) mapping)
    as "split=pattern" entries, in order."""
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, Mapping):
        entries = []
        for split, patterns in value.items():
            if not is_split_name(split):
                raise ValueError(f"data_files split {split!r} is not a split name like 'train'")
            patterns = (patterns,) if isinstance(patterns, str) else patterns
            if not isinstance(patterns, Sequence) or not patterns:
                raise ValueError(f"data_files[{split!r}] must be a pattern or a list of them")
            entries += [f"{split}={_pattern(p)}" for p in patterns]
        return tuple(entries)
    if not isinstance(value, Sequence):
        raise ValueError(f"data_files must be a pattern, a list or a mapping, got {value!r}")
    entries = []
    for entry in value:
        split, marker, rest = _pattern(entry).partition("=")
        if marker and is_split_name(split):
            entries.append(f"{split}={_pattern(rest)}")
        else:
            entries.append(f"{DEFAULT_SPLIT}={entry}")
    return tuple(entries)


def _pattern(pattern: object) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"a data_files pattern must be a non-empty path, got {pattern!r}")
    return pattern


def splits_of(data_files: Sequence[str]) -> dict[str, list[str]]:
    """split -> its patterns, from "split=pattern" entries."""
    splits: dict[str, list[str]] = {}
    for entry in data_files:
        split, _, pattern = entry.partition("=")
        splits.setdefault(split, []).append(pattern)
    return splits


def _matches(pattern: str) -> list[str]:
    if not _GLOB.search(pattern):
        if not pathlib.Path(pattern).exists():
            raise ValueError(f"data_files names {pattern!r}, which does not exist")
        return [pattern]
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise ValueError(f"data_files pattern {pattern!r} matches no file")
    return matches


def resolve_data_files(data_files: Sequence[str], split: str | None) -> list[str]:
    """The files of `split` (None: the only split there is), each pattern's matches in order."""
    splits = splits_of(data_files)
    patterns = splits[_chosen_split(list(splits), split, "data_files")]
    files = [path for pattern in patterns for path in _matches(pattern)]
    for path in files:
        if not pathlib.Path(path).is_file():
            raise ValueError(f"data_files matches {path!r}, which is not a file")
        if pathlib.Path(path).suffix.lower() not in FILE_EXTENSIONS:
            raise ValueError(
                f"data_files matches {path!r}, whose extension is not one of {FILE_EXTENSIONS}"
            )
    repeated = sorted({path for path in files if files.count(path) > 1})
    if repeated:
        raise ValueError(f"data_files names {repeated} more than once")
    return files


def rows(path: str, data_files: Sequence[str] = (), split: str | None = None) -> Iterator[Row]:
    """The rows of `data_files` (of `split`), or of `path`: a file or a save_to_disk directory."""
    if data_files:
        files = resolve_data_files(data_files, split)  # every file checked before any is read
        return itertools.chain.from_iterable(file_rows(file) for file in files)
    directory = pathlib.Path(path)
    if directory.is_dir():
        if not is_saved_dataset(directory):
            raise ValueError(
                f"data path {path!r} is a directory without dataset_dict.json or state.json (not "
                "a save_to_disk directory); for a folder of files use --data.data_files "
                f"'{path.rstrip('/')}/*.jsonl'"
            )
        return saved_rows(directory, split)
    if split is not None:
        raise ValueError(
            f"DataConfig.split {split!r} needs a save_to_disk directory or data_files; "
            f"{path!r} is one file"
        )
    return file_rows(path)
