"""Where utterances come from: a spec string -> a list of :class:`Example`.

Specs:
  ``cv:PATH[:SPLITS]``        a Common Voice language folder or the ``.tar.gz`` Mozilla ships;
                              SPLITS is ``+``-joined TSV names (``train+dev``), default ``train``.
  ``manifest:PATH``           a ``.tsv`` / ``.csv`` / ``.jsonl`` file of (audio path, text[, ...]).
  ``hf:NAME[:CONFIG[:SPLIT]]`` reserved for hub datasets (not supported yet).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import tarfile
from typing import Iterable, Sequence

from xlsr_jax.data.atomic import partial_folder

log = logging.getLogger(__name__)

SCHEMES = ("cv", "manifest", "hf")
_SPLITS_RE = re.compile(r"^[A-Za-z0-9_+]+$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

PATH_COLUMNS = ("path", "audio", "audio_path", "audio_filepath", "file", "filename")
TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript")
DURATION_COLUMNS = ("duration_s", "duration")
SPEAKER_COLUMNS = ("speaker", "client_id")
LANGUAGE_COLUMNS = ("locale", "language", "lang")
# A Common Voice language folder is named by its locale: tr, de, zh-CN, sv-SE, ...
_LOCALE_NAME = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")


@dataclasses.dataclass(frozen=True)
class Example:
    """One utterance before decoding."""

    path: str  # absolute audio path
    text: str  # raw transcript, not yet normalised
    speaker: str = ""
    duration_s: float | None = None
    source: str = ""  # the spec it came from
    language: str = ""  # locale code (tr, de, zh-CN) when the source says it, for text normalisation


def load_sources(specs: str | Sequence[str], **kw) -> list[Example]:
    """Concatenate :func:`parse_source` over several specs.

    A single string may hold several comma-joined specs (``cv:a,cv:b``) when every piece starts
    with a known scheme; otherwise it is one spec (paths may contain commas).
    """
    if isinstance(specs, str):
        pieces = specs.split(",")
        specs = pieces if all(_scheme_of(p) in SCHEMES for p in pieces) else [specs]
    examples: list[Example] = []
    for spec in specs:
        examples.extend(parse_source(spec.strip(), **kw))
    return examples


def _scheme_of(spec: str) -> str:
    return spec.strip().split(":", 1)[0] if ":" in spec else ""


def parse_source(spec: str, *, cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """One spec string -> its examples (see the module docstring for the syntax)."""
    scheme = _scheme_of(spec)
    rest = spec.split(":", 1)[1] if scheme else ""
    if scheme == "cv":
        path, splits = _split_cv_spec(rest)
        return _load_common_voice(path, splits, source=spec, cache_dir=cache_dir)
    if scheme == "manifest":
        return load_manifest(os.path.expanduser(rest), source=spec)
    if scheme == "hf":
        raise ValueError(
            f"{spec!r}: hub datasets are not supported yet; download the data and use "
            "cv:PATH or manifest:PATH"
        )
    raise ValueError(
        f"{spec!r}: unknown data source scheme {scheme!r}; valid schemes: "
        "cv:PATH[:SPLITS], manifest:PATH, hf:NAME[:CONFIG[:SPLIT]]"
    )


def cv_path_and_splits(spec: str) -> tuple[str, list[str]] | None:
    """`cv:PATH[:SPLITS]` -> (PATH, [split, ...]); None for other schemes."""
    if _scheme_of(spec) != "cv":
        return None
    return _split_cv_spec(spec.split(":", 1)[1])


def is_test_split(spec: str) -> bool:
    """True for a Common Voice source that names the `test` split: the benchmark, never training text."""
    parsed = cv_path_and_splits(spec)
    return parsed is not None and "test" in parsed[1]


def _split_cv_spec(rest: str) -> tuple[str, list[str]]:
    """'PATH[:SPLITS]' -> (path, splits). The suffix counts as splits only if it looks like split
    names and the whole string is not itself an existing path (a path may contain ':')."""
    rest = os.path.expanduser(rest)
    head, sep, tail = rest.rpartition(":")
    # 'C:' alone is a Windows drive, not a path plus splits.
    if sep and head and len(head) > 1 and _SPLITS_RE.match(tail) and not os.path.exists(rest):
        return os.path.expanduser(head), tail.split("+")
    return rest, ["train"]


# ---------------------------------------------------------------- Common Voice


def _load_common_voice(
    path: str, splits: Sequence[str], *, source: str, cache_dir=None
) -> list[Example]:
    """Examples of the given splits of a Common Voice language folder or archive."""
    if os.path.isfile(path) and path.endswith(_ARCHIVE_SUFFIXES):
        path = extract_archive(path, cache_dir=cache_dir)
    root = find_cv_root(path)
    durations = _read_clip_durations(os.path.join(root, "clip_durations.tsv"))
    clips = os.path.join(os.path.abspath(root), "clips")
    name = os.path.basename(os.path.abspath(root))
    folder_locale = name if _LOCALE_NAME.match(name) else ""
    examples = []
    for split in splits:
        tsv = os.path.join(root, f"{split}.tsv")
        if not os.path.isfile(tsv):
            found = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".tsv"))
            raise FileNotFoundError(f"{tsv}: no such split; splits found: {found}")
        rows = _read_tsv(tsv, required={"path": ("path",), "sentence": ("sentence",)},
                         optional={"locale": ("locale",)})
        for row in rows:
            name = row["path"]
            # Very old releases list clips without their extension.
            if not os.path.splitext(name)[1]:
                name += ".mp3"
            examples.append(Example(
                path=os.path.join(clips, name),
                text=row["sentence"],
                speaker=row.get("client_id", ""),
                duration_s=durations.get(name),
                source=source,
                language=row.get("locale") or folder_locale,
            ))
    log.info("%s: %d examples from %s (%s)", source, len(examples), root, "+".join(splits))
    return examples


def _has_tsv(folder: str) -> bool:
    return any(f.endswith(".tsv") for f in os.listdir(folder))


def _subdirs(folder: str) -> list[str]:
    return sorted(e.path for e in os.scandir(folder) if e.is_dir() and e.name != "clips")


def find_cv_root(path: str, max_depth: int = 3) -> str:
    """The folder holding the split TSVs: ``path`` itself, or the only folder below it that has
    TSVs (an unpacked ``cv-corpus-XX/tr/`` layout), searched ``max_depth`` levels down."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such Common Voice folder or archive")
    level = [path]
    for _ in range(max_depth + 1):
        found = [d for d in level if _has_tsv(d)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{path}: several Common Voice folders below it: {found}; name one")
        level = [s for d in level for s in _subdirs(d)]
        if not level:
            break
    raise FileNotFoundError(f"{path}: no Common Voice TSVs (train.tsv, ...) in it or below it")


def _read_clip_durations(tsv: str) -> dict[str, float]:
    """clip_durations.tsv (``clip``, ``duration[ms]``) -> {clip name: seconds}; {} if absent."""
    if not os.path.isfile(tsv):
        return {}
    rows = _read_tsv(tsv, required={"clip": ("clip",), "ms": ("duration[ms]",)})
    return {r["clip"]: float(r["ms"]) / 1000.0 for r in rows if r["ms"]}


# ---------------------------------------------------------------- table reading


def _pick_columns(header: Sequence[str], required: dict, optional: dict, where: str) -> dict:
    """Map logical names to the first present column of each candidate list."""
    picked = {}
    for key, names in {**required, **optional}.items():
        col = next((n for n in names if n in header), None)
        if col is None and key in required:
            raise ValueError(
                f"{where}: no {key} column (looked for {list(names)}); columns found: {list(header)}"
            )
        if col is not None:
            picked[key] = col
    return picked


def _read_tsv(path: str, required: dict, optional: dict | None = None) -> list[dict]:
    """Rows of a tab-separated file as {logical name: value}. QUOTE_NONE: Common Voice sentences
    contain '"', which quote-aware readers (pandas' default) swallow across lines."""
    with open(path, encoding="utf-8", newline="") as f:
        return _rows(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), required, optional, path)


