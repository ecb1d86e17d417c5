"""Audio augmentation of training clips, on the host, deterministic per (seed, step, row).

A model fine-tuned on a few hundred voices learns the voices instead of the language (issue #10: dev
CER falls while the CER on unheard voices stalls and the eval loss rises). Augmentation makes each
clip sound different every time it is drawn:

- speed perturbation (Kaldi's and ESPnet's 0.9/1.0/1.1: resampling, so tempo and pitch change together
  and the length becomes ``n / factor``). The length decides the bucket and whether the transcript
  still fits the frames, so it is planned, not drawn in the loader: `speed_variants` gives every clip
  one row per factor, each with its own exact length, labels check and weight ``1 / len(factors)``;
  each epoch draws about one row per clip (the loader's weighted plan), at a factor drawn anew.
- pitch shift (librosa: phase-vocoder stretch + resample; the length stays), additive noise at an SNR
  drawn from a range (white, pink, or babble: other training clips of this host summed), and
  reverberation (an exponentially decaying noise impulse response with a random RT60).

Random gain is not offered: the feature extractor normalises every utterance to zero mean and unit
variance (`audio.normalize_waveform`), which undoes any gain exactly.

Every draw comes from ``np.random.default_rng([seed, step, row])`` (``row``: position in the global
batch), so a resumed run sees the same augmented audio, and any number of loader threads or hosts give
the same batches. (audiomentations draws from the global ``random``/``np.random`` state, which threads
share: it cannot be made reproducible per row; see the issue #10 note for its speed.)
"""

from __future__ import annotations

import dataclasses
import fractions
from typing import Callable, Sequence

import numpy as np

from xlsr_jax.data.prepare import PreparedDataset, ctc_min_frames

NOISE_KINDS = ("white", "pink", "babble")
_BABBLE_VOICES = 3  # clips summed into one babble noise (a few voices: speech-like, not a crowd)


# ---------------------------------------------------------------- speed perturbation


def _ratio(factor: float) -> tuple[int, int]:
    """(up, down) of the resampling that plays a clip ``factor`` times faster: output/input = up/down."""
    frac = fractions.Fraction(factor).limit_denominator(100)
    return frac.denominator, frac.numerator


