"""Where utterances come from: a spec string -> a list of :class:`Example`.

Specs:
  ``cv:PATH[:SPLITS]``        a Common Voice language folder or the ``.tar.gz`` Mozilla ships;
                              SPLITS is ``+``-joined TSV names (``train+dev``), default ``train``.
  ``manifest:PATH``           a ``.tsv`` / ``.csv`` / ``.jsonl`` file of (audio path, text[, ...]).
  ``hf:NAME[:CONFIG][:SPLITS]`` a Hugging Face dataset, on the Hub or in a local folder (hub.py);
                              one suffix is SPLITS if it is made of split names (``train+validation``),
                              else CONFIG; ``hf:NAME::SPLITS`` names splits without a config.
  ``audio:DIR``               every audio file under DIR, without transcripts (pretraining,
                              pseudo-labelling); a file's folder under DIR is its speaker.

Any spec may end in options, ``?key=value&key=value`` (the same in YAML and ``--set``):
  ``weight``    training share: each example is drawn ``weight`` times per epoch on average (loader.py);
  ``language``  locale for text normalisation of this source's utterances (tr, de, zh-CN);
  ``audio``, ``text``  column names (manifest: and hf: only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import tarfile
import urllib.parse
import zlib
from typing import Iterable, Sequence

from xlsr_jax.atomic import partial_folder
from xlsr_jax.data.audio import SOUNDFILE_EXTENSIONS
from xlsr_jax.data.example import (DURATION_COLUMNS, LANGUAGE_COLUMNS, PATH_COLUMNS, SPEAKER_COLUMNS, TEXT_COLUMNS,
                                    Example)
from xlsr_jax.errors import DataError

log = logging.getLogger(__name__)

SCHEMES = ("cv", "manifest", "hf", "audio")
_SPLITS_RE = re.compile(r"^[A-Za-z0-9_+]+$")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# Per-source options each scheme takes (see the module docstring).
SOURCE_OPTIONS = {"cv": ("weight", "language"), "manifest": ("weight", "language", "audio", "text"),
                  "hf": ("weight", "language", "audio", "text"), "audio": ("weight", "language")}
# A suffix of an hf: spec made only of these (joined by +) names splits, not a config.
HF_SPLIT_NAMES = frozenset({"train", "validation", "valid", "dev", "test", "other", "validated", "invalidated"})
# A Common Voice language folder is named by its locale: tr, de, zh-CN, sv-SE, ...
_LOCALE_NAME = re.compile(r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")


def load_sources(specs: str | Sequence[str], **kw) -> list[Example]:
    """Concatenate :func:`parse_source` over several specs (see :func:`expand_specs`)."""
    examples: list[Example] = []
    for spec in expand_specs(specs):
        examples.extend(parse_source(spec, **kw))
    return examples


def expand_specs(specs: str | Sequence[str]) -> list[str]:
    """One spec per source. A string may hold several comma-joined specs (``cv:a,hf:b?weight=2``) when
    every piece starts with a known scheme; otherwise it is one spec (paths may contain commas)."""
    out = []
    for spec in [specs] if isinstance(specs, str) else specs:
        pieces = spec.split(",")
        out.extend(p.strip() for p in (pieces if all(_scheme_of(p) in SCHEMES for p in pieces) else [spec]))
    return out


def _scheme_of(spec: str) -> str:
    return spec.strip().split(":", 1)[0] if ":" in spec else ""


def split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``'SPEC?weight=2&language=tr'`` -> ``('SPEC', {'weight': '2', 'language': 'tr'})``.

    Only a suffix that parses as ``key=value`` pairs counts, so a path holding ``?`` still works.
    Unknown keys, keys the scheme does not take and bad values raise ValueError naming the spec.
    """
    head, sep, tail = spec.rpartition("?")
    if not sep or not re.fullmatch(r"[A-Za-z_]+=[^&=]*(&[A-Za-z_]+=[^&=]*)*", tail):
        return spec, {}
    options = dict(urllib.parse.parse_qsl(tail, keep_blank_values=True))
    scheme = _scheme_of(head)
    if scheme not in SOURCE_OPTIONS:
        return spec, {}  # parse_source names the unknown scheme
    valid = SOURCE_OPTIONS[scheme]
    for key, value in options.items():
        if key not in valid:
            raise DataError(f"{spec!r}: unknown option {key!r} for a {scheme}: source; valid options: "
                             f"{', '.join(valid)}")
        if not value:
            raise DataError(f"{spec!r}: option {key!r} has no value")
    source_weight(spec, options)  # checks the value
    return head, options


