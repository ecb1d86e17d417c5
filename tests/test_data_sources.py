import io
import json
import os
import shutil
import signal
import tarfile

import numpy as np
import pytest

from xlsr_jax.config import ConfigError
from xlsr_jax.data.sources import (Example, extract_archive, is_test_split, load_sources, parse_source,
                                   source_weight, split_hf_spec, split_options)

from _signals import sigterm_midway


def test_cv_folder_default_split(cv_dir):
    examples = parse_source(f"cv:{cv_dir}")
    assert len(examples) == 4
    first = examples[0]
    assert first == Example(
        path=os.path.join(cv_dir, "clips", "common_voice_tr_1.mp3"),
        text='Bu "çok" güzel bir gün.',  # quotes survive: QUOTE_NONE
        speaker="spk_a",
        duration_s=0.6,
        source=f"cv:{cv_dir}",
        language="tr",  # the TSV's locale column
    )
    assert examples[3].text == 'O dedi ki: "gel"'
    assert all(os.path.isabs(e.path) and os.path.isfile(e.path) for e in examples)


def test_cv_splits_and_nested_layout(cv_dir, tmp_path):
    assert len(parse_source(f"cv:{cv_dir}:train+dev")) == 6
    assert [e.text for e in parse_source(f"cv:{cv_dir}:test")] == ["Görüşürüz"]
    # The unpacked archive layout: cv-corpus-XX/tr/ below the given folder.
    nested = tmp_path / "cv-corpus-23.0-2025-09-05"
    shutil.copytree(cv_dir, nested / "tr")
    examples = parse_source(f"cv:{tmp_path}:dev")
    assert [os.path.basename(e.path) for e in examples] == [
        "common_voice_tr_5.mp3", "common_voice_tr_6.mp3"]
    with pytest.raises(FileNotFoundError, match=r"nosuch\.tsv.*train"):
        parse_source(f"cv:{cv_dir}:nosuch")


def test_cv_without_durations(cv_maker, tmp_path):
    root = cv_maker(tmp_path / "tr", rows=[("train", "a", "s", 0.2, "x")], durations=False)
    (example,) = parse_source(f"cv:{root}")
    assert example.duration_s is None and example.text == "x"


def test_cv_language_from_locale_column_else_folder_name(cv_maker, tmp_path):
    root = cv_maker(tmp_path / "de", rows=[("train", "a", "s", 0.2, "Ich")])
    tsv = tmp_path / "de" / "train.tsv"
    header, row = tsv.read_text(encoding="utf-8").splitlines()
    assert parse_source(f"cv:{root}")[0].language == "tr"  # the fixture writes locale=tr
    columns = header.split("\t")
    keep = [i for i, c in enumerate(columns) if c != "locale"]
    tsv.write_text("\n".join("\t".join(line.split("\t")[i] for i in keep) for line in (header, row)) + "\n",
                   encoding="utf-8")
    assert parse_source(f"cv:{root}")[0].language == "de"  # no column: the folder is named by its locale
    other = cv_maker(tmp_path / "my_corpus", rows=[("train", "a", "s", 0.2, "x")])
    assert parse_source(f"cv:{other}")[0].language == "tr"


def test_cv_archive_extracted_once(cv_dir, tmp_path):
    archive = tmp_path / "cv-corpus-23.0-2025-09-05-tr.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cv_dir, arcname="cv-corpus-23.0-2025-09-05/tr")
    cache = tmp_path / "cache"
    examples = parse_source(f"cv:{archive}:train+dev", cache_dir=cache)
    assert len(examples) == 6
    dest = cache / "cv-corpus-23.0-2025-09-05-tr"
    assert examples[0].path == str(dest / "cv-corpus-23.0-2025-09-05" / "tr" / "clips" /
                                   "common_voice_tr_1.mp3")
    assert os.path.isfile(examples[0].path)
    assert [p.name for p in cache.iterdir()] == [dest.name]  # no partial folder left behind
    # Second call reuses the extraction (a marker file we add survives).
    (dest / "marker").write_text("x")
    assert parse_source(f"cv:{archive}", cache_dir=cache)[0].path == examples[0].path
    assert (dest / "marker").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "tr/../../evil.txt"])
