#!/usr/bin/env python3
"""Few transcripts, more audio: how much each way of using the untranscribed audio gains, on one corpus.

    python scripts/low_resource_compare.py --corpus data/demo_tr --language tr --out runs/lowres_tr

A seeded `--labelled-fraction` of the corpus's `train` clips keeps its transcripts (`labelled.tsv`); the
rest is used as audio only (`unlabelled.tsv`). Every condition fine-tunes configs/demo.yaml's model for
`--steps` steps on the labelled part and is scored on `dev` and `test` (unseen voices) at its last step:

  a  from scratch
  b  from a model pretrained (`xlsr-jax pretrain`, configs/pretrain_demo.yaml) on all of train's audio, or
     on more (`--pretrained`); fine-tuned with everything trained (see --freeze-feature-encoder)
  c  a's start, on labelled + a's surest `--top-fraction` pseudo-labels of the rest (one round)
  d  b's start, on labelled + b's pseudo-labels
  e  from `--transfer-from` (a model trained on other languages' transcripts; its head is replaced)

Every step is an xlsr-jax command, printed before it runs and skipped when its output exists (rerun the
same command to continue). Writes `results.tsv` and `results.md` (CER/WER, CPU and wall minutes of each
condition, its shared steps counted where they are made) into --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINETUNE = REPO / "configs" / "demo.yaml"
PRETRAIN = REPO / "configs" / "pretrain_demo.yaml"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Runner:
    """Runs xlsr-jax commands, adding their CPU and wall seconds to the condition named in `charge`, in
    `cost.json` (kept across reruns of this script)."""

    def __init__(self, out: Path):
        self.out, self.ledger = out, out / "cost.json"

    def __call__(self, charge: str, done: Path, *args: str) -> str:
        if done.exists():
            print(f"[{charge}] done already: {done}", flush=True)
            return ""
        print(f"[{charge}] xlsr-jax {' '.join(args)}", flush=True)
        cpu, wall = _cpu_seconds(), time.monotonic()
        log = self.out / "logs" / f"{charge}-{args[0]}-{len(list((self.out / 'logs').glob('*')))}.log"
        with open(log, "w") as f:
            code = subprocess.run([sys.executable, "-m", "xlsr_jax.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=REPO).returncode
        # Read when adding, not once: another run of this script (other conditions) may share the folder.
        cost = self.costs()
        spent = cost.setdefault(charge, [0.0, 0.0])
        spent[0] += _cpu_seconds() - cpu
        spent[1] += time.monotonic() - wall
        _replace(self.ledger, json.dumps(cost))
        if code != 0:
            sys.exit(f"xlsr-jax {args[0]} failed (exit {code}); log: {log}")
        return log.read_text()

    def costs(self) -> dict[str, list[float]]:
        """{condition: [CPU seconds, wall seconds]} so far."""
        return json.loads(self.ledger.read_text()) if self.ledger.exists() else {}


def split_train(corpus: Path, fraction: float, seed: int, out: Path) -> tuple[Path, Path]:
    """labelled.tsv (path, sentence) and unlabelled.tsv (path): a seeded `fraction` of the corpus's train
    clips, read as `train` reads `cv:CORPUS:train`."""
    import numpy as np

    from xlsr_jax.data.sources import load_sources

    examples = load_sources(f"cv:{corpus}:train")
    order = np.random.default_rng(seed).permutation(len(examples))
    keep = set(order[: max(1, round(fraction * len(examples)))].tolist())
    labelled, unlabelled = out / "labelled.tsv", out / "unlabelled.tsv"
    _replace(labelled, "path\tsentence\n" + "".join(
        f"{e.path}\t{e.text}\n" for k, e in enumerate(examples) if k in keep))
    _replace(unlabelled, "path\n" + "".join(f"{e.path}\n" for k, e in enumerate(examples) if k not in keep))
    return labelled, unlabelled


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a run of this script beside this one may be reading it)."""
    from xlsr_jax.rundir import write_atomically

    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def scores(text: str) -> dict[str, float]:
    """The `wer: X` and `cer: X` lines `xlsr-jax evaluate` ends with."""
    found = dict(line.split(": ", 1) for line in text.splitlines() if line.startswith(("wer: ", "cer: ")))
    return {k: float(v) for k, v in found.items()}


