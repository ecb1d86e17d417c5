"""xlsr-jax: fine-tune XLSR-Wav2Vec2 speech recognition for any language with JAX/Flax, then evaluate
it, export it to a Hugging Face PyTorch model and push it to the Hub."""

# Each command parses its arguments and calls one library function; the logic lives in the library.

from __future__ import annotations

import argparse
import logging
import os
import sys

from xlsr_jax.errors import UserError

ROAD = """the road from data to a Hub model:
  xlsr-jax plan --config configs/demo.yaml --memory-gib 80      # batch per bucket that fits a device (optional)
  xlsr-jax train --config configs/demo.yaml                     # checkpoints, metrics, hf_model/
  xlsr-jax evaluate runs/demo --data cv:data/demo_tr:test       # WER/CER, predictions TSV, eval_results.json
  xlsr-jax export runs/demo exports/demo --best                 # PyTorch folder + model card, self-checked
  xlsr-jax push exports/demo --repo-id USER/NAME --dry-run      # check, then push without --dry-run
  xlsr-jax pretrain --config configs/pretrain_demo.yaml         # optional first: wav2vec 2.0 on audio alone
  xlsr-jax pseudo-label runs/demo --data SPEC --out labels.tsv  # transcripts of unlabelled audio, to train on
see `xlsr-jax COMMAND --help` for each, and `xlsr-jax config` for every training setting."""


