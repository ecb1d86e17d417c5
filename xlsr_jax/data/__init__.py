"""Host-side data pipeline (numpy only): sources -> decoded cache -> buckets -> batches."""

from xlsr_jax.data.audio import AudioError, load_audio, normalize_waveform
from xlsr_jax.data.buckets import assign_buckets, bucket_boundaries, padding_fraction
from xlsr_jax.data.cache import AudioCache, build_audio_cache
from xlsr_jax.data.loader import BatchLoader
from xlsr_jax.data.prepare import PreparedDataset, ctc_min_frames, prepare_dataset
from xlsr_jax.data.sources import Example, load_manifest, load_sources, parse_source

__all__ = [
    "AudioCache",
    "AudioError",
    "BatchLoader",
    "Example",
    "PreparedDataset",
    "assign_buckets",
    "bucket_boundaries",
    "build_audio_cache",
    "ctc_min_frames",
    "load_audio",
    "load_manifest",
    "load_sources",
    "normalize_waveform",
    "padding_fraction",
    "parse_source",
    "prepare_dataset",
]
