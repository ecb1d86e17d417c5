"""Audio decoding and waveform normalisation (host-side numpy).

Decoding goes through soundfile (libsndfile reads MP3, WAV, FLAC, OGG) and librosa's soxr
resampler; never through torchcodec / datasets' decoding, whose wheels are not portable.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from typing import Iterator

import numpy as np
import soundfile as sf

# The rate every wav2vec2 / XLSR checkpoint was pretrained at: every clip is resampled to it.
SAMPLING_RATE = 16000

# Containers libsndfile 1.2 decodes itself; anything else (m4a, aac, webm, wma, ...) goes to
# librosa.load, i.e. audioread / ffmpeg.
SOUNDFILE_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au", ".caf",
    ".w64", ".rf64",
})


# What load_audio does to a file besides decoding it. Part of the decoded-audio cache's key: change one of
# these (or what the code does) and describe it here, and every cache is rebuilt instead of reused.
DECODE_SETTINGS = {
    "channels": "mean",  # multichannel audio is mixed to mono by averaging
    "resampler": "soxr_hq",  # see resample()
    "fallback": "librosa.load",  # containers libsndfile lacks
}


class AudioError(Exception):
    """A clip could not be decoded; the message names the file, ``reason`` says why in one word:
    ``missing_file``, ``empty_audio`` (a 0-byte file, or no samples in it) or ``undecodable``."""

    def __init__(self, message: str, reason: str = "undecodable"):
        super().__init__(message)
        self.reason = reason


def load_audio(path: str, sampling_rate: int = SAMPLING_RATE, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sampling_rate``: ``[samples]``.

    Channels are averaged; other rates are resampled with soxr (high quality, see
    :func:`resample`). Containers libsndfile lacks (m4a, webm, ...) fall back to
    ``librosa.load`` (audioread / ffmpeg). ``data``: the file's bytes, already in memory (a streamed
    dataset's row); ``path`` then only names the clip in errors and gives the container's extension.
    """
    if data is not None:
        return _load_bytes(path, sampling_rate, data)
    try:
        try:
            samples, rate = sf.read(path, dtype="float32", always_2d=True)  # [samples, channels]
            wav = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        except (sf.LibsndfileError, RuntimeError, TypeError) as sf_err:
            if not os.path.exists(path):
                raise AudioError(f"{path}: cannot decode (no such file)", "missing_file") from sf_err
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                # libsndfile calls a 0-byte file "not a regular file"; say what it is.
                raise AudioError(f"{path}: cannot decode (empty file, 0 bytes)", "empty_audio") from sf_err
            # For formats libsndfile reads, its error is final: the file is broken, and
            # audioread would start ffmpeg for seconds per bad clip to say the same.
            if os.path.splitext(path)[1].lower() in SOUNDFILE_EXTENSIONS:
                raise
            wav, rate = _librosa_load(path, sampling_rate), sampling_rate
        if rate != sampling_rate:
            wav = resample(wav, rate, sampling_rate)
    except AudioError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure becomes a named AudioError
        raise AudioError(f"{path}: cannot decode ({err or type(err).__name__})") from err
    return _checked(wav, path)


def stream_audio(path: str, sampling_rate: int = SAMPLING_RATE, block_frames: int = 1 << 18) -> Iterator[np.ndarray]:
    """:func:`load_audio` of ``path`` in blocks of mono float32 ``[samples]`` at ``sampling_rate``, read
    ``block_frames`` frames of the file at a time, so memory does not grow with the file's length.

    The blocks concatenate to ``load_audio(path, sampling_rate)``: the file is read front to back (no
    seeking), each block mixed to mono and fed to one soxr stream, which gives the samples of resampling
    the whole file at once, bit for bit. One exception: libsndfile's mpg123 decoder gives mono MP3
    samples within 1 float32 ulp (<= 2.4e-7) of a whole-file read once a read ends inside an MP3 frame.
    What libsndfile does not read itself (m4a, webm, ...: audioread / ffmpeg decode whole), a file it
    cannot open (load_audio then names the problem), and a rate to convert without soxr installed come
    whole from load_audio, as one block. Raises AudioError naming the file, as load_audio does, also
    when a read fails part way (after earlier blocks were yielded).
    """
    try:
        import soxr
    except ImportError:
        soxr = None
    if os.path.splitext(path)[1].lower() not in SOUNDFILE_EXTENSIONS:
        yield load_audio(path, sampling_rate)
        return
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError):
        yield load_audio(path, sampling_rate)  # missing, empty or broken: load_audio says which
        return
    with f:
        if f.samplerate != sampling_rate and soxr is None:
            yield load_audio(path, sampling_rate)
            return
        stream = None if f.samplerate == sampling_rate else soxr.ResampleStream(
            f.samplerate, sampling_rate, 1, dtype="float32", quality="soxr_hq")  # resample()'s setting
        total = 0
        try:
            while True:
                samples = f.read(block_frames, dtype="float32", always_2d=True)  # [frames, channels]
                wav = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
                if stream is not None:  # at the end, an empty last block flushes the stream's tail
                    wav = stream.resample_chunk(wav, last=not len(samples))
                if not np.isfinite(wav).all():
                    raise AudioError(f"{path}: cannot decode (non-finite samples)")
                total += wav.size
                if wav.size:
                    yield np.ascontiguousarray(wav, dtype=np.float32)
                if not len(samples):
                    break
        except AudioError:
            raise
        except Exception as err:  # noqa: BLE001 - a decoder failure part way becomes a named AudioError
            raise AudioError(f"{path}: cannot decode ({err or type(err).__name__})") from err
    if total == 0:
        raise AudioError(f"{path}: cannot decode (no samples)", "empty_audio")


