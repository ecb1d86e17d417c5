"""``hf:`` sources: Hugging Face datasets (Hub names or local folders) -> :class:`Example` lists.

Audio is never decoded by `datasets` (its decoders and encoders need torchcodec, whose CUDA-linked wheels
fail on CPU machines): tables are read in Arrow format, where an ``Audio`` column is its raw storage,
``struct<bytes, path>``. Audio given as a local path is used where it lies; audio given as bytes (parquet
mirrors of Common Voice, FLEURS) is written once, one file per clip, into
``<cache>/<name>-<config>-<split>-<fingerprint>/`` (built in a partial folder and renamed, see
atomic.py), so everything downstream sees a path, as for Common Voice.

NAME is a Hub dataset (``google/fleurs``; the token comes from ``HF_TOKEN`` or ``huggingface-cli login``,
which `datasets` reads itself) or a local folder: a ``save_to_disk`` folder, an audiofolder (audio files
with ``metadata.csv`` / ``metadata.jsonl``, optionally one subfolder per split), or any folder
`datasets.load_dataset` understands (parquet shards ``data/train-*.parquet``, ...). Dataset scripts
(``trust_remote_code``) are never run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Iterator, Sequence

from xlsr_jax.atomic import partial_folder
from xlsr_jax.data.example import TEXT_COLUMNS, Example
from xlsr_jax.errors import DataError

log = logging.getLogger(__name__)

AUDIO_COLUMNS = ("audio", "path", "file_name", "audio_path", "audio_filepath", "file")
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
# Only Common Voice's `locale` holds a code; FLEURS' `language` holds a name ("Turkish"): use ?language=.
LANGUAGE_COLUMNS = ("locale",)
_METADATA = ("metadata.csv", "metadata.jsonl")
_ROWS_PER_READ = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXTENSION = re.compile(r"\.[a-z0-9]{1,5}")


def load_hub_source(name: str, config: str | None, splits: Sequence[str], *, source: str, cache_dir: str,
                    audio_column: str | None = None, text_column: str | None = None,
                    need_text: bool = True) -> list[Example]:
    """The examples of ``splits`` of dataset ``name`` (``config``); see the module docstring. With
    ``need_text=False`` a dataset without a transcript column gives empty texts."""
    examples = []
    for split in splits:
        table, base = _load_split(name, config, split, source)
        examples.extend(_examples(table, base, source=source, audio_column=audio_column,
                                  text_column=text_column, need_text=need_text, bytes_dir=os.path.join(
                                      cache_dir, _folder_name(name, config, split, table._fingerprint))))
    log.info("%s: %d examples (%s)", source, len(examples), "+".join(splits))
    return examples


# ---------------------------------------------------------------- loading


def _load_split(name: str, config: str | None, split: str, source: str):
    """(datasets.Dataset of one split, folder that relative audio paths resolve against or None)."""
    import datasets  # ~1 s to import: only for hf: sources

    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        folder = os.path.abspath(folder)
        if _is_saved_to_disk(folder):
            return _pick_split(datasets.load_from_disk(folder), split, source), folder
        metadata = _audiofolder_metadata(folder, split)
        if metadata is not None:
            # The audiofolder builder encodes every clip with torchcodec; its metadata file, read as a
            # table, holds the same rows, with `file_name` relative to the metadata file.
            kind = "csv" if metadata.endswith(".csv") else "json"
            table = datasets.load_dataset(kind, data_files={split: metadata}, split=split)
            return table, os.path.dirname(metadata)
        return _pick_split(datasets.load_dataset(folder, config), split, source), folder
    try:
        return datasets.load_dataset(name, config, split=split), None
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        # datasets' own message says what is wrong (no such dataset, offline, no such config or split).
        raise DataError(f"{source}: cannot load hub dataset {name!r} (config {config!r}, split {split!r}): "
                         f"{err}") from err


def _is_saved_to_disk(folder: str) -> bool:
    files = set(os.listdir(folder))
    return "dataset_dict.json" in files or {"dataset_info.json", "state.json"} <= files


def _audiofolder_metadata(folder: str, split: str) -> str | None:
    """``<folder>/<split>/metadata.*``, else ``<folder>/metadata.*`` for the ``train`` split."""
    places = [os.path.join(folder, split)] + ([folder] if split == "train" else [])
    for place in places:
        for name in _METADATA:
            if os.path.isfile(os.path.join(place, name)):
                return os.path.join(place, name)
    return None


def _pick_split(loaded, split: str, source: str):
    """A split of a DatasetDict; a single Dataset (``save_to_disk`` of one split) is used whole."""
    if not hasattr(loaded, "keys"):
        return loaded
    if split not in loaded:
        raise DataError(f"{source}: no split {split!r}; splits found: {sorted(loaded.keys())}")
    return loaded[split]


def stream_split(name: str, config: str | None, split: str, source: str):
    """(``datasets.IterableDataset`` of one split with any ``Audio`` column left undecoded, folder that
    relative audio paths resolve against or None, rows it holds if known) for ``data.streaming``: a Hub
    dataset in streaming mode, local data files (parquet shards...) read the same way, a ``save_to_disk``
    folder or an audiofolder's metadata as an iterable view of its memory-mapped table."""
    import datasets

    folder = os.path.expanduser(name)
    if os.path.isdir(folder) and (_is_saved_to_disk(os.path.abspath(folder)) or
                                  _audiofolder_metadata(os.path.abspath(folder), split) is not None):
        table, base = _load_split(name, config, split, source)
        return table.to_iterable_dataset(num_shards=max(1, min(64, len(table) // 1000))), base, len(table)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DataError(f"{source}: cannot stream hub dataset {name!r} (config {config!r}, split {split!r}): "
                         f"{err}") from err
    features = stream.features or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Audio):
            stream = stream.cast_column(column, datasets.Audio(decode=False))
    split_info = (stream.info.splits or {}).get(split) if stream.info else None
    size = int(split_info.num_examples) if split_info is not None and split_info.num_examples else None
    return stream, os.path.abspath(folder) if os.path.isdir(folder) else None, size


def _folder_name(name: str, config: str | None, split: str, fingerprint: str) -> str:
    """Readable and unique: the fingerprint changes whenever the dataset's files do."""
    parts = [os.path.basename(os.path.normpath(name)) or "dataset", config or "default", split, fingerprint]
    return "-".join(_UNSAFE.sub("_", p) for p in parts)


# ---------------------------------------------------------------- rows


def pick_column(columns: Sequence[str], given: str | None, candidates: Sequence[str], what: str, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{source}: no {what} column {given!r}; columns found: {list(columns)}")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise DataError(f"{source}: no {what} column (looked for {list(candidates)}; name one with "
                         f"?{what}=COLUMN); columns found: {list(columns)}")
    return found


def _examples(table, base: str | None, *, source: str, audio_column: str | None, text_column: str | None,
              bytes_dir: str, need_text: bool = True) -> list[Example]:
    """Rows -> examples; clips held as bytes are written to ``bytes_dir`` (once)."""
    columns = list(table.column_names)
    audio = pick_column(columns, audio_column, AUDIO_COLUMNS, "audio", source)
    text = (pick_column(columns, text_column, TEXT_COLUMNS, "text", source) if text_column or need_text
            else next((c for c in TEXT_COLUMNS if c in columns), None))
    speaker = next((c for c in SPEAKER_COLUMNS if c in columns), None)
    language = next((c for c in LANGUAGE_COLUMNS if c in columns), None)
    wanted = [c for c in dict.fromkeys([audio, text, speaker, language]) if c]
    rows = table.select_columns(wanted).with_format("arrow")
    with _clip_writer(bytes_dir, source) as writer:
        return [Example(path=path, text=str(row_text or ""), speaker=str(row_speaker or ""), source=source,
                        language=str(row_language or ""))
                for path, row_text, row_speaker, row_language in _rows(
                    rows, audio, text, speaker, language, base, writer, bytes_dir, source)]


class _Writer:
    def __init__(self, folder: str):
        self.folder, self.written = folder, 0


@contextlib.contextmanager
def _clip_writer(final: str, source: str) -> Iterator[_Writer | None]:
    """Where clip bytes go: a partial folder renamed to ``final`` when the block ends, or nowhere (None)
    when ``final`` exists (an earlier run wrote it). A dataset without bytes leaves no folder."""
    if os.path.isdir(final):
        yield None
        return
    with partial_folder(final, f"writing the clips of {source}") as tmp:
        writer = _Writer(tmp)
        yield writer
        if writer.written:
            try:
                os.rename(tmp, final)
            except OSError:
                if not os.path.isdir(final):
                    raise
                log.info("%s: another process wrote the clips first; using its copy", source)


def _rows(rows, audio: str, text: str, speaker: str | None, language: str | None, base: str | None,
          writer: _Writer | None, final: str, source: str) -> Iterator[tuple[str, str, str, str]]:
    """(audio path, text, speaker, language) per row. Only the audio struct's ``path`` field and the
    null mask of its ``bytes`` are read unless clips are being written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    index = 0
    for batch in rows.iter(batch_size=_ROWS_PER_READ):
        column = batch.column(audio).combine_chunks()
        n = len(column)
        fields = {column.type.field(i).name for i in range(column.type.num_fields)} if pa.types.is_struct(
            column.type) else set()
        if fields & {"path", "bytes"}:  # an Audio feature; either field may be missing from a hand-made one
            paths = pc.struct_field(column, "path").to_pylist() if "path" in fields else [None] * n
            has_bytes = (pc.is_valid(pc.struct_field(column, "bytes")).to_pylist() if "bytes" in fields
                         else [False] * n)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            paths, has_bytes = column.to_pylist(), [False] * n
        else:
            raise DataError(f"{source}: audio column {audio!r} holds {column.type}; expected file paths or "
                            "an Audio feature (bytes and path)")
        blobs = (pc.struct_field(column, "bytes") if writer is not None and any(has_bytes) else None)
        texts = batch.column(text).to_pylist() if text else [""] * n
        speakers = batch.column(speaker).to_pylist() if speaker else [None] * n
        languages = batch.column(language).to_pylist() if language else [None] * n
        for k in range(n):
            if has_bytes[k]:
                name = _clip_name(index + k, paths[k])
                if writer is not None:
                    with open(os.path.join(writer.folder, name), "wb") as f:
                        f.write(blobs[k].as_py())
                    writer.written += 1
                path = os.path.join(final, name)
            elif paths[k]:
                path = paths[k] if base is None else os.path.join(base, os.path.expanduser(paths[k]))
            else:
                path = ""  # neither bytes nor path: prepare reports it as a missing file
            yield path, texts[k], speakers[k], languages[k]
        index += n


def _clip_name(index: int, original: str | None) -> str:
    """Row number (unique) plus the original extension, which tells the decoder the container."""
    ext = os.path.splitext(original or "")[1].lower()
    return f"{index:08d}" + (ext if _EXTENSION.fullmatch(ext) else "")
