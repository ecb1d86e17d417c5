"""hf: sources, offline, on datasets built on disk here: parquet with audio bytes, an audiofolder, and
`save_to_disk` folders. Each goes through `datasets` (load_dataset / load_from_disk), never around it."""

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf

datasets = pytest.importorskip("datasets")

from xlsr_jax.data import hf_datasets  # noqa: E402
from xlsr_jax.data.audio import load_audio  # noqa: E402
from xlsr_jax.data.sources import parse_source  # noqa: E402


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """No network, and datasets' own cache inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")

    def refuse(*_args, **_kwargs):
        raise AssertionError("datasets decoded audio (torchcodec): it must never")
    monkeypatch.setattr(datasets.Audio, "decode_example", refuse)


def wav_bytes(samples: int, freq: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(samples) * freq)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def audio_table(rows):
    """(samples, text, speaker) rows -> a Dataset in the Common Voice parquet-mirror layout."""
    return datasets.Dataset.from_dict({
        "client_id": [r[2] for r in rows],
        "path": [f"common_voice_tr_{k}.wav" for k in range(len(rows))],
        "audio": [{"bytes": wav_bytes(r[0], 0.01 * (k + 1)), "path": f"common_voice_tr_{k}.wav"}
                  for k, r in enumerate(rows)],
        "sentence": [r[1] for r in rows],
        "locale": ["tr"] * len(rows),
    }).cast_column("audio", datasets.Audio(decode=False))


TRAIN = [(8000, "bir", "a"), (12000, "iki", "b"), (4000, "üç", "a")]
TEST = [(6000, "dört", "c")]


@pytest.fixture
def parquet_dir(tmp_path):
    """The Hub's parquet layout: data/<split>-00000-of-00001.parquet, audio stored as bytes."""
    root = tmp_path / "common_voice_tr_parquet"
    (root / "data").mkdir(parents=True)
    audio_table(TRAIN).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    audio_table(TEST).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def test_parquet_audio_bytes_written_once_and_decoded_by_us(parquet_dir, tmp_path, monkeypatch):
    hub_cache = tmp_path / "hub_cache"
    spec = f"hf:{parquet_dir}"
    examples = parse_source(spec, hub_cache_dir=hub_cache)
    assert [(e.text, e.speaker, e.language, e.source) for e in examples] == [
        ("bir", "a", "tr", spec), ("iki", "b", "tr", spec), ("üç", "a", "tr", spec)]
    (folder,) = os.listdir(hub_cache)  # no partial folder left
    assert folder.startswith("common_voice_tr_parquet-default-train-")
    assert [os.path.basename(e.path) for e in examples] == ["00000000.wav", "00000001.wav", "00000002.wav"]
    for example, (samples, _, _), k in zip(examples, TRAIN, range(3)):
        assert open(example.path, "rb").read() == wav_bytes(samples, 0.01 * (k + 1))
        assert load_audio(example.path, 16000).shape == (samples,)
    # A second load reuses the clips without writing any (no partial folder is opened) and gives the same
    # examples.
    with monkeypatch.context() as patch:
        patch.setattr(hf_datasets, "partial_folder", None)
        assert parse_source(spec, hub_cache_dir=hub_cache) == examples
    os.utime(examples[0].path, (1, 1))
    assert parse_source(spec, hub_cache_dir=hub_cache) == examples
    assert os.stat(examples[0].path).st_mtime == 1
    (test,) = parse_source(f"hf:{parquet_dir}:test", hub_cache_dir=hub_cache)
    assert test.text == "dört" and load_audio(test.path, 16000).shape == (6000,)
    assert len(os.listdir(hub_cache)) == 2