def _load_bytes(name: str, sampling_rate: int, data: bytes) -> np.ndarray:
    """:func:`load_audio` of a file held in memory; ``name`` gives the container (its extension)."""
    if not data:
        raise AudioError(f"{name}: cannot decode (empty file, 0 bytes)", "empty_audio")
    try:
        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            wav = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        except (sf.LibsndfileError, RuntimeError, TypeError):
            if os.path.splitext(name)[1].lower() in SOUNDFILE_EXTENSIONS:
                raise
            # audioread / ffmpeg read files only.
            with tempfile.NamedTemporaryFile(suffix=os.path.splitext(name)[1]) as f:
                f.write(data)
                f.flush()
                wav, rate = _librosa_load(f.name, sampling_rate), sampling_rate
        if rate != sampling_rate:
            wav = resample(wav, rate, sampling_rate)
    except Exception as err:  # noqa: BLE001 - any decoder failure becomes a named AudioError
        raise AudioError(f"{name}: cannot decode ({err or type(err).__name__})") from err
    return _checked(wav, name)


def _checked(wav: np.ndarray, name: str) -> np.ndarray:
    """Decoded samples as contiguous float32 ``[samples]``, or AudioError naming the clip."""
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.size == 0:
        raise AudioError(f"{name}: cannot decode (no samples)", "empty_audio")
    if not np.isfinite(wav).all():
        raise AudioError(f"{name}: cannot decode (non-finite samples)")
    return wav


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``[samples]`` at ``orig_sr`` -> ``[samples']`` at ``target_sr`` with soxr (high quality).

    Same numbers as ``librosa.resample(..., res_type="soxr_hq")``, which calls soxr itself, but
    without librosa's first-call import of scipy.signal (~3 s in every decoding worker).
    """
    try:
        import soxr
    except ImportError:  # librosa without soxr installed: let librosa pick its default
        import librosa

        return librosa.resample(wav, orig_sr=orig_sr, target_sr=target_sr, res_type="soxr_hq")
    return soxr.resample(wav, orig_sr, target_sr, quality="soxr_hq")


def _librosa_load(path: str, sampling_rate: int) -> np.ndarray:
    import librosa

    with warnings.catch_warnings():
        # librosa warns "PySoundFile failed. Trying audioread instead." - that is the point here.
        warnings.simplefilter("ignore")
        wav, _ = librosa.load(path, sr=sampling_rate, mono=True, res_type="soxr_hq")
    return wav


# Wav2Vec2FeatureExtractor's variance floor, on waveforms in [-1, 1].
_VAR_EPS = 1e-7


def normalize_waveform(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance of one utterance ``[samples]`` -> float32 ``[samples]``.

    Same formula as ``Wav2Vec2FeatureExtractor(do_normalize=True)``: ``(x - mean) / sqrt(var + 1e-7)``.
    No float64 copy of the clip: the mean is a float64-accumulated sum, the variance the two-pass
    (centred) one, so a DC offset does not cancel digits; within ~1e-7 of the float64 result.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return x.copy()
    mean = np.float32(np.sum(x, dtype=np.float64) / x.size)
    out = np.subtract(x, mean)  # float32 [samples], centred
    var = float(np.sum(np.square(out), dtype=np.float64)) / x.size
    out *= np.float32(1.0 / np.sqrt(var + _VAR_EPS))
    return out


def normalize_int16_into(pcm: np.ndarray, out: np.ndarray, scale: float = 32767.0) -> None:
    """Write ``normalize_waveform(pcm / scale)`` into ``out`` (float32 ``[samples]``, e.g. a batch row)
    from int16 ``pcm`` ``[samples]``, without a float copy of the clip.

    The sums of the samples and of their squares are exact integers (int64: exact up to ~2**33
    samples), so mean and variance are exact to float64 rounding; then one subtract and one multiply
    in float32, in place in ``out``.
    """
    n = pcm.size
    if n == 0:
        return
    total = int(np.sum(pcm, dtype=np.int64))
    squares = int(np.sum(np.square(pcm, dtype=np.int32), dtype=np.int64))  # int16**2 < 2**31
    mean = total / n
    var = (n * squares - total * total) / (n * n)  # Python ints: exact before the division
    inv = 1.0 / np.sqrt(var + _VAR_EPS * scale * scale)
    np.subtract(pcm, np.float32(mean), out=out, dtype=np.float32)
    np.multiply(out, np.float32(inv), out=out)
