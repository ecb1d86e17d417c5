"""Host-side data pipeline (numpy only): sources -> decoded cache -> buckets -> batches.

The names below load on first use (PEP 562), not at import: Python runs this file for every submodule
import, and `xlsr_jax.data.batch` (what the train step needs) must not pull in the audio decoders
(soundfile, librosa) that `audio.py` imports.
"""

from __future__ import annotations

import importlib
import typing

# Public name -> the submodule that defines it.
_EXPORTS = {
    "AudioError": "audio", "load_audio": "audio", "normalize_waveform": "audio",
    "assign_buckets": "buckets", "bucket_boundaries": "buckets", "padding_fraction": "buckets",
    "AudioCache": "cache", "build_audio_cache": "cache",
    "BatchLoader": "loader",
    "PreparedDataset": "prepare", "ctc_min_frames": "prepare", "prepare_dataset": "prepare",
    "BadClip": "report", "report_bad_data": "report",
    "Example": "sources", "load_manifest": "sources", "load_sources": "sources", "parse_source": "sources",
}

__all__ = [
    "AudioCache", "AudioError", "BadClip", "BatchLoader", "Example", "PreparedDataset", "assign_buckets",
    "bucket_boundaries", "build_audio_cache", "ctc_min_frames", "load_audio", "load_manifest", "load_sources",
    "normalize_waveform", "padding_fraction", "parse_source", "prepare_dataset", "report_bad_data",
]

if typing.TYPE_CHECKING:  # linters and type checkers see the names
    from xlsr_jax.data.audio import AudioError, load_audio, normalize_waveform
    from xlsr_jax.data.buckets import assign_buckets, bucket_boundaries, padding_fraction
    from xlsr_jax.data.cache import AudioCache, build_audio_cache
    from xlsr_jax.data.loader import BatchLoader
    from xlsr_jax.data.prepare import PreparedDataset, ctc_min_frames, prepare_dataset
    from xlsr_jax.data.report import BadClip, report_bad_data
    from xlsr_jax.data.sources import Example, load_manifest, load_sources, parse_source


def __getattr__(name: str):
    if name not in _EXPORTS:
        # Lets `from xlsr_jax.data import audio` fall back to importing the submodule.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