def test_audiofolder_paths_used_where_they_lie(tmp_path):
    root = tmp_path / "my_recordings"
    (root / "clips").mkdir(parents=True)
    (root / "validation").mkdir()
    for name, n in (("clips/a.wav", 8000), ("clips/b.flac", 9000), ("validation/c.wav", 7000)):
        sf.write(str(root / name), np.zeros(n, np.float32) + 0.1, 16000)
    (root / "metadata.csv").write_text("file_name,transcription,speaker_id\nclips/a.wav,merhaba,7\n"
                                       "clips/b.flac,\"selam, dünya\",8\n", encoding="utf-8")
    (root / "validation" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "c.wav", "transcription": "hoşça kal"}) + "\n", encoding="utf-8")
    hub_cache = tmp_path / "hub_cache"
    train = parse_source(f"hf:{root}?language=az", hub_cache_dir=hub_cache)
    assert [(e.path, e.text, e.speaker, e.language) for e in train] == [
        (str(root / "clips" / "a.wav"), "merhaba", "7", "az"),
        (str(root / "clips" / "b.flac"), "selam, dünya", "8", "az")]
    (dev,) = parse_source(f"hf:{root}:validation", hub_cache_dir=hub_cache)
    assert dev.path == str(root / "validation" / "c.wav") and dev.text == "hoşça kal"
    assert os.listdir(hub_cache) == []  # nothing was stored as bytes: nothing kept


def test_save_to_disk_folders_with_column_options(tmp_path):
    audio = tmp_path / "x.wav"
    sf.write(str(audio), np.zeros(4000, np.float32) + 0.1, 16000)
    table = datasets.Dataset.from_dict({"wav": [str(audio)], "raw_transcription": ["Salam"],
                                        "transcription": ["salam"]})
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "dd"))
    table.save_to_disk(str(tmp_path / "one"))
    (e,) = parse_source(f"hf:{tmp_path / 'dd'}:validation?audio=wav&text=raw_transcription")
    assert (e.path, e.text) == (str(audio), "Salam")
    (e,) = parse_source(f"hf:{tmp_path / 'one'}?audio=wav")  # a single Dataset is used whole
    assert e.text == "salam"  # `transcription` comes before `text` and after `sentence`
    with pytest.raises(ValueError, match=r"no split 'test'; splits found: \['train', 'validation'\]"):
        parse_source(f"hf:{tmp_path / 'dd'}:test?audio=wav")


def test_errors_name_the_source_and_the_columns(parquet_dir, tmp_path):
    spec = f"hf:{parquet_dir}?text=transcription"
    with pytest.raises(ValueError) as err:
        parse_source(spec, hub_cache_dir=tmp_path / "c")
    assert str(err.value) == (f"{spec}: no text column 'transcription'; columns found: "
                              "['client_id', 'path', 'audio', 'sentence', 'locale']")
    table = datasets.Dataset.from_dict({"file": ["x.wav"], "words": ["hi"]})
    table.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match=r"odd: no text column \(looked for \['sentence', .*name one with "
                                         r"\?text=COLUMN\); columns found: \['file', 'words'\]"):
        parse_source(f"hf:{tmp_path / 'odd'}")
    # Audio alone (pretraining, pseudo-labelling): the same dataset, texts empty.
    (e,) = parse_source(f"hf:{tmp_path / 'odd'}", need_text=False)
    assert os.path.basename(e.path) == "x.wav" and e.text == ""
    with pytest.raises(ValueError, match=r"hf:nobody/no_such_dataset:tr:train: cannot load hub dataset "
                                         r"'nobody/no_such_dataset' \(config 'tr', split 'train'\)"):
        parse_source("hf:nobody/no_such_dataset:tr:train")


def test_an_audio_struct_without_path_is_read_from_its_bytes(tmp_path):
    """A hand-made parquet whose audio struct holds bytes (and a rate) but no path field: its clips are
    written out and read, not an ArrowInvalid about a missing field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "no_path"
    (root / "data").mkdir(parents=True)
    audio = pa.array([{"bytes": wav_bytes(8000, 0.01), "sampling_rate": 16000}],
                     type=pa.struct([("bytes", pa.binary()), ("sampling_rate", pa.int32())]))
    pq.write_table(pa.table({"audio": audio, "sentence": ["bir"]}), root / "data" / "train-00000.parquet")
    (example,) = parse_source(f"hf:{root}", hub_cache_dir=tmp_path / "hub_cache")
    assert example.text == "bir" and example.path.startswith(str(tmp_path / "hub_cache"))
    np.testing.assert_allclose(load_audio(example.path), 0.3 * np.sin(np.arange(8000) * 0.01), atol=1e-4)
