#!/usr/bin/env python3
"""Peak memory of `xlsr-jax transcribe` against the length of the file it reads.

    python scripts/bench_transcribe_memory.py                    # 3 s, 10 min and 1 h at 16 kHz
    python scripts/bench_transcribe_memory.py --rate 48000       # the same lengths at 48 kHz (resampled)
    python scripts/bench_transcribe_memory.py --minutes 0.05 60  # other lengths

Writes a tiny random model folder and synthetic 16-bit WAV files (a swelling chirp plus noise) under
--work (default: a temporary folder), then runs `xlsr-jax transcribe MODEL FILE --out FILE.tsv` once per
file, each in a fresh process, and prints each run's peak resident memory (ru_maxrss from wait4 on that
process alone) and wall time, side by side. A file read in blocks keeps the peak flat in its length;
a file decoded whole adds its samples (4 bytes each at 16 kHz, more while resampling) to the peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_model(folder: Path) -> Path:
    """A seeded random tiny CTC model (conv stride 320, like XLSR) as an exported Hugging Face folder."""
    import jax
    from transformers import Wav2Vec2Config

    from xlsr_jax.hub.export import write_hf_folder
    from xlsr_jax.model.wav2vec2 import FlaxWav2Vec2ForCTC
    from xlsr_jax.text import Vocab

    vocab = Vocab.build(["abcdefghi"])
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            conv_dim=(16,) * 4, conv_kernel=(10, 4, 4, 4), conv_stride=(5, 4, 4, 4),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            vocab_size=len(vocab), pad_token_id=vocab.pad_id, do_stable_layer_norm=True,
                            feat_extract_norm="layer", conv_bias=True)
    params = FlaxWav2Vec2ForCTC(config).init_params(jax.random.key(0))
    return write_hf_folder(params, config, vocab, folder)


def write_audio(path: Path, seconds: float, rate: int) -> Path:
    """16-bit PCM WAV, written a minute at a time (this process stays small too)."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    total, block = int(seconds * rate), 60 * rate
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for start in range(0, total, block):
            t = np.arange(start, min(start + block, total)) / rate
            tone = np.sin(2 * np.pi * (200 + 150 * np.sin(2 * np.pi * 0.3 * t)) * t) * (1 + np.sin(2 * np.pi * 0.7 * t))
            f.write((0.3 * tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return path


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `command`, a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, wall  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[0.05, 10, 60])
    parser.add_argument("--rate", type=int, default=16000, help="sampling rate of the files (default 16000)")
    parser.add_argument("--work", help="folder for the model and the audio (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_transcribe_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").exists():
        write_model(model)
    print(f"model: {model}; files at {args.rate} Hz; transcribe with the defaults (20 s chunks, batch 8)")
    print(f"{'length':>10} {'file MB':>8} {'peak RSS MB':>12} {'wall s':>7}")
    for minutes in args.minutes:
        audio = work / f"{minutes:g}min_{args.rate}.wav"
        if not audio.exists():
            write_audio(audio, minutes * 60, args.rate)
        command = [sys.executable, "-m", "xlsr_jax.cli", "transcribe", str(model), str(audio),
                   "--out", str(audio.with_suffix(".tsv"))]
        rss, wall = peak_rss(command)
        print(f"{minutes * 60:>9g}s {audio.stat().st_size / 1e6:>8.1f} {rss:>12.0f} {wall:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