def source_weight(spec: str, options: dict[str, str] | None = None) -> float:
    """The spec's ``weight`` option (> 0), 1.0 without one."""
    value = (split_options(spec)[1] if options is None else options).get("weight", "1")
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not weight > 0 or weight == float("inf"):
        raise DataError(f"{spec!r}: weight={value!r} must be a number > 0")
    return weight


def parse_source(spec: str, *, cache_dir: str | os.PathLike | None = None,
                 hub_cache_dir: str | os.PathLike | None = None, need_text: bool = True) -> list[Example]:
    """One spec string -> its examples (see the module docstring for the syntax).

    ``cache_dir``: where Common Voice archives are extracted; ``hub_cache_dir``: where hub clips stored as
    bytes are written (default ``~/.cache/xlsr_jax/cv`` and ``.../hf``). ``need_text=False`` (pretraining,
    pseudo-labelling): a manifest or dataset without a transcript column gives examples with empty texts
    instead of an error.
    """
    base, options = split_options(spec)
    scheme = _scheme_of(base)
    rest = base.split(":", 1)[1] if scheme else ""
    if scheme == "cv":
        path, splits = _split_cv_spec(rest)
        examples = _load_common_voice(path, splits, source=spec, cache_dir=cache_dir)
    elif scheme == "manifest":
        examples = load_manifest(os.path.expanduser(rest), source=spec, audio_column=options.get("audio"),
                                 text_column=options.get("text"), need_text=need_text)
    elif scheme == "audio":
        examples = load_audio_folder(os.path.expanduser(rest), source=spec)
    elif scheme == "hf":
        from xlsr_jax.data.hf_datasets import load_hub_source  # imports `datasets`: only when used

        name, config, splits = split_hf_spec(rest)
        examples = load_hub_source(name, config, splits, source=spec,
                                   cache_dir=os.fspath(hub_cache_dir or default_cache("hf")),
                                   audio_column=options.get("audio"), text_column=options.get("text"),
                                   need_text=need_text)
    else:
        raise DataError(
            f"{spec!r}: unknown data source scheme {scheme!r}; valid schemes: "
            "cv:PATH[:SPLITS], manifest:PATH, hf:NAME[:CONFIG][:SPLITS], audio:DIR"
        )
    if "language" in options:
        examples = [dataclasses.replace(e, language=options["language"]) for e in examples]
    return examples


def split_hf_spec(rest: str) -> tuple[str, str | None, list[str]]:
    """'NAME[:CONFIG][:SPLITS]' -> (name, config or None, splits). A NAME that is an existing local
    path is taken whole (it may hold ':')."""
    if os.path.exists(os.path.expanduser(rest)):
        return rest, None, ["train"]
    name, *more = rest.split(":")
    if len(more) > 2 or not name:
        raise DataError(f"hf:{rest}: expected hf:NAME[:CONFIG][:SPLITS]")
    config, splits = None, "train"
    if len(more) == 2:
        config, splits = more[0] or None, more[1] or "train"
    elif len(more) == 1 and set(more[0].split("+")) <= HF_SPLIT_NAMES:
        splits = more[0]
    elif more:
        config = more[0] or None
    if not _SPLITS_RE.match(splits):
        raise DataError(f"hf:{rest}: bad split names {splits!r}; join several with +")
    return name, config, splits.split("+")


def cv_path_and_splits(spec: str) -> tuple[str, list[str]] | None:
    """`cv:PATH[:SPLITS]` -> (PATH, [split, ...]); None for other schemes. Options are ignored."""
    spec = split_options(spec)[0]
    if _scheme_of(spec) != "cv":
        return None
    return _split_cv_spec(spec.split(":", 1)[1])


def is_test_split(spec: str) -> bool:
    """True for a Common Voice source that names the `test` split: the benchmark, never training text.
    That is a ``cv:`` spec, or an ``hf:`` spec whose dataset name says Common Voice (contains
    ``common_voice`` or ``common-voice``, any case: Mozilla's and its parquet mirrors)."""
    base = split_options(spec)[0]
    parsed = cv_path_and_splits(base)
    if parsed is not None:
        return "test" in parsed[1]
    if _scheme_of(base) != "hf":
        return False
    name, _config, splits = split_hf_spec(base.split(":", 1)[1])
    return "test" in splits and re.search(r"common[_-]voice", name, re.IGNORECASE) is not None


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
            fields = dict(text=row["sentence"], speaker=row.get("client_id", ""), source=source,
                          language=row.get("locale") or folder_locale)
            if not _is_clip_name(name):
                examples.append(Example(path=row["path"], **fields, problem=(
                    "bad_path", f"{tsv}: the path {row['path']!r} is not a file name inside {clips}")))
                continue
            examples.append(Example(path=os.path.join(clips, name), duration_s=durations.get(name), **fields))
    log.info("%s: %d examples from %s (%s)", source, len(examples), root, "+".join(splits))
    return examples