def test_cv_archive_rejects_unsafe_members(tmp_path, name):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo(name)  # by hand: tar.add() would strip a leading '/'
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unsafe member"):
        parse_source(f"cv:{archive}", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "bad").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "m.tsv").write_text('audio_path\ttext\tduration\n'
                                    'a/1.wav\tsays "hi"\t1.5\n/abs/2.flac\tb\t\n')
    (tmp_path / "m.csv").write_text('file,transcription,client_id\na/1.wav,"x, y",spk\n')
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio": {"path": "a/1.wav"}, "sentence": "z", "duration_s": 2}) + "\n\n"
        + json.dumps({"audio_filepath": "2.wav", "text": "w", "speaker": "s9"}) + "\n")
    tsv = parse_source(f"manifest:{tmp_path / 'm.tsv'}")
    assert tsv[0] == Example(str(tmp_path / "a" / "1.wav"), 'says "hi"', "", 1.5,
                             f"manifest:{tmp_path / 'm.tsv'}")
    assert tsv[1].path == "/abs/2.flac" and tsv[1].duration_s is None
    (csv_ex,) = parse_source(f"manifest:{tmp_path / 'm.csv'}")
    assert (csv_ex.text, csv_ex.speaker) == ("x, y", "spk")
    jsonl = parse_source(f"manifest:{tmp_path / 'm.jsonl'}")
    assert [(e.path, e.text, e.duration_s, e.speaker) for e in jsonl] == [
        (str(tmp_path / "a" / "1.wav"), "z", 2.0, ""), (str(tmp_path / "2.wav"), "w", None, "s9")]


def test_manifest_missing_column_lists_columns(tmp_path):
    (tmp_path / "m.tsv").write_text("wav\tsentence\nx.wav\thi\n")
    with pytest.raises(ValueError, match=r"m\.tsv.*no path column.*columns found: \['wav', "):
        parse_source(f"manifest:{tmp_path / 'm.tsv'}")
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        parse_source(f"manifest:{tmp_path / 'nope.tsv'}")


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="valid schemes: cv:PATH"):
        parse_source("s3://bucket/data")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        parse_source(f"cv:{tmp_path / 'nowhere'}:train")
    with pytest.raises(FileNotFoundError, match="no Common Voice TSVs"):
        parse_source(f"cv:{tmp_path}")


def test_load_sources_concatenates(cv_dir):
    both = load_sources([f"cv:{cv_dir}:train", f"cv:{cv_dir}:test"])
    assert len(both) == 5 and both[-1].source == f"cv:{cv_dir}:test"
    assert load_sources(f"cv:{cv_dir}:train,cv:{cv_dir}:dev") == load_sources(
        [f"cv:{cv_dir}:train", f"cv:{cv_dir}:dev"])
    # `--set data.train=A,B` gives one comma-joined string in a list: each piece keeps its own options.
    joined = load_sources([f"cv:{cv_dir}:train?weight=2,cv:{cv_dir}:dev?language=az"])
    assert [(e.source.split(":")[-1], e.language) for e in joined] == [("train?weight=2", "tr")] * 4 + [
        ("dev?language=az", "az")] * 2


# Extracts one member per 50 ms and appends a byte to a marker file for each: slow enough to stop midway.
_SLOW_EXTRACT = r"""
import sys, tarfile, time
from xlsr_jax.data.sources import extract_archive

extract = tarfile.TarFile.extract
def slow(self, *args, **kwargs):
    with open(sys.argv[2], "a") as f:
        f.write("x")
    time.sleep(0.05)
    return extract(self, *args, **kwargs)
tarfile.TarFile.extract = slow
extract_archive(sys.argv[3], cache_dir=sys.argv[1])
"""


@pytest.mark.slow  # a subprocess
def test_sigterm_mid_extraction_leaves_no_partial_folder(tmp_path):
    (tmp_path / "tr" / "clips").mkdir(parents=True)
    (tmp_path / "tr" / "train.tsv").write_text("path\tsentence\n")
    for k in range(100):
        (tmp_path / "tr" / "clips" / f"{k}.mp3").write_bytes(b"x" * 1000)
    archive = tmp_path / "tr.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tr", arcname="tr")
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    status, err = sigterm_midway(_SLOW_EXTRACT, [str(cache), str(marker), str(archive)], str(marker), after=20)
    assert status == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert os.listdir(cache) == []  # 20 members in, the partial folder is gone
    assert os.path.getsize(marker) < 102  # stopped, not finished
    dest = extract_archive(str(archive), cache_dir=cache)  # the rerun extracts it whole
    assert len(os.listdir(os.path.join(dest, "tr", "clips"))) == 100 and os.listdir(cache) == ["tr"]


# ---------------------------------------------------------------- per-source options, hf specs, test splits