def plot_conditions(out: Path, conditions: list[str], png: Path) -> None:
    """Dev CER and dev loss against the fine-tuning step, one line per condition (its run's metrics.jsonl)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from xlsr_jax.plots import read_curves

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for c in conditions:
        curves = read_curves(out / c / "metrics.jsonl", ("eval/cer", "eval/loss"))
        for ax, key, scale in ((axes[0], "eval/cer", 100.0), (axes[1], "eval/loss", 1.0)):
            if key in curves:
                steps, values = zip(*curves[key])
                ax.plot(steps, [scale * v for v in values], marker="o", markersize=3, label=c)
    for ax, title in zip(axes, ("dev CER (%)", "dev CTC loss")):
        ax.set_title(f"{out.name}: {title}")
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="a Common Voice-layout folder")
    parser.add_argument("--language", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--labelled-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps of every condition")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--pretrained", type=Path,
                        help="b and d start from this pretraining folder (an `xlsr-jax pretrain` run's hf_model/, e.g. "
                             "one pretrained on several corpora's audio) instead of pretraining on this corpus's train")
    # A CPU-scale pretrained start fine-tunes best with everything trained from step 1: Turkish test CER
    # 36.2 %, against 65.3 % with its feature encoder frozen and 100 head-only steps (XLSR-53's recipe).
    parser.add_argument("--head-only-steps", type=int, default=0,
                        help="model.freeze_transformer_steps when starting from a pretrained model")
    parser.add_argument("--freeze-feature-encoder", choices=("true", "false"), default="false",
                        help="model.freeze_feature_encoder when starting from a pretrained model")
    parser.add_argument("--top-fraction", type=float, default=0.5, help="of the pseudo-labels, the surest kept")
    parser.add_argument("--transfer-from", help="condition e: a model (hf folder) trained on other languages")
    parser.add_argument("--conditions", default="abcde")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    corpus = args.corpus.resolve()
    run = Runner(out)
    labelled, unlabelled = split_train(corpus, args.labelled_fraction, args.seed, out)
    dev, test = f"cv:{corpus}:dev", f"cv:{corpus}:test"
    common = ["--set", f"data.language={args.language}", "--set", f"data.eval=[{dev}]",
              "--set", f"train.max_steps={args.steps}", "--set", f"train.seed={args.seed}"]
    conditions = [c for c in "abcde" if c in args.conditions and (c != "e" or args.transfer_from)]

    pretrained = args.pretrained.resolve() if args.pretrained else out / "pretrain" / "hf_model"
    if {"b", "d"} & set(conditions) and not args.pretrained:
        run("b", pretrained, "pretrain", "--config", str(PRETRAIN), "--set", f"data.train=[cv:{corpus}:train]",
            "--set", f"data.eval=[{dev}]", "--set", f"train.max_steps={args.pretrain_steps}",
            "--set", f"train.output_dir={out / 'pretrain'}", "--set", f"train.seed={args.seed}")
    from_pretrained = ["--set", f"model.pretrained={pretrained}",
                       "--set", f"model.freeze_feature_encoder={args.freeze_feature_encoder}",
                       "--set", f"model.freeze_transformer_steps={args.head_only_steps}"]
    starts = {"a": [], "b": from_pretrained, "c": [], "d": from_pretrained,
              "e": ["--set", f"model.pretrained={args.transfer_from}"]}
    teachers = {"c": "a", "d": "b"}

    for c in conditions:
        train_data = [f"manifest:{labelled}"]
        if c in teachers:
            teacher, labels = out / teachers[c], out / f"{c}_pseudo.tsv"
            run(c, labels, "pseudo-label", str(teacher), "--data", f"manifest:{unlabelled}", "--out", str(labels),
                "--top-fraction", str(args.top_fraction))
            train_data.append(f"manifest:{labels}")
        run(c, out / c / "finished.json", "train", "--config", str(FINETUNE), *common, *starts[c],
            "--set", f"data.train=[{', '.join(train_data)}]", "--set", f"train.output_dir={out / c}")
        for split, spec in (("dev", dev), ("test", test)):
            result = out / f"{c}_{split}.json"
            text = run(c, result, "evaluate", str(out / c), "--data", spec)
            if text:  # "" when an earlier run of this script scored it
                _replace(result, json.dumps(scores(text)))

    # The table and curves hold every condition scored in --out, by this run of the script or an earlier one.
    results = []
    for c in "abcde":
        row = {"condition": c}
        for split in ("dev", "test"):
            result = out / f"{c}_{split}.json"
            if result.exists():
                row.update({f"{split}_{k}": v for k, v in json.loads(result.read_text()).items()})
        if len(row) > 1:
            results.append(row)
    plot_conditions(out, [row["condition"] for row in results], out / "curves.png")

    cost = run.costs()
    columns = ["condition", "dev_cer", "test_cer", "dev_wer", "test_wer", "cpu_min", "wall_min"]
    with open(out / "results.tsv", "w") as f:
        f.write("\t".join(columns) + "\n")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in results:
            cpu, wall = cost.get(row["condition"], [0.0, 0.0])
            row.update(cpu_min=cpu / 60, wall_min=wall / 60)
            values = [row["condition"]] + [f"{row.get(k, float('nan')):.4f}" for k in columns[1:5]] + \
                [f"{row['cpu_min']:.1f}", f"{row['wall_min']:.1f}"]
            f.write("\t".join(values) + "\n")
            lines.append("| " + " | ".join(values) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
