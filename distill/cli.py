"""The `distill` command: parse arguments, call one function per verb.

User mistakes (bad config, missing file, mismatched tokenizer, empty data) print one line and
exit with code 2; an interrupted training run exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from distill import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for language models.")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    train = verbs.add_parser("train", help="train a student from a teacher (or alone, with loss.kd_weight=0)",
                             description="Train a student as CONFIG says. Re-running on the same output "
                                         "directory resumes from its last checkpoint.")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    show = verbs.add_parser("config", help="validate a config and print it resolved, with every default")
    show.add_argument("config", help="YAML config file")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb is None:
        _parser().print_help()
        return 2
    from distill.errors import UserError  # heavy imports after argument parsing keeps --help fast

    try:
        if args.verb == "config":
            import yaml
            from distill.config import load_config

            print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
        elif args.verb == "train":
            from distill.training import train

            result = train(args.config, args.overrides)
            print(_summary(result))
    except UserError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    return 0


def _summary(result: dict) -> str:
    lines = [f"done: {result['step']} steps; student saved to {result['student']}"]
    for key, value in result.items():
        if key.startswith("eval/"):
            lines.append(f"  {key[5:]:<18} {value:.4f}" if isinstance(value, float) else f"  {key[5:]:<18} {value}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