def _is_clip_name(name: str) -> bool:
    """A Common Voice row names a file in clips/: a plain name, not a path (`../x`, `/etc/x`, `a/b`)."""
    return (name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and not os.path.isabs(name) and not os.path.splitdrive(name)[0])


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
            raise DataError(f"{path}: several Common Voice folders below it: {found}; name one")
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
            raise DataError(
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
        raise DataError(f"{path}: empty file, expected a header row")
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


# ---------------------------------------------------------------- audio folders


def load_audio_folder(folder: str, *, source: str = "") -> list[Example]:
    """Every file under `folder` (recursively, hidden names skipped, sorted) whose suffix is an audio format
    the decoder reads, as examples without text; a file's folder relative to `folder` is its speaker (""
    at the top). Symlinks are followed as the folder lists them."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (audio:DIR lists the audio files under DIR)")
    paths = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in SOUNDFILE_EXTENSIONS]
    paths.sort()
    if not paths:
        raise DataError(f"{folder}: no audio files (looked for {', '.join(sorted(SOUNDFILE_EXTENSIONS))})")
    examples = []
    for path in paths:
        speaker = os.path.relpath(os.path.dirname(path), folder)
        examples.append(Example(path=os.path.abspath(path), text="", speaker="" if speaker == "." else speaker,
                                source=source or f"audio:{folder}"))
    return examples


# ---------------------------------------------------------------- manifests


def load_manifest(path: str, *, source: str = "", audio_column: str | None = None,
                  text_column: str | None = None, need_text: bool = True) -> list[Example]:
    """A ``.tsv`` / ``.csv`` / ``.jsonl`` manifest -> examples; relative audio paths resolve
    against the manifest's folder. ``audio_column`` / ``text_column`` name the columns to use instead
    of the first of PATH_COLUMNS / TEXT_COLUMNS present. With ``need_text=False`` a manifest may list audio
    alone (pretraining, pseudo-labelling: texts empty); a ``text_column`` named must be there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such manifest")
    required = {"path": (audio_column,) if audio_column else PATH_COLUMNS}
    optional = {"duration": DURATION_COLUMNS, "speaker": SPEAKER_COLUMNS, "language": LANGUAGE_COLUMNS}
    if text_column or need_text:
        required["text"] = (text_column,) if text_column else TEXT_COLUMNS
    else:
        optional["text"] = TEXT_COLUMNS
    if path.endswith(".jsonl"):
        rows = _read_jsonl(path, required, optional)
    elif path.endswith((".tsv", ".csv")):
        tsv = path.endswith(".tsv")
        with open(path, encoding="utf-8", newline="") as f:
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                      else csv.reader(f))
            rows = _rows(reader, required, optional, path)
    else:
        raise DataError(f"{path}: unknown manifest type; use .tsv, .csv or .jsonl")
    base = os.path.dirname(os.path.abspath(path))
    examples = []
    for row in rows:
        duration = row.get("duration")
        examples.append(Example(
            path=os.path.join(base, os.path.expanduser(row["path"])),  # join keeps absolute paths
            text=row.get("text", ""),
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
                raise DataError(f"{path}:{line_no}: invalid JSON ({err})") from None
            cols = _pick_columns(list(obj), required, optional, f"{path}:{line_no}")
            row = {key: obj[col] for key, col in cols.items()}
            if isinstance(row["path"], dict):
                row["path"] = row["path"].get("path", "")
            out.append(row)
    return out


# ---------------------------------------------------------------- archives


def default_cache(kind: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "xlsr_jax", kind)


def default_archive_cache() -> str:
    return default_cache("cv")


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
        raise DataError(f"{archive}: unsafe member path {member.name!r}")
    if member.issym() or member.islnk():
        raise DataError(f"{archive}: links are not expected in a Common Voice archive "
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
        except (EOFError, tarfile.TarError, zlib.error) as err:  # a download cut short, or not a tar.gz
            raise DataError(f"{archive}: cannot extract: truncated or corrupt ({type(err).__name__}: {err}); "
                            "download it again") from None
        except OSError as err:
            if not os.path.isdir(dest):
                raise OSError(f"{archive}: cannot extract ({err})") from err
            log.info("%s: another process extracted it first; using its copy", archive)
    return dest