def test_options_parse_and_apply_to_every_scheme(cv_dir, tmp_path):
    spec = "hf:google/fleurs:tr_tr:train?text=transcription&weight=0.5&language=tr"
    assert split_options(spec) == ("hf:google/fleurs:tr_tr:train",
                                   {"text": "transcription", "weight": "0.5", "language": "tr"})
    assert source_weight(spec) == 0.5 and source_weight("cv:/x:train") == 1.0
    assert split_options("manifest:/odd?name.tsv") == ("manifest:/odd?name.tsv", {})  # not key=value
    examples = parse_source(f"cv:{cv_dir}:dev?weight=2&language=az")
    assert [e.language for e in examples] == ["az", "az"]
    assert examples[0].source == f"cv:{cv_dir}:dev?weight=2&language=az"
    (tmp_path / "m.tsv").write_text("wav\twords\tsentence\nx.wav\thi\tignored\n")
    (e,) = parse_source(f"manifest:{tmp_path / 'm.tsv'}?audio=wav&text=words")
    assert (e.path, e.text) == (str(tmp_path / "x.wav"), "hi")
    with pytest.raises(ValueError, match=r"no text column \(looked for \['nope'\]\); columns found: "):
        parse_source(f"manifest:{tmp_path / 'm.tsv'}?audio=wav&text=nope")
    # Audio alone (pretraining, pseudo-labelling): no text column, texts empty; training still asks for one.
    (tmp_path / "audio.tsv").write_text("path\tspeaker\na.wav\ts1\n")
    (tmp_path / "audio.jsonl").write_text('{"audio": {"path": "b.wav"}}\n')
    assert [(e.path, e.text, e.speaker) for e in parse_source(f"manifest:{tmp_path / 'audio.tsv'}",
                                                              need_text=False)] == [(str(tmp_path / "a.wav"), "", "s1")]
    assert [(e.path, e.text) for e in parse_source(f"manifest:{tmp_path / 'audio.jsonl'}", need_text=False)] == \
        [(str(tmp_path / "b.wav"), "")]
    with pytest.raises(ValueError, match=r"audio.tsv: no text column \(looked for \['sentence'"):
        parse_source(f"manifest:{tmp_path / 'audio.tsv'}")
    with pytest.raises(ValueError, match=r"unknown option 'text' for a cv: source; valid options: weight, "
                                         r"language$"):
        parse_source(f"cv:{cv_dir}?text=sentence")
    with pytest.raises(ValueError, match=r"unknown option 'weigth' for a hf: source; valid options: weight, "
                                         r"language, audio, text"):
        split_options("hf:x?weigth=2")
    for bad in ("0", "-1", "inf", "nan", "two"):
        with pytest.raises(ValueError, match=f"weight='{bad}' must be a number > 0"):
            split_options(f"cv:/x?weight={bad}")


def test_hf_spec_name_config_splits(tmp_path):
    assert split_hf_spec("google/fleurs:tr_tr:train+validation") == ("google/fleurs", "tr_tr",
                                                                   ["train", "validation"])
    assert split_hf_spec("google/fleurs:tr_tr") == ("google/fleurs", "tr_tr", ["train"])
    assert split_hf_spec("user/set:test") == ("user/set", None, ["test"])  # split names, not a config
    assert split_hf_spec("user/set::dev") == ("user/set", None, ["dev"])
    (tmp_path / "a:b").mkdir()
    assert split_hf_spec(f"{tmp_path}/a:b") == (f"{tmp_path}/a:b", None, ["train"])
    with pytest.raises(ValueError, match="expected hf:NAME"):
        split_hf_spec("a:b:c:d")


def test_is_test_split():
    assert is_test_split("cv:/data/tr:test") and is_test_split("cv:/data/tr:train+test?weight=2")
    assert not is_test_split("cv:/data/tr:train+dev") and not is_test_split("manifest:/data/test.tsv")
    assert is_test_split("hf:fsicoli/common_voice_17_0:tr:test")
    assert is_test_split("hf:someone/Common-Voice-tr-parquet::train+test")
    assert not is_test_split("hf:google/fleurs:tr_tr:test")  # FLEURS' test split is not Common Voice's
    assert not is_test_split("hf:fsicoli/common_voice_17_0:tr:train")


def _data_config(cv_dir, tmp_path, train, eval=(), **data):
    from _runs import tiny_run_config
    from xlsr_jax.config import from_dict, to_dict

    tree = to_dict(tiny_run_config(cv_dir, tmp_path))
    tree["data"].update(train=list(train), eval=list(eval), min_duration_s=0.1, **data)
    return from_dict(tree)