def speed_length(samples, factor: float):
    """Length after `speed_perturb` (exact, as scipy's resample_poly computes it): int64, same shape."""
    up, down = _ratio(factor)
    return -(-np.asarray(samples, dtype=np.int64) * up // down)


def speed_perturb(wav: np.ndarray, factor: float) -> np.ndarray:
    """``wav`` float32 ``[n]`` played ``factor`` times faster: float32 ``[speed_length(n, factor)]``."""
    if factor == 1.0:
        return np.asarray(wav, dtype=np.float32)
    from scipy.signal import resample_poly

    up, down = _ratio(factor)
    return resample_poly(np.asarray(wav, dtype=np.float32), up, down).astype(np.float32, copy=False)


class SpeedPerturbedAudio:
    """Audio of `speed_variants` rows: ``audio[i]`` is base clip ``rows[i]`` at ``factors[i]``, float32."""

    def __init__(self, base, rows: np.ndarray, factors: np.ndarray):
        self.base, self.rows, self.factors = base, rows, factors

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return speed_perturb(self.base[int(self.rows[i])], float(self.factors[i]))


def speed_variants(dataset: PreparedDataset, factors: Sequence[float],
                   frames_fn: Callable[[np.ndarray], np.ndarray]) -> tuple[PreparedDataset, np.ndarray]:
    """(dataset with one row per (clip, factor), factor-major; factor of each row float64 ``[m]``).

    Rows whose transcript no longer fits the frames of their new length (speed 1.1 of a fast speaker)
    are left out; the clip keeps its other factors. Rows keep their clip's example, text and owner.
    """
    base_lengths = np.asarray(dataset.lengths, dtype=np.int64)
    needed = ctc_min_frames(dataset.labels)
    rows, row_factors, lengths = [], [], []
    for f in factors:
        new = speed_length(base_lengths, f)
        fits = np.flatnonzero(np.asarray(frames_fn(new)).reshape(-1) >= needed)
        rows.append(fits)
        row_factors.append(np.full(len(fits), float(f)))
        lengths.append(new[fits])
    rows, row_factors = np.concatenate(rows), np.concatenate(row_factors)
    owners = getattr(dataset, "owners", None)
    variants = dataclasses.replace(
        dataset, texts=[dataset.texts[i] for i in rows], labels=[dataset.labels[i] for i in rows],
        lengths=np.concatenate(lengths), audio=SpeedPerturbedAudio(dataset.audio, rows, row_factors),
        examples=[dataset.examples[i] for i in rows],
        **({"owners": owners[rows]} if owners is not None else {}))
    return variants, row_factors


# ---------------------------------------------------------------- noise, pitch, reverberation


def colored_noise(n: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ``1 / f**exponent`` (0 white, 1 pink): float32 ``[n]``, unit
    power."""
    if exponent == 0:
        noise = rng.standard_normal(n)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n)
        f[0] = f[1] if n > 1 else 1.0
        noise = np.fft.irfft(spectrum / f ** (exponent / 2), n)
    noise -= noise.mean()
    return (noise / np.sqrt(np.mean(noise ** 2) + 1e-20)).astype(np.float32)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wav + g * noise`` with ``g`` making signal power / noise power = ``10 ** (snr_db / 10)``."""
    signal_power = float(np.mean(np.square(wav, dtype=np.float64)))
    noise_power = float(np.mean(np.square(noise, dtype=np.float64))) + 1e-20
    gain = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return (wav + np.float32(gain) * noise).astype(np.float32)


def reverberate(wav: np.ndarray, rt60_s: float, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """``wav`` through a synthetic room: the direct path plus exponentially decaying noise (-60 dB after
    ``rt60_s``), cut to the input length and rescaled to its power."""
    from scipy.signal import fftconvolve

    n_ir = max(2, int(rt60_s * sampling_rate))
    t = np.arange(n_ir) / sampling_rate
    ir = rng.standard_normal(n_ir) * np.exp(-6.9078 * t / rt60_s) * 0.1  # 6.9078 = ln(1000): -60 dB
    ir[0] = 1.0
    out = fftconvolve(wav, ir.astype(np.float32))[: len(wav)]
    scale = np.sqrt(np.mean(np.square(wav, dtype=np.float64)) / (np.mean(np.square(out, dtype=np.float64)) + 1e-20))
    return (out * scale).astype(np.float32)


def pitch_shift(wav: np.ndarray, semitones: float, sampling_rate: int) -> np.ndarray:
    """``wav`` shifted by ``semitones`` at the same length (librosa)."""
    import librosa

    return librosa.effects.pitch_shift(np.asarray(wav, dtype=np.float32), sr=sampling_rate,
                                       n_steps=semitones).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Augmenter:
    """Pitch, reverberation and noise of one clip, drawn from ``(seed, step, row)``.

    ``babble`` gives this host's other training clips: ``babble(rng)`` -> float32 ``[samples]``.
    Probabilities and ranges as in config.AugmentConfig.
    """

    seed: int
    sampling_rate: int
    noise_prob: float = 0.0
    noise_snr_db: tuple[float, float] = (10.0, 30.0)
    noise_kinds: tuple[str, ...] = NOISE_KINDS
    reverb_prob: float = 0.0
    reverb_rt60_s: tuple[float, float] = (0.2, 0.7)
    pitch_prob: float = 0.0
    pitch_semitones: float = 2.0
    babble: Callable[[np.random.Generator], np.ndarray] | None = None

    @property
    def active(self) -> bool:
        return max(self.noise_prob, self.reverb_prob, self.pitch_prob) > 0

    def __call__(self, wav: np.ndarray, step: int, row: int) -> np.ndarray:
        """float32 ``[n]`` -> float32 ``[n]``."""
        rng = np.random.default_rng([self.seed, 0xA06, step, row])
        # Every draw happens whatever is applied, so that one switch never changes another's draws.
        u_pitch, u_reverb, u_noise = rng.random(3)
        semitones = rng.uniform(-self.pitch_semitones, self.pitch_semitones)
        rt60 = rng.uniform(*self.reverb_rt60_s)
        snr = rng.uniform(*self.noise_snr_db)
        kind = self.noise_kinds[rng.integers(len(self.noise_kinds))]
        out = np.asarray(wav, dtype=np.float32)
        if u_pitch < self.pitch_prob:
            out = pitch_shift(out, semitones, self.sampling_rate)
        if u_reverb < self.reverb_prob:
            out = reverberate(out, rt60, self.sampling_rate, rng)
        if u_noise < self.noise_prob:
            out = add_noise(out, self._noise(kind, len(out), rng), snr)
        return out

    def _noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if kind == "babble" and self.babble is not None:
            mix = np.zeros(n, np.float32)
            for _ in range(_BABBLE_VOICES):
                clip = self.babble(rng)
                start = rng.integers(max(1, len(clip)))
                mix += np.resize(np.roll(clip, -start), n) / np.float32(np.sqrt(np.mean(clip ** 2) + 1e-12))
            return mix
        return colored_noise(n, rng, 1.0 if kind == "pink" else 0.0)