def _rows(reader: Iterable[list[str]], required: dict, optional: dict | None, path: str) -> list:
    reader = iter(reader)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty file, expected a header row")
    optional = dict(optional or {})
    # Always carry client_id along for Common Voice speakers.
    optional.setdefault("client_id", ("client_id",))
    cols = _pick_columns(header, required, optional, path)
    index = {key: header.index(col) for key, col in cols.items()}
    out = []
    for line, row in enumerate(reader, start=2):
        if not row or row == [""]:
            continue
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        out.append({key: row[i] for key, i in index.items()})
    return out


# ---------------------------------------------------------------- manifests


def load_manifest(path: str, *, source: str = "") -> list[Example]:
    """A ``.tsv`` / ``.csv`` / ``.jsonl`` manifest -> examples; relative audio paths resolve
    against the manifest's folder."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such manifest")
    required = {"path": PATH_COLUMNS, "text": TEXT_COLUMNS}
    optional = {"duration": DURATION_COLUMNS, "speaker": SPEAKER_COLUMNS, "language": LANGUAGE_COLUMNS}
    if path.endswith(".jsonl"):
        rows = _read_jsonl(path, required, optional)
    elif path.endswith((".tsv", ".csv")):
        tsv = path.endswith(".tsv")
        with open(path, encoding="utf-8", newline="") as f:
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                      else csv.reader(f))
            rows = _rows(reader, required, optional, path)
    else:
        raise ValueError(f"{path}: unknown manifest type; use .tsv, .csv or .jsonl")
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    for row in rows:
        duration = row.get("duration")
        examples.append(Example(
            path=os.path.join(base, os.path.expanduser(row["path"])),  # join keeps absolute paths
            text=row["text"],
            speaker=str(row.get("speaker") or row.get("client_id") or ""),
            duration_s=float(duration) if duration not in (None, "") else None,
            source=source or f"manifest:{path}",
            language=str(row.get("language") or ""),
        ))
    return examples


def _read_jsonl(path: str, required: dict, optional: dict) -> list[dict]:
    """JSON-lines rows as {logical name: value}; an ``audio`` dict ``{"path": ...}`` is unwrapped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err})") from None
            cols = _pick_columns(list(obj), required, optional, f"{path}:{line_no}")
            row = {key: obj[col] for key, col in cols.items()}
            if isinstance(row["path"], dict):
                row["path"] = row["path"].get("path", "")
            out.append(row)
    return out


