"""Bad data, reported (issue 8): a Common Voice folder full of broken rows trains to the end, and each bad
row appears by name in the run's data_report.tsv; too much bad data in a source stops the run."""

import dataclasses
import logging
import os
import types

import numpy as np
import pytest
import soundfile as sf

from _runs import tiny_run_config
from conftest import make_cv_folder
from xlsr_jax.data.report import BadClip, read_report, report_bad_data, write_report
from xlsr_jax.data.sources import Example
from xlsr_jax.errors import UserError
from xlsr_jax.rundir import RunDir
from xlsr_jax.recipe import train

_SENTENCES = ("Merhaba dünya", "Bu çok güzel bir gün", "İstanbul'da ışık var", "Ağaç, dal ve yaprak!",
              "Nasılsın?", "Görüşürüz", "O dedi ki gel", "Kedi evde uyuyor")
# (split, clip stem, sentence) of the broken rows, and the reason data_report.tsv must give each.
_BAD = {
    "missing": ("train", "Dosya yok", "missing_file"),  # a row in train.tsv, no file in clips/
    "empty": ("train", "Boş dosya", "empty_audio"),  # a 0-byte .mp3
    "garbage": ("train", "Rastgele baytlar", "undecodable"),  # random bytes named .mp3
    "silent": ("train", "Sessiz kayıt", "silence"),  # an MP3 of digital zeros
    "punctuation": ("train", "?!...", "empty_text"),  # nothing left after normalisation
    "text_only": ("dev", "Metin dosyası", "undecodable"),  # a text file named .mp3
    "no_sentence": ("dev", "", "empty_text"),
}


def _bad_cv_folder(root) -> str:
    """A Common Voice folder: 24 good train, 8 good dev and 2 good test clips, plus the rows of _BAD."""
    good = [("train", f"good_{k}", f"spk_{k % 5}", 0.6 + 0.02 * k, _SENTENCES[k % len(_SENTENCES)])
            for k in range(24)]
    good += [("dev", f"dev_{k}", "spk_d", 0.7, _SENTENCES[k]) for k in range(8)]
    good += [("test", f"test_{k}", "spk_e", 0.8, _SENTENCES[k]) for k in range(2)]
    bad = [(split, stem, "spk_x", 0.7, sentence) for stem, (split, sentence, _) in _BAD.items()]
    root = make_cv_folder(root, rows=good + bad)
    clips = os.path.join(root, "clips")
    os.remove(os.path.join(clips, "missing.mp3"))
    open(os.path.join(clips, "empty.mp3"), "wb").close()
    with open(os.path.join(clips, "garbage.mp3"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(6000))
    with open(os.path.join(clips, "text_only.mp3"), "w", encoding="utf-8") as f:
        f.write("path\tsentence\nthis is a text file, not audio\n" * 30)
    sf.write(os.path.join(clips, "silent.mp3"), np.zeros(11200, np.float32), 16000, format="MP3")
    return root


@pytest.fixture(scope="module")
def bad_cv(tmp_path_factory):
    return _bad_cv_folder(tmp_path_factory.mktemp("bad_cv") / "tr")


@pytest.mark.slow
def test_bad_rows_train_to_the_end_and_are_reported_by_name(bad_cv, tmp_path, caplog):
    config = tiny_run_config(bad_cv, tmp_path, max_steps=2, eval_steps=2)
    with caplog.at_level(logging.INFO, logger="xlsr_jax.data"):
        metrics = train(config)
    run = RunDir(config.train.output_dir)
    assert run.finished.exists() and metrics["eval/examples"] == 10  # trained to the end, evaluated
    rows = read_report(run.data_report)
    expected = [("train", f"cv:{bad_cv}:train+dev", stem, reason) for stem, (split, _, reason) in _BAD.items()]
    expected += [("eval", f"cv:{bad_cv}:dev+test", stem, reason) for stem, (split, _, reason) in _BAD.items()
                 if split == "dev"]  # dev is in both: its bad rows are reported for each split
    assert sorted((r["split"], r["source"], os.path.basename(r["path"])[:-4], r["reason"]) for r in rows) == \
        sorted(expected)
    assert all(r["path"].startswith(os.path.join(bad_cv, "clips")) for r in rows)
    by_stem = {os.path.basename(r["path"])[:-4]: r["detail"] for r in rows}
    assert by_stem["punctuation"] == "transcript '?!...'" and by_stem["no_sentence"] == "transcript ''"
    assert "peak amplitude 0.0e+00" in by_stem["silent"] and "0 bytes" in by_stem["empty"]
    # The log counts by reason per split.
    assert ("train: kept 32 of 39 utterances (0.01 h); dropped 7: 1 missing_file, 2 undecodable, 1 empty_audio, "
            "1 silence, 2 empty_text") in caplog.text
    assert "eval: kept 10 of 12 utterances (0.00 h); dropped 2: 1 undecodable, 1 empty_text" in caplog.text


def test_too_much_bad_data_stops_the_run_naming_the_source(bad_cv, tmp_path):
    config = tiny_run_config(bad_cv, tmp_path, max_steps=2)  # bounded, should the check fail to stop it
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_skip_fraction=0.17))
    run = RunDir(config.train.output_dir)
    with pytest.raises(UserError) as err:
        train(config)
    message = str(err.value)
    assert "more than data.max_skip_fraction=0.17 of a source" in message
    assert (f"cv:{bad_cv}:train+dev (train): 7 of 39 clips dropped (17.9 %); top reasons: undecodable 2 "
            "(the audio file cannot be decoded (broken, or not audio)); empty_text 2 (") in message
    assert f"cv:{bad_cv}:dev+test" not in message  # 2 of 12 (16.7 %) is within the limit
    assert str(run.data_report) in message
    assert len(read_report(run.data_report)) == 9  # written before stopping, for the user to read
    assert not run.checkpoints.exists() and not run.config.exists()  # stopped before training