def _train(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.rundir import RunDir
    from xlsr_jax.recipe import train  # jax import only for commands that need it
    from xlsr_jax.train.summary import format_run_summary

    config = load_config(args.config, args.set)
    result = train(config)
    run = RunDir(config.train.output_dir)
    if result.get("run/already_finished"):
        print(f"already finished: {run.path} has trained its steps; to train on, raise train.max_steps (or "
              "train.num_train_epochs); for a new run, choose another train.output_dir")
    if run.finished.exists():
        print(format_run_summary(run))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.pretrain.objective import format_pretrain_summary, pretrain
    from xlsr_jax.rundir import RunDir

    config = load_config(args.config, args.set)
    result = pretrain(config)
    if result.get("run/already_finished"):
        print(f"already finished: {config.train.output_dir} has trained its steps; raise train.max_steps to go on")
    print(format_pretrain_summary(RunDir(config.train.output_dir), result))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.sweep.search import format_results, run_sweep
    from xlsr_jax.sweep.space import load_space

    config = load_config(args.config, args.set)
    result = run_sweep(config, load_space(args.space), sweep_dir=args.sweep_dir, trials=args.trials)
    print(format_results(result))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.train.plan import format_plan, plan

    config = load_config(args.config, args.set)
    if args.as_configured or args.pretraining:
        from xlsr_jax.train.plan import compile_run, format_run_compile

        if args.topology is None:
            raise UserError("plan --as-configured / --pretraining compile for a TPU slice: give --topology (e.g. "
                            "v5litepod-8); on a GPU, train itself compiles every step before the first one")
        if args.pretraining:
            from xlsr_jax.pretrain.objective import Pretraining

            objective = Pretraining()
        else:
            from xlsr_jax.recipe import tasks
            from xlsr_jax.train.ctc import CTC

            objective = CTC(tasks())
        result = compile_run(config, objective, args.topology, seconds=args.seconds)
        print(format_run_compile(result))
        return 0 if result.fits else 1
    print(format_plan(plan(config, memory_gib=args.memory_gib, max_batch=args.max_batch, topology=args.topology,
                           seconds=args.seconds)))
    return 0


def _config(args: argparse.Namespace) -> int:
    from xlsr_jax.config import describe_config, load_config

    sys.stdout.write(describe_config(load_config(args.config, args.set)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from xlsr_jax.infer.evaluate import evaluate, format_summary

    result = evaluate(args.source, args.data, step=args.step, best=args.best, average=args.average, out=args.out, lm=args.lm,
                      alpha=args.alpha, beta=args.beta, beam_width=args.beam_width, batch_size=args.batch_size,
                      fsdp=args.fsdp, language=args.language, cache_dir=args.cache_dir)
    print(format_summary(result))
    return 0


def _pseudo_label(args: argparse.Namespace) -> int:
    from xlsr_jax.infer.pseudo_label import format_summary, pseudo_label

    result = pseudo_label(args.source, args.data, args.out, step=args.step, best=args.best, average=args.average,
                          lm=args.lm,
                          alpha=args.alpha, beta=args.beta, beam_width=args.beam_width,
                          min_confidence=args.min_confidence, top_fraction=args.top_fraction,
                          batch_size=args.batch_size, fsdp=args.fsdp, cache_dir=args.cache_dir)
    print(format_summary(result))
    return 0


def _export(args: argparse.Namespace) -> int:
    from xlsr_jax.hub.export import export_run

    lm = {"path": args.lm, "alpha": args.alpha, "beta": args.beta} if args.lm else None
    out = export_run(args.run_dir, args.out_dir, step=args.step, best=args.best, average=args.average, torch_bin=args.bin,
                     lm=lm,
                     verify=False if args.no_check else None, force=args.force)
    print(f"exported step {out['step']} ({out['selected']}) of {args.run_dir} to {out['out_dir']}")
    check = out["check"]
    if check is None:
        print("self-check: skipped (torch is not installed; pip install 'xlsr-jax[torch]' to have it)")
    else:
        print(f"self-check on {check['clips']} clips: max |dlogits| {check['max_abs_diff']:.2e}, "
              f"greedy transcripts identical: {check['transcripts_identical']}"
              + ("; the LM loads in pyctcdecode and decodes alike" if "lm_transcripts" in check else ""))
    wer = [f"{r['dataset']['name']} {r['dataset']['split']} ({r['decoder']['type']}): WER {100 * r['wer']:.2f} %, "
           f"CER {100 * r['cer']:.2f} %" for r in out["results"]]
    print("model card: " + ("; ".join(wer) if wer else "no evaluation of this step yet (run xlsr-jax evaluate)"))
    return 0


def _push(args: argparse.Namespace) -> int:
    from xlsr_jax.hub.push import push_folder

    upload = push_folder(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(upload.files)} files to https://huggingface.co/{args.repo_id}:")
    print("\n".join(f"  {f}" for f in upload.files))
    if upload.left_out:
        print(f"left out {len(upload.left_out)} (only the files export writes go up):")
        print("\n".join(f"  {f}" for f in upload.left_out))
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    from xlsr_jax.infer.transcribe import run_transcribe

    result = run_transcribe(args.model, args.files, step=args.step, best=args.best, average=args.average, out=args.out,
                            chunk_length_s=args.chunk_length_s, stride_length_s=args.stride_length_s,
                            batch_size=args.batch_size, lm=args.lm, alpha=args.alpha, beta=args.beta,
                            beam_width=args.beam_width)
    if args.out:
        print(f"wrote {result.written} transcripts to {args.out}")
    if result.skipped:
        print(f"xlsr-jax transcribe: skipped {len(result.skipped)} of {len(args.files)} files that could not be "
              "read:\n" + "\n".join(f"  {line}" for line in result.skipped), file=sys.stderr)
    # 1, not 2: the command ran and wrote what it could; 2 says nothing was done (bad arguments, no file read).
    return 1 if result.skipped and not args.keep_going else 0


def _build_lm(args: argparse.Namespace) -> int:
    from xlsr_jax.infer.build_lm import build_lm

    out = build_lm(args.data, args.out, order=args.order, run=args.run, language=args.language)
    print(f"wrote {out['path']}: {out['order']}-gram from {out['sentences']} sentences, "
          f"{out['words']} words, {out['unigrams']} distinct")
    return 0


def _inventory(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.data.inventory import character_inventory, format_inventory
    from xlsr_jax.data.pipeline import read_examples

    data = load_config(args.config, args.set).data
    examples = read_examples(args.specs, data)
    sys.stdout.write(format_inventory(character_inventory(examples, data.normalization(args.language))))
    return 0


def _split(args: argparse.Namespace) -> int:
    from xlsr_jax.config import load_config
    from xlsr_jax.data.split import format_split, make_split
    from xlsr_jax.data.pipeline import read_examples

    data = load_config(args.config, args.set).data
    split, paths = make_split(read_examples(args.specs, data), args.out, dev=args.dev, test=args.test,
                              seed=args.seed, normalization=data.normalization(args.language))
    sys.stdout.write(format_split(split, paths))
    return 0


def _add_checkpoint_choice(parser: argparse.ArgumentParser) -> None:
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--step", type=int, help="use the run's checkpoint of this step (default: the newest)")
    choice.add_argument("--best", action="store_true",
                        help="use the run's best checkpoint by checkpoint.best_metric (default eval/wer)")
    parser.add_argument("--average", type=_positive_int, default=1, metavar="N",
                        help="the mean of the run's N newest kept checkpoints (with --best: its N best)")


def _add_model_pass(parser: argparse.ArgumentParser, data_help: str) -> None:
    """The arguments of a pass of a model over data (evaluate, pseudo-label): the model, its checkpoint,
    the data, how it is batched and cached, and the decoder."""
    parser.add_argument("source", help="run directory, exported model folder, or hub id")
    parser.add_argument("--data", action="append", required=True, metavar="SPEC", help=data_help)
    _add_checkpoint_choice(parser)
    parser.add_argument("--batch-size", type=int, help="utterances per device per batch")
    parser.add_argument("--fsdp", type=int, default=1, help="shard parameters over this many devices")
    parser.add_argument("--cache-dir", help="decoded-audio cache (default: the run's, or ~/.cache/xlsr_jax)")
    _add_lm(parser)


def _add_lm(parser: argparse.ArgumentParser, beam: bool = True) -> None:
    lm = parser.add_argument_group("n-gram language model (needs the `lm` extra, see README)")
    lm.add_argument("--lm", metavar="PATH",
                    help="ARPA or KenLM binary file, or a model folder carrying language_model/; default: greedy")
    lm.add_argument("--alpha", type=float, help="LM weight (default: the LM folder's own, else 0.5)")
    lm.add_argument("--beta", type=float, help="word insertion bonus (default: the LM folder's own, else 1.0)")
    if beam:
        lm.add_argument("--beam-width", type=int, default=100, help="beam width (default 100)")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")


def _config_command(commands, name: str, handler, help: str, description: str) -> argparse.ArgumentParser:
    """A command that reads the config tree (--config, --set), for the caller to add its own arguments to."""
    p = commands.add_parser(name, help=help, description=description)
    _add_config_args(p)
    p.set_defaults(handler=handler)
    return p


def _parse_train(commands) -> None:
    _config_command(commands, "train", _train, help="fine-tune XLSR-53 (or train from scratch) on speech + transcripts",
                    description="Train as configured; the same command resumes a stopped run. Every setting, with "
                                "its default and meaning: `xlsr-jax config [--config F]`.")


def _parse_pretrain(commands) -> None:
    _config_command(commands, "pretrain", _pretrain,
                    help="continue wav2vec 2.0 self-supervised pretraining on audio alone",
                    description="Train the masked contrastive task (Wav2Vec2ForPreTraining) on untranscribed audio as "
                                "configured (the pretrain: section; model.pretrained: a Hugging Face pretraining "
                                "folder, or null for a new model); the same command resumes a stopped run. "
                                "hf_model/ is then a folder `xlsr-jax train` fine-tunes with model.pretrained.")


def _parse_sweep(commands) -> None:
    p = _config_command(commands, "sweep", _sweep,
                        help="hyperparameter search: grid, random or optuna's TPE, each trial a run",
                        description="Train one trial after another with the config keys of --space set to each "
                                    "trial's values; results.tsv and sweep.png in the sweep folder. The same command "
                                    "continues a killed sweep (see README, Hyperparameter search).")
    p.add_argument("--space", required=True, help="search space YAML (method, metric, mode, prune, seed, params)")
    p.add_argument("--trials", type=int,
                   help="trials in the sweep, counting those already run (default for grid: every point); "
                        "0: only print the results so far")
    p.add_argument("--sweep-dir", help="folder of the sweep (default: <train.output_dir>-sweep)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return value


def _floats(text: str) -> tuple[float, ...]:
    """"5,10,15" -> (5.0, 10.0, 15.0), each > 0."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 5,10,15") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: every length must be > 0")
    return values


def _parse_plan(commands) -> None:
    p = _config_command(commands, "plan", _plan,
                        help="largest per-device batch of each length bucket that fits in memory",
                        description="Build the training data as `train` would, then for each length bucket find the "
                                    "largest per-device batch whose compiled train step fits --memory-gib (XLA's "
                                    "memory estimate, compiled over this host's devices as mesh shards them, or "
                                    "with --topology for a TPU slice), and suggest a per-device audio-seconds "
                                    "budget for token-budget batching.")
    p.add_argument("--memory-gib", type=float,
                   help="memory per device in GiB (default: this device's, where it reports one; CPUs do not)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest per-device batch to try (default 1024)")
    p.add_argument("--topology", help="compile for this TPU slice instead, as Cloud names it (v5litepod-8, v6e-8, "
                                      "v4-32: 4 hosts, v5p-8) or as libtpu does (v5e:2x4, v4:2x2x4): on any machine, "
                                      "no TPU needed (libtpu: pip install 'xlsr-jax[tpu]'); budget: the chip's HBM")
    p.add_argument("--seconds", type=_floats, default=(),
                   help="plan these padded clip lengths instead of the data's buckets, e.g. 5,10,15")
    p.add_argument("--as-configured", action="store_true",
                   help="with --topology: compile the run's train and eval steps at the configured batch as `train` "
                        "compiles them, print each one's HBM per chip; exit 1 when one does not fit")
    p.add_argument("--pretraining", action="store_true",
                   help="--as-configured for `xlsr-jax pretrain` (the config's pretrain: steps)")


def _parse_config(commands) -> None:
    _config_command(commands, "config", _config, help="print every training setting: resolved value, meaning, default",
                    description="Print the resolved config tree as YAML, each key with its meaning and default; the "
                                "output is a valid --config file.")


def _parse_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="WER/CER of a run's checkpoint, an export or a hub model on a split",
                            description="Score SOURCE on --data with the text normalisation it trained with. "
                                        "Writes a predictions TSV and records the result in eval_results.json "
                                        "(the model card's numbers). The last two lines are `wer: X`, `cer: X`.")
    _add_model_pass(p, "cv:DIR[:SPLITS] or manifest:FILE (repeatable), e.g. cv:/data/cv-corpus/tr:test")
    p.add_argument("--out", help="predictions TSV (default: in the run / model folder)")
    p.add_argument("--language", help="normalise references as this language (default: the model's own)")
    p.set_defaults(handler=_evaluate)


def _parse_pseudo_label(commands) -> None:
    p = commands.add_parser("pseudo-label", help="transcribe untranscribed audio into a manifest train can mix in",
                            description="Transcribe the audio of --data with SOURCE (greedy, or with --lm) and "
                                        "write the transcripts it is surest of to --out, a manifest for "
                                        "`train` (data.train: manifest:OUT?weight=W), and every row with its "
                                        "confidence (mean frame log-prob of the greedy path) to OUT's .all.tsv. "
                                        "Test splits are refused.")
    _add_model_pass(p, "audio to transcribe (repeatable; any transcripts it has are ignored), e.g. "
                       "cv:/data/cv-corpus/tr:other+invalidated or a manifest with only a path column")
    p.add_argument("--out", required=True, help="the manifest of kept rows (.tsv)")
    p.add_argument("--min-confidence", type=float, help="keep rows whose confidence is at least this (<= 0)")
    p.add_argument("--top-fraction", type=float, help="keep the surest fraction of rows, in (0, 1]")
    p.set_defaults(handler=_pseudo_label)


def _parse_export(commands) -> None:
    p = commands.add_parser("export", help="convert a run's checkpoint to a Hugging Face PyTorch folder + card",
                            description="Any kept checkpoint of RUN_DIR -> OUT_DIR with config.json, "
                                        "model.safetensors, the processor files, text_normalization.json, "
                                        "README.md (model card) and training curves. With torch installed "
                                        "the PyTorch model is checked against the checkpoint.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    _add_checkpoint_choice(p)
    p.add_argument("--bin", action="store_true", help="also write pytorch_model.bin (needs torch)")
    p.add_argument("--no-check", action="store_true", help="skip the PyTorch self-check")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty OUT_DIR that is no earlier export (a clone of a Hub repo, say): "
                        "only the names export writes are replaced, nothing else there is touched")
    _add_lm(p, beam=False)
    p.set_defaults(handler=_export)


def _parse_push(commands) -> None:
    p = commands.add_parser("push", help="upload an exported folder to the Hugging Face Hub",
                            description="Check FOLDER (files, vocab size = head size, processor loads, card "
                                        "has a WER or says why not) and upload the files `xlsr-jax export` "
                                        "writes (config, weights, processor and tokenizer files, card, "
                                        "curves, eval results, alphabet.json and language_model/'s files). "
                                        "Nothing else goes up: no dotfiles (.env), no other files or folders, "
                                        "no symlinks (an export file that is one stops the push); what is "
                                        "left out is listed. The token comes from HF_TOKEN or `hf auth "
                                        "login`; it is never printed.")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="check and list the files to upload and those left out; upload nothing")
    p.set_defaults(handler=_push)


def _parse_transcribe(commands) -> None:
    p = commands.add_parser("transcribe", help="transcribe audio files (any format, any length)",
                            description="Long files are read in blocks, cut into overlapping chunks and "
                                        "stitched like transformers' pipeline. Text goes to stdout, or with "
                                        "--out to a .tsv or .json with word start/end times. Files that "
                                        "cannot be read are skipped and named on stderr. Exit status: 0 when "
                                        "every file was transcribed; 1 when some were skipped (the others "
                                        "are still transcribed; 0 with --keep-going); 2 when none could be "
                                        "read or an option is wrong.")
    p.add_argument("model", help="run directory, exported model folder, or hub id")
    p.add_argument("files", nargs="+", metavar="FILE")
    _add_checkpoint_choice(p)
    p.add_argument("--out", help="write a .tsv or .json (with word times) instead of printing")
    p.add_argument("--chunk-length-s", type=float, default=20.0)
    p.add_argument("--stride-length-s", type=float, help="overlap on each side (default: chunk / 6)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per batch")
    p.add_argument("--keep-going", action="store_true",
                   help="exit 0 even when some files could not be read (they are still named on stderr)")
    _add_lm(p)
    p.set_defaults(handler=_transcribe)


def _parse_build_lm(commands) -> None:
    p = commands.add_parser("build-lm", help="write an ARPA n-gram LM from training transcripts",
                            description="Word n-gram (interpolated modified Kneser-Ney) from the transcripts "
                                        "of --data, normalised as a run trained (--run) or for --language. "
                                        "Common Voice test splits are refused: they are the benchmark.")
    p.add_argument("--data", action="append", required=True, metavar="SPEC")
    p.add_argument("--out", required=True, help="the .arpa file to write")
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--run", help="normalise text as this run directory did")
    p.add_argument("--language", help="normalise for this language (without --run)")
    p.set_defaults(handler=_build_lm)


def _parse_inventory(commands) -> None:
    p = commands.add_parser("inventory", help="characters of a source's transcripts before and after normalisation",
                            description="Count every character of the transcripts of SPEC, raw and normalised as "
                                        "training would (data.language / --language presets, chars_to_ignore, "
                                        "keep_apostrophes, unicode_normalization), with its Unicode name and a "
                                        "word it occurs in. Each character left after normalisation becomes a "
                                        "vocabulary entry: drop one with --set data.chars_to_ignore=... only if "
                                        "removing it changes no word's meaning.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="cv:DIR[:SPLITS] or manifest:FILE")
    p.add_argument("--language", help="normalise as this language (default: data.language, else each locale)")
    _add_config_args(p)
    p.set_defaults(handler=_inventory)


def _parse_split(commands) -> None:
    p = commands.add_parser("split", help="speaker-disjoint train/dev/test manifests for data without a test split",
                            description="Write OUT/train.tsv, dev.tsv, test.tsv (use them as manifest:FILE) with "
                                        "no speaker in two splits, sizes by utterance count near --dev/--test, "
                                        "the same for the same --seed. Sentences are kept apart too where that "
                                        "leaves dev and test near their size; else the shared ones are counted.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="cv:DIR[:SPLITS] or manifest:FILE, e.g. cv:DIR:validated")
    p.add_argument("--out", required=True, help="folder for the three manifests")
    p.add_argument("--dev", type=float, default=0.1, help="share of utterances for dev (default 0.1)")
    p.add_argument("--test", type=float, default=0.1, help="share of utterances for test (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--language", help="compare sentences normalised as this language (default: data.language)")
    _add_config_args(p)
    p.set_defaults(handler=_split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlsr-jax", description=__doc__, epilog=ROAD,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_parse_train, _parse_pretrain, _parse_sweep, _parse_plan, _parse_config, _parse_evaluate,
                _parse_pseudo_label, _parse_export, _parse_push, _parse_transcribe, _parse_build_lm, _parse_inventory,
                _parse_split):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # No "PyTorch was not found" banner: exporting to PyTorch needs no torch here. transformers prints it
    # from its __init__, which can run more than once (its legacy-alias import hook), so the switch
    # stays on for the process; a user can still set TRANSFORMERS_NO_ADVISORY_WARNINGS= to see advice.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from xlsr_jax.hub.verify import ExportCheckError
    from xlsr_jax.malloc import retain_freed_memory

    retain_freed_memory()  # before JAX starts: a CPU step's freed memory stays mapped for the next one

    try:
        return args.handler(args)
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        print(f"xlsr-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ExportCheckError as err:
        print(f"xlsr-jax {args.command}: the export failed its check: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