# ---------------------------------------------------------------- archives


def default_archive_cache() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "xlsr_jax", "cv")


def _archive_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in _ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_member(member: tarfile.TarInfo, archive: str) -> None:
    """Reject members that would land outside the extraction folder."""
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith(("/", "\\")) or os.path.isabs(member.name) or ".." in parts:
        raise ValueError(f"{archive}: unsafe member path {member.name!r}")
    if member.issym() or member.islnk():
        raise ValueError(f"{archive}: links are not expected in a Common Voice archive "
                         f"({member.name!r})")


def extract_archive(archive: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Extract a Common Voice ``.tar.gz`` once into ``<cache_dir>/<archive name>``; return it.

    Extraction goes to a temporary sibling folder that is renamed at the end, so a folder under
    the final name is always complete; a later call reuses it. An error, SIGINT or SIGTERM removes
    the temporary folder (see atomic.py).
    """
    dest = os.path.join(os.fspath(cache_dir or default_archive_cache()), _archive_stem(archive))
    if os.path.isdir(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    log.info("extracting %s to %s (once)", archive, dest)
    with partial_folder(dest, f"extracting {archive}") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:  # streaming: one pass over a multi-GB .tar.gz
                    _check_member(member, archive)
                    if member.isfile() or member.isdir():
                        tar.extract(member, tmp, filter="data")
            os.rename(tmp, dest)
        except OSError as err:
            if not os.path.isdir(dest):
                raise OSError(f"{archive}: cannot extract ({err})") from err
            log.info("%s: another process extracted it first; using its copy", archive)
    return dest
