"""One utterance before decoding, and the column names sources look for. Its own room so that
sources.py (spec parsing) and hf_datasets.py (Hugging Face datasets, which sources.py calls) share it
without importing each other."""

from __future__ import annotations

import dataclasses

PATH_COLUMNS = ("path", "audio", "audio_path", "audio_filepath", "file", "filename")
TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript")
DURATION_COLUMNS = ("duration_s", "duration")
SPEAKER_COLUMNS = ("speaker", "client_id")
LANGUAGE_COLUMNS = ("locale", "language", "lang")


@dataclasses.dataclass(frozen=True)
class Example:
    """One utterance before decoding."""

    path: str  # absolute audio path
    text: str  # raw transcript, not yet normalised
    speaker: str = ""
    duration_s: float | None = None
    source: str = ""  # the spec it came from
    language: str = ""  # locale code (tr, de, zh-CN) when the source says it, for text normalisation
    # (reason, detail) when the row names no clip that may be read (bad_path: a Common Voice row whose path
    # leaves clips/): `path` is then the row's text as written, and nothing opens it; it is reported.
    problem: tuple[str, str] | None = None