# ---------------------------------------------------------------- the report file and the check, alone


def _dataset(kept_sources, bad):
    """What report_bad_data reads of a PreparedDataset: the kept examples' sources and the bad clips."""
    return types.SimpleNamespace(examples=[Example("/a.wav", "a", source=s) for s in kept_sources], bad=bad)


def test_report_is_replaced_not_appended(tmp_path):
    path = tmp_path / "run" / "data_report.tsv"  # the run folder does not exist yet
    write_report(path, [BadClip("train", "cv:a", "/x/1.mp3", "missing_file", "no\tsuch\nfile")] * 2)
    write_report(path, [BadClip("eval", "cv:b", "/x/2.mp3", "silence")])
    assert path.read_text(encoding="utf-8") == "split\tsource\tpath\treason\tdetail\neval\tcv:b\t/x/2.mp3\tsilence\t\n"
    write_report(path, [BadClip("train", "cv:a", "/x/1.mp3", "missing_file", "no\tsuch\nfile")])
    assert read_report(path) == [dict(split="train", source="cv:a", path="/x/1.mp3", reason="missing_file",
                                      detail="no such file")]  # tabs and newlines cannot break a row


def test_skip_fraction_counts_dropped_clips_per_source(tmp_path):
    path = tmp_path / "data_report.tsv"
    dropped = [BadClip("train", "cv:a", f"/{k}.mp3", "undecodable") for k in range(2)]
    flagged = [BadClip("eval", "cv:b", f"/{k}.mp3", "out_of_vocabulary", "not in the vocabulary: q", dropped=False)
               for k in range(5)]
    datasets = {"train": _dataset(["cv:a"] * 8 + ["cv:c"] * 2, dropped), "eval": _dataset(["cv:b"] * 5, flagged)}
    report_bad_data(datasets, path, 0.2)  # cv:a lost 2 of 10 = 0.2: not more; flagged clips are kept
    rows = read_report(path)
    assert [r["detail"] for r in rows] == [""] * 2 + ["kept: not in the vocabulary: q"] * 5
    with pytest.raises(UserError, match=r"cv:a \(train\): 2 of 10 clips dropped \(20.0 %\); top reasons: "
                                        r"undecodable 2") as err:
        report_bad_data(datasets, tmp_path / "other.tsv", 0.19, write=False)
    assert "cv:b" not in str(err.value) and "cv:c" not in str(err.value)
    assert not (tmp_path / "other.tsv").exists()  # write=False: another process of a pod writes it


def test_a_common_voice_path_outside_clips_is_reported_and_never_opened(tmp_path, cv_maker, monkeypatch):
    """A TSV row whose path is `../../secret.mp3`, an absolute path or `sub/x.mp3` (each a real, readable
    MP3) is skipped as bad_path: no open, stat or decode ever touches it, in the cache or the stream."""
    import builtins

    from xlsr_jax.data import cache
    from xlsr_jax.data.prepare import prepare_dataset
    from xlsr_jax.data.sources import parse_source
    from xlsr_jax.data.stream import ClipMaker
    from xlsr_jax.data.stream_sources import Element
    from xlsr_jax.text import Vocab, normalize_text

    root = cv_maker(tmp_path / "cv" / "tr", rows=[("train", f"good_{k}", "spk", 0.6, _SENTENCES[k]) for k in range(3)])
    secrets = [tmp_path / "secret.mp3", tmp_path / "elsewhere" / "abs.mp3", tmp_path / "cv" / "tr" / "clips" / "sub" / "x.mp3"]
    for secret in secrets:
        secret.parent.mkdir(parents=True, exist_ok=True)
        sf.write(secret, np.full(16000, 0.3, np.float32), 16000, format="MP3")
    hostile = ["../../../secret.mp3", str(secrets[1]), "sub/x.mp3"]
    with open(os.path.join(root, "train.tsv"), "a", encoding="utf-8") as f:
        for k, path in enumerate(hostile):
            f.write(f"spk_h\t{path}\th{k}\tKedi evde uyuyor\t\t2\t0\t\t\t\t\ttr\t\n")
    touched = []
    for module, name in ((builtins, "open"), (os, "stat"), (sf, "read"), (sf, "SoundFile")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda p, *a, _real=real, **k: (touched.append(str(p)), _real(p, *a, **k))[1])

    examples = parse_source(f"cv:{root}:train")
    bad = [e for e in examples if e.problem is not None]
    assert [(e.path, e.problem[0]) for e in bad] == [(p, "bad_path") for p in hostile]
    normalize = lambda e: normalize_text(e.text, language="tr")  # noqa: E731
    ds, counts = prepare_dataset(examples, vocab=Vocab.build(map(normalize, examples)), normalize=normalize,
                                 sampling_rate=16000, cache_dir=tmp_path / "cache", num_workers=0)
    assert (len(ds), counts["bad_path"]) == (3, 3)
    assert [(c.path, c.reason) for c in ds.bad] == [(p, "bad_path") for p in hostile]
    assert ds.bad[0].detail == f"{root}/train.tsv: the path '../../../secret.mp3' is not a file name inside {root}/clips"
    maker = ClipMaker(vocab=Vocab.build(map(normalize, examples)), normalize=normalize, sampling_rate=16000,
                      length_range=(0, np.inf), frames_fn=lambda n: n // 320)
    assert [maker(Element(0, 0, 0, i, e))[1].reason for i, e in enumerate(bad)] == ["bad_path"] * 3
    assert not [p for p in touched if any(p.endswith(s.name) for s in secrets)], touched
    assert any(p.endswith("good_0.mp3") for p in touched), "the spy sees the files that are read"
