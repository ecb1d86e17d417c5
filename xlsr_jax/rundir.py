"""The layout of a training run's output directory, in one place.

```
RUN/
  config.yaml               resolved config (reloads with load_config)
  model_config.json         the Wav2Vec2Config trained (evaluate/export need no pretrained download)
  vocab.json                the CTC vocabulary
  text_normalization.json   how transcripts became labels (evaluate scores the same way)
  data_report.tsv           every clip skipped (or flagged) at start-up: split, source, path, reason, detail
  metrics.jsonl             {"step": N, "train/loss": ..., "eval/wer": ...} per line
  tensorboard/              event files
  checkpoints/<step>/       orbax checkpoints: the newest N and the best by checkpoint.best_metric
  eval_results.json         results of `xlsr-jax evaluate` (the model card's numbers)
  training_curves.png       loss and error rates against step
  hf_model/                 the Hugging Face folder written when the run finishes
  finished.json             the step budget and final metrics of a finished run
  run_signature.json        what a resume must match (vocab, model shape, batch, data plan; train/signature.py)
  stream_state/<step>.json  data.streaming: the loader's state saved with each checkpoint (data/stream.py)
```

A folder is a run when it holds `run_signature.json` or a `config.yaml` whose first line is
`CONFIG_MARK` (a run writes both before anything else it names). Only a run's files are ever replaced or
deleted: `train.overwrite_output_dir` deletes the paths named here, and under `checkpoints/` only step
folders, never other files; a folder that is not a run but holds one of these names is refused, not
overwritten. A run directory may be a URL (`gs://bucket/run`): `RunDir` keeps it one (pathlib would
turn it into `gs:/bucket/run`), and orbax writes the checkpoints there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from etils import epath

from xlsr_jax.text import NORMALIZATION_FILE

logger = logging.getLogger(__name__)

EXPORT_INFO = "xlsr_jax.json"  # in an exported model folder: the run and step it came from
CURVES_FILE = "training_curves.png"  # in a run and in its exports
LM_DIR = "language_model"  # in an export with an n-gram LM: pyctcdecode's files, beside alphabet.json
# Every name `xlsr-jax export` may write into a model folder (hub/export.py; added_tokens.json where
# transformers writes it): the only names export replaces or deletes in an existing folder, and the only
# ones push uploads.
EXPORT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json",
                "processor_config.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", NORMALIZATION_FILE, EXPORT_INFO, "eval_results.json", CURVES_FILE,
                "README.md", "alphabet.json", LM_DIR)
CONFIG_MARK = "# xlsr-jax run config"  # the first line of the config.yaml a run writes
REPORT_COLUMNS = ("split", "source", "path", "reason", "detail")  # data_report.tsv's header (data/report.py)
DAMAGED = ".damaged"  # suffix of a checkpoint folder that failed to restore (orbax skips the name)
# What a run writes under checkpoints/: `<step>`, orbax's `<step>.orbax-checkpoint-tmp-*` of an unfinished
# save, and `<step>.damaged[-k]` set aside by checkpoint.py.
_STEP_FOLDER = re.compile(r"\d+(\.orbax-checkpoint-tmp.*|" + re.escape(DAMAGED) + r"(-\d+)?)?")


def as_path(path: str | os.PathLike) -> Path | epath.Path:
    """A local path as a `pathlib.Path`; a URL (`gs://bucket/run`, any scheme orbax/etils read) as an
    `etils.epath.Path`, which keeps the URL where `pathlib` would collapse its `//`."""
    text = str(path)
    return epath.Path(text) if "://" in text else Path(path)


def write_atomically(path: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """`save(local_file)` writes a temporary file that then replaces `path` in one step, so a process
    killed meanwhile leaves the old file or the new one, never half of one (a URL gets a copy)."""
    path = as_path(path)
    if isinstance(path, Path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with tempfile.TemporaryDirectory() as local:
        save(os.path.join(local, path.name))
        epath.Path(local, path.name).copy(path, overwrite=True)


class RunDir:
    """Paths inside one run directory (local, or a URL such as gs://bucket/run)."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)

    config = property(lambda self: self.path / "config.yaml")
    model_config = property(lambda self: self.path / "model_config.json")
    vocab = property(lambda self: self.path / "vocab.json")
    normalization = property(lambda self: self.path / NORMALIZATION_FILE)
    data_report = property(lambda self: self.path / "data_report.tsv")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    eval_results = property(lambda self: self.path / "eval_results.json")
    curves = property(lambda self: self.path / CURVES_FILE)
    hf_model = property(lambda self: self.path / "hf_model")
    finished = property(lambda self: self.path / "finished.json")
    signature = property(lambda self: self.path / "run_signature.json")
    stream_state = property(lambda self: self.path / "stream_state")

    def layout(self) -> list[Path | epath.Path]:
        """Every path the run layout names (the properties of this class), present or not."""
        return [getattr(self, name) for name, value in vars(type(self)).items() if isinstance(value, property)]

    def is_ours(self) -> bool:
        """Whether xlsr-jax made this folder a run: it holds run_signature.json, or a config.yaml whose
        first line is CONFIG_MARK."""
        if self.signature.is_file():
            return True
        if not self.config.is_file():
            return False
        with self.config.open(encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == CONFIG_MARK

    def foreign_files(self) -> list[str]:
        """The names of this layout that the folder holds without being a run (`is_ours`): files a run
        here would overwrite or delete although xlsr-jax did not write them. A data_report.tsv of ours
        (a start that stopped at its data, before any other file) does not count."""
        if not self.path.is_dir() or self.is_ours():
            return []
        return [p.name for p in self.layout() if p.exists() and not (p == self.data_report and _our_report(p))]

    def clear(self) -> tuple[list[str], list[str]]:
        """Delete the run's own files: the paths `layout` names, but under checkpoints/ only step folders.
        Returns (names deleted, names kept: everything else in the folder and in checkpoints/)."""
        deleted = []
        for path in self.layout():
            if path == self.checkpoints and path.is_dir():
                steps = [p for p in path.iterdir() if _STEP_FOLDER.fullmatch(p.name)]
                for step in steps:
                    _remove(step)
                deleted += [f"{path.name}/{p.name}" for p in steps]
                if not any(path.iterdir()):
                    path.rmdir()
            elif path.exists():
                _remove(path)
                deleted.append(path.name)
        kept = [p.name for p in self.path.iterdir() if p != self.checkpoints] if self.path.is_dir() else []
        if self.checkpoints.is_dir():
            kept += [f"{self.checkpoints.name}/{p.name}" for p in self.checkpoints.iterdir()]
        return deleted, sorted(kept)

    def is_run(self) -> bool:
        """A training run (config + checkpoints), as opposed to a Hugging Face model folder."""
        return self.config.is_file() and self.checkpoints.is_dir()

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl as a list of dicts; [] if absent (see `read_metrics`)."""
        return read_metrics(self.metrics) if self.metrics.exists() else []

    def last_eval(self) -> dict[str, Any]:
        """The newest line of metrics.jsonl with eval metrics, or {}."""
        evals = [r for r in self.read_metrics() if any(k.startswith("eval/") for k in r)]
        return evals[-1] if evals else {}


def _remove(path: Path | epath.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path) if isinstance(path, Path) else path.rmtree()
    else:
        path.unlink()


def _our_report(path: Path | epath.Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:
        return f.readline().rstrip("\n") == "\t".join(REPORT_COLUMNS)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, each with an int "step". A resumed run repeats steps; all stay.
    Unreadable lines (a process killed mid-write) are skipped with a warning."""
    records = []
    with as_path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["step"] = int(record["step"])
            except (ValueError, KeyError, TypeError) as err:
                logger.warning("%s:%d: skipped unreadable line (%s)", path, number, err)
                continue
            records.append(record)
    return records


def read_eval_results(path: str | Path) -> list[dict[str, Any]]:
    """The `results` list of an eval_results.json; [] if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("results", []))


def record_eval_result(path: str | Path, result: dict[str, Any]) -> None:
    """Add `result` to eval_results.json, replacing an earlier one for the same data, step and
    decoder (a re-evaluation), keeping the others. Written atomically."""
    path = Path(path)
    same = ("data", "step", "decoder")
    results = [r for r in read_eval_results(path) if any(r.get(k) != result.get(k) for k in same)]
    results.append(result)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"results": results}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
