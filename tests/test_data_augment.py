"""Audio augmentation (data/augment.py): each change does what it says to the audio, draws are a function
of (seed, step, row), speed perturbation reaches the plan (lengths, buckets, label check), and augmented
training batches resume exactly."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from test_data_loader import assert_same_batch, fake_dataset, make_loader
from xlsr_jax.data.augment import (Augmenter, add_noise, colored_noise, reverberate, speed_length, speed_perturb,
                                   speed_variants)
from xlsr_jax.data.prepare import ctc_min_frames

SR = 16000


def _tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / SR)[np.argmax(spectrum)])


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    wav = _tone(440.0)
    out = speed_perturb(wav, factor)
    assert len(out) == speed_length(len(wav), factor) == int(np.ceil(len(wav) / factor))
    assert out.dtype == np.float32
    assert _peak_hz(out) == pytest.approx(440.0 * factor, abs=2.0)
    assert speed_perturb(wav, 1.0) is wav or np.array_equal(speed_perturb(wav, 1.0), wav)


def test_noise_is_added_at_the_snr_asked_for():
    wav = _tone(300.0)
    rng = np.random.default_rng(0)
    for snr in (0.0, 10.0, 25.0):
        out = add_noise(wav, colored_noise(len(wav), rng, 1.0), snr)
        noise = out - wav
        measured = 10 * np.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
        assert measured == pytest.approx(snr, abs=0.01)


def test_pink_noise_has_more_power_at_low_frequencies_than_white():
    rng = np.random.default_rng(0)
    for exponent, low_over_high in ((0.0, (0.7, 1.4)), (1.0, (5.0, np.inf))):
        power = np.abs(np.fft.rfft(colored_noise(2 ** 15, rng, exponent))) ** 2
        f = np.fft.rfftfreq(2 ** 15, 1 / SR)
        ratio = power[(f > 100) & (f < 400)].mean() / power[(f > 3200) & (f < 6400)].mean()
        assert low_over_high[0] < ratio < low_over_high[1], (exponent, ratio)


def test_augmenter_snr_stays_in_range_and_draws_depend_on_seed_step_and_row():
    wav = _tone(200.0)
    aug = Augmenter(seed=3, sampling_rate=SR, noise_prob=1.0, noise_snr_db=(5.0, 15.0), noise_kinds=("white",))
    snrs = []
    for step, row in itertools.product(range(4), range(3)):
        out = aug(wav, step, row)
        np.testing.assert_array_equal(out, aug(wav, step, row))  # the same draw, every time
        noise = (out - wav).astype(np.float64)
        snrs.append(10 * np.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(noise ** 2)))
    assert all(4.99 < s < 15.01 for s in snrs), snrs
    assert len({round(s, 6) for s in snrs}) == len(snrs)  # another (step, row), another draw
    other_seed = Augmenter(seed=4, sampling_rate=SR, noise_prob=1.0, noise_kinds=("white",))
    assert not np.array_equal(other_seed(wav, 0, 0), aug(wav, 0, 0))


def test_probabilities_choose_the_share_of_clips_changed():
    wav = _tone(200.0, 0.2)
    aug = Augmenter(seed=0, sampling_rate=SR, noise_prob=0.3, noise_kinds=("white",))
    changed = np.mean([not np.array_equal(aug(wav, step, 0), wav) for step in range(400)])
    assert 0.24 < changed < 0.36
    off = Augmenter(seed=0, sampling_rate=SR)
    assert not off.active and np.array_equal(off(wav, 0, 0), wav)


def test_babble_mixes_other_clips():
    wav = _tone(200.0)
    voice = _tone(1234.0, 0.5)
    aug = Augmenter(seed=0, sampling_rate=SR, noise_prob=1.0, noise_snr_db=(0.0, 0.0), noise_kinds=("babble",),
                    babble=lambda rng: voice)
    out = aug(wav, 0, 0)
    spectrum = np.abs(np.fft.rfft(out - wav))
    assert _peak_hz(out - wav) == pytest.approx(1234.0, abs=3.0) and spectrum.max() > 0


def test_reverberation_keeps_length_and_power_and_smears_in_time():
    wav = np.zeros(SR, np.float32)
    wav[1000:1100] = 0.5  # a click
    out = reverberate(wav, 0.5, SR, np.random.default_rng(0))
    assert len(out) == len(wav)
    assert np.mean(out.astype(np.float64) ** 2) == pytest.approx(np.mean(wav.astype(np.float64) ** 2), rel=1e-4)
    assert np.abs(out[3000:6000]).max() > 1e-3 > np.abs(wav[3000:6000]).max()  # the tail after the click


def test_pitch_shift_keeps_the_length():
    aug = Augmenter(seed=1, sampling_rate=SR, pitch_prob=1.0, pitch_semitones=3.0)
    wav = _tone(440.0)
    out = aug(wav, 0, 0)
    rng = np.random.default_rng([1, 0xA06, 0, 0])
    rng.random(3)
    semitones = rng.uniform(-3.0, 3.0)
    assert len(out) == len(wav)
    assert _peak_hz(out) == pytest.approx(440.0 * 2 ** (semitones / 12), rel=0.01)


def test_speed_variants_give_each_clip_a_row_per_factor_with_its_length():
    ds = fake_dataset(n=40, max_len=16000)
    frames = lambda n: np.asarray(n) // 375  # noqa: E731  (labels are n // 400 long: 1.1 of them no longer fit)
    variants, factors = speed_variants(ds, (0.9, 1.0, 1.1), frames)
    needed = ctc_min_frames(ds.labels)
    fits = {f: np.flatnonzero(frames(speed_length(ds.lengths, f)) >= needed) for f in (0.9, 1.0, 1.1)}
    assert len(variants) == sum(len(v) for v in fits.values()) == len(factors)
    assert len(fits[1.1]) < len(fits[1.0])  # some transcripts no longer fit the faster audio: left out
    first = fits[0.9][0]
    np.testing.assert_array_equal(variants.audio[0], speed_perturb(ds.audio[first], 0.9))
    assert variants.lengths[0] == len(variants.audio[0]) == speed_length(ds.lengths[first], 0.9)
    assert variants.texts[0] == ds.texts[first] and variants.examples[0] == ds.examples[first]


def test_speed_rows_are_drawn_about_once_per_clip_per_epoch():
    ds = fake_dataset(n=60)
    variants, factors = speed_variants(ds, (0.9, 1.0, 1.1), lambda n: np.asarray(n))  # everything fits
    loader = make_loader(variants, weights=np.full(len(variants), 1 / 3), seed=0, shuffle=True)
    for epoch in range(3):
        rows = np.concatenate([idx[idx >= 0] for _, idx in loader.epoch_batches(epoch)])
        assert len(rows) == len(ds)  # one row per clip per epoch, on average over the clips
        assert set(np.unique(factors[rows])) == {0.9, 1.0, 1.1}
    assert len(loader) == loader.batches_per_epoch


@pytest.mark.parametrize("workers", [1, 2])
def test_augmented_batches_resume_exactly(workers):
    ds = fake_dataset(n=30)
    aug = Augmenter(seed=5, sampling_rate=SR, noise_prob=0.5, reverb_prob=0.5, noise_kinds=("white", "pink"))
    loader = make_loader(ds, seed=1, augment=aug, workers=workers)
    plain = make_loader(ds, seed=1)
    straight = list(itertools.islice(loader.iter_from_step(0), 12))
    resumed = list(itertools.islice(loader.iter_from_step(7), 5))
    for a, b in zip(straight[7:], resumed):
        assert_same_batch(a, b)
    unaugmented = list(itertools.islice(plain.iter_from_step(0), 12))
    differ = [not np.array_equal(a["input_values"], b["input_values"]) for a, b in zip(straight, unaugmented)]
    assert sum(differ) >= 8  # most batches hold an augmented clip
    for a, b in zip(straight, unaugmented):  # only the audio changes
        assert_same_batch({k: v for k, v in a.items() if k != "input_values"},
                          {k: v for k, v in b.items() if k != "input_values"})
    # Evaluation batches are never augmented.
    assert_same_batch(next(loader.iter_epoch(0)), next(plain.iter_epoch(0)))


@pytest.mark.slow  # trains
def test_training_with_augmentation_resumes_bit_exactly(cv_dir, tmp_path, caplog):
    """4 steps straight, and 2 + a resume for 2 more, with every augmentation on: the same parameters."""
    import shutil

    from safetensors.numpy import load_file

    from _resumed import assert_resumed, tag_records
    from _runs import tiny_run_config
    from xlsr_jax.config import from_dict, to_dict
    from xlsr_jax.recipe import train

    def config(out):
        c = to_dict(tiny_run_config(cv_dir, out, max_steps=4, eval_steps=100, save_steps=2))
        c["augment"] = {"speed_factors": [0.9, 1.0, 1.1], "noise_prob": 0.5, "reverb_prob": 0.5, "pitch_prob": 0.3}
        c["eval"] = {"at_end": False}
        return from_dict(c)

    straight = tmp_path / "straight"
    train(config(straight))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("checkpoints/4", "hf_model", "finished.json"):
        path = resumed / "run" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    tagged = tag_records(resumed / "run")
    caplog.set_level(logging.INFO)
    train(config(resumed))
    assert assert_resumed(resumed / "run", 2, tagged, caplog.text) == [3, 4]
    first = load_file(str(straight / "run" / "hf_model" / "model.safetensors"))
    second = load_file(str(resumed / "run" / "hf_model" / "model.safetensors"))
    for key in first:
        np.testing.assert_array_equal(second[key], first[key], err_msg=key)
    import yaml

    resolved = yaml.safe_load((straight / "run" / "config.yaml").read_text())["augment"]  # logged in the run
    assert resolved["speed_factors"] == [0.9, 1.0, 1.1] and resolved["noise_prob"] == 0.5
