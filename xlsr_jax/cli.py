"""`xlsr-jax <command>`: parse, load the config, call one library function."""

from __future__ import annotations

import argparse
import logging
import sys

from xlsr_jax.config import ConfigError, load_config


def _train(args: argparse.Namespace) -> int:
    from xlsr_jax.train.loop import train  # jax import only for commands that need it

    config = load_config(args.config, args.set)
    train(config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlsr-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune (or train from scratch) a wav2vec2 CTC model")
    train.add_argument("--config", help="YAML config file (configs/*.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    train.set_defaults(run=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"xlsr-jax: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