def test_run_refuses_test_split_in_train_and_weighted_eval(cv_dir, tmp_path):
    from xlsr_jax.train.setup import build_data

    config = _data_config(cv_dir, tmp_path, [f"cv:{cv_dir}:train+test"])
    with pytest.raises(ConfigError, match=r"data.train: .*:train\+test'\] names a Common Voice test split, "
                                          r"the benchmark.*data.allow_test_split_in_train=true"):
        build_data(config, tmp_path / "run", 4, 4, data_parallel=4)
    allowed = _data_config(cv_dir, tmp_path, [f"cv:{cv_dir}:train+test"], allow_test_split_in_train=True)
    assert len(build_data(allowed, tmp_path / "run", 4, 4, data_parallel=4).train.dataset) == 5
    weighted_eval = _data_config(cv_dir, tmp_path, [f"cv:{cv_dir}:train"], [f"cv:{cv_dir}:dev?weight=2"])
    with pytest.raises(ConfigError, match=r"data.eval: .*dev\?weight=2'\]: evaluation sources take no weight"):
        build_data(weighted_eval, tmp_path / "run", 4, 4, data_parallel=4)


def test_weighted_train_sources_set_the_epoch_and_step_count(cv_dir, tmp_path):
    from xlsr_jax.train.loop import total_steps
    from xlsr_jax.train.setup import build_data

    # train: 4 clips, dev: 2 clips. Weight 3 on train: 3 x 4 + 2 = 14 examples an epoch, 4 batches of 4.
    plain = build_data(_data_config(cv_dir, tmp_path, [f"cv:{cv_dir}:train", f"cv:{cv_dir}:dev"]),
                       tmp_path / "run", 4, 4, data_parallel=4).train
    mixed = build_data(_data_config(cv_dir, tmp_path, [f"cv:{cv_dir}:train?weight=3", f"cv:{cv_dir}:dev"]),
                       tmp_path / "run", 4, 4, data_parallel=4).train
    assert (plain.batches_per_epoch, mixed.batches_per_epoch) == (2, 4)  # ceil(6 / 4), ceil(14 / 4)
    rows = np.concatenate([idx for _, idx in mixed.epoch_batches(0)])
    sources = [mixed.dataset.examples[i].source.split(":")[-1] for i in rows[rows >= 0]]
    assert (sources.count("train?weight=3"), sources.count("dev")) == (12, 2)
    from _runs import tiny_run_config
    assert total_steps(tiny_run_config(cv_dir, tmp_path, num_train_epochs=2.0), mixed.batches_per_epoch) == 8


def test_an_audio_folder_lists_its_audio_files_as_untranscribed_examples(tmp_path, audio_writer):
    """audio:DIR: every audio file below DIR, sorted, a file's folder as its speaker; other files and hidden
    names left out. They prepare without transcripts (as pretraining and pseudo-labelling read them)."""
    from xlsr_jax.data.prepare import prepare_dataset

    root = tmp_path / "radio"
    for name, seconds in (("b.wav", 0.5), ("a.flac", 0.4), ("show1/x.mp3", 0.6), ("show1/deep/y.ogg", 0.3)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        audio_writer(root / name, seconds, 16000)
    (root / "notes.txt").write_text("not audio")
    (root / ".hidden.wav").write_bytes(b"")
    (root / ".cache").mkdir()
    audio_writer(root / ".cache" / "z.wav", 0.2, 16000)
    examples = parse_source(f"audio:{root}?weight=2")
    assert [(os.path.relpath(e.path, root), e.speaker, e.text) for e in examples] == [
        ("a.flac", "", ""), ("b.wav", "", ""), ("show1/deep/y.ogg", "show1/deep", ""), ("show1/x.mp3", "show1", "")]
    assert {e.source for e in examples} == {f"audio:{root}?weight=2"} and source_weight(examples[0].source) == 2.0
    dataset, report = prepare_dataset(examples, vocab=None, normalize=None, sampling_rate=16000,
                                      cache_dir=tmp_path / "cache", num_workers=1)
    assert report["kept"] == 4 and dataset.lengths.tolist() == [6400, 8000, 4800, 9600]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no audio here")
    with pytest.raises(ValueError, match="no audio files"):
        parse_source(f"audio:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        parse_source(f"audio:{tmp_path / 'missing'}")
