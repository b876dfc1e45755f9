"""The `distill` command: parse arguments, call one function per verb.

User mistakes (bad config, missing file, mismatched tokenizer, empty data), a non-finite value under
``train.nonfinite: stop`` and a full or read-only disk print one line and exit with code 2; an
interrupted training run (Ctrl-C, or SIGTERM as a scheduler's preemption sends) exits with 130 (143
for SIGTERM) after saving a checkpoint. `distill eval` exits with 0 when
a model has non-finite outputs: that is a finding of the evaluation, which succeeded; the model is
marked in the table and the report and named in a warning on stderr.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from distill import __version__

# A full or read-only disk, a quota, a file-size limit, no permission: the user's to fix, not a bug.
DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation for language models.")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    train = verbs.add_parser("train", help="train a student from a teacher (or alone, with loss.kd_weight=0)",
                             description="Train a student as CONFIG says. Re-running on the same output "
                                         "directory resumes from its last checkpoint.")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    quick = verbs.add_parser("quickstart", help="the whole pipeline on the bundled teacher and corpus, offline",
                             description="Train a baseline and a distilled student on the bundled CPython corpus, "
                                         "evaluate them against the bundled teacher, write quickstart.json and "
                                         "report.html. --task classify: the same for a sentiment classifier on "
                                         "the bundled Rotten Tomatoes snippets (teacher trained first).")
    quick.add_argument("--task", default="lm", choices=["lm", "classify"],
                       help="lm: a causal LM on Python code (default); classify: a sentiment classifier")
    quick.add_argument("--out", default=None,
                       help="output directory (default: runs/quickstart, or runs/quickstart-classify)")
    quick.add_argument("--minutes", type=float, default=5.0,
                       help="length, as minutes on a 2-core CPU (sets the step count; default 5)")
    quick.add_argument("--steps", type=int, default=None, help="training steps per student (overrides --minutes)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--prompts", type=int, default=16, help="eval prompts to complete per model")
    quick.add_argument("--max-eval-examples", type=int, default=None,
                       help="evaluate on the first N eval files only, in training too (smoke runs)")

    cache = verbs.add_parser("cache", help="run the teacher once over the training data and store its top-k targets",
                             description="Write the teacher's top-k (or sampled) targets for the training data "
                                         "of CONFIG to cache.dir. Re-running continues an interrupted cache.")
    cache.add_argument("config", help="YAML config file")
    cache.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    gen = verbs.add_parser("generate", help="the teacher writes training data: completions, verified chain-of-thought "
                                            "traces, synthetic prompts",
                           description="Sample the teacher (teacher.model, or an OpenAI-compatible server under "
                                       "teacher.http) on the prompts of data.train (or on prompts it writes itself, "
                                       "generate.synthetic) and write generate.output/data.jsonl for `distill train`. "
                                       "Re-running on the same output folder resumes.")
    gen.add_argument("config", help="YAML config file")
    gen.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")

    plan = verbs.add_parser("plan", help="the memory per process a training run needs, from the model configs alone",
                            description="Estimate, without loading weights, the per-process memory of CONFIG's "
                                        "training run (parameters, gradients, optimizer state, teacher, activations, "
                                        "loss buffers) for DDP and FSDP2, whether it fits, and the largest "
                                        "micro-batch that does. causal_lm runs only.")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    plan.add_argument("--processes", type=int, default=1, help="processes (GPUs) the run is launched on (default 1)")
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                      help="memory per process in GiB (default: train.memory_gb, else this machine's GPU or RAM)")

    show = verbs.add_parser("config", help="validate a config and print it resolved, with every default")
    show.add_argument("config", help="YAML config file")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value")

    ev = verbs.add_parser("eval", help="compare a teacher and students on data; write eval.json and report.html",
                          description="Evaluate models (and a teacher, the reference for fidelity metrics) on "
                                      "SOURCE: likelihood, agreement and KL with the teacher, sampled "
                                      "completions, speed. Writes eval.json and a self-contained report.html.")
    ev.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a model to evaluate (repeat)")
    ev.add_argument("--teacher", metavar="PATH", help="the teacher: evaluated too, and the reference")
    ev.add_argument("--data", metavar="SOURCE", help="text data, or labelled rows for classifiers (a file, folder, glob or hub id)")
    ev.add_argument("--generated", metavar="DIR", help="score what `distill generate` wrote in DIR instead: lengths, "
                                                      "verification rate, distinctness, and the --teacher's NLL")
    ev.add_argument("--out", default="distill-eval", metavar="DIR", help="output directory (default: distill-eval)")
    ev.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a `distill train` output directory whose loss curves go in the report (repeat)")
    ev.add_argument("--max-length", type=int, default=256, metavar="N", help="tokens per scored block (256)")
    ev.add_argument("--max-examples", type=int, default=None, metavar="N", help="use only the first N documents")
    ev.add_argument("--prompts", type=int, default=16, metavar="N", help="prompts to complete (16; 0: none)")
    ev.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per completion (64)")
    ev.add_argument("--batch-size", type=int, default=8, metavar="N", help="batch size (8)")
    ev.add_argument("--seed", type=int, default=0, metavar="N", help="prompt choice and sampling seed (0)")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    ev.add_argument("--text-field", default="text", metavar="NAME", help="classifiers and encoders: the text column (text)")
    ev.add_argument("--text-pair-field", default=None, metavar="NAME", help="classifiers: a second text column")
    ev.add_argument("--label-field", default="label", metavar="NAME", help="classifiers (and encoders, for k-NN accuracy, when present): the label column (label)")
    ev.add_argument("--draft-prompts", type=int, default=8, metavar="N",
                    help="prompts on which the teacher samples with each model as its speculative-decoding draft, "
                         "timed against the teacher alone (8; 0: none)")

    ex = verbs.add_parser("export", help="a student as a GGUF file for llama.cpp or a torchao-quantized PyTorch build",
                          description="Export SRC (a `distill train` run directory or a Hugging Face model folder). "
                                      "GGUF: llama, mistral and qwen2 models with a byte-level BPE tokenizer; "
                                      "each file is checked against the HF model before it is kept (tokenization "
                                      "of a test set, next-token log-probabilities) and the check is written to "
                                      "<file>.json. torchao: int8 weight-only, int8 dynamic activations + int8 "
                                      "weights, int4 weight-only (group 32), loadable with from_pretrained.")
    ex.add_argument("src", metavar="SRC", help="run directory (its student/) or HF model folder")
    ex.add_argument("--to", required=True, choices=["gguf", "torchao"], help="build kind")
    ex.add_argument("--quant", required=True, metavar="TYPE",
                    help="gguf: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ... ; torchao: int8, int8_dynamic, "
                         "int4")
    ex.add_argument("--out", metavar="PATH", help="output file (gguf) or folder (torchao); default: RUN/export/"
                                                  "student-TYPE[.gguf], or beside an HF folder")
    ex.add_argument("--group-size", type=int, default=32, metavar="N", help="torchao int4: weights per scale (32)")
    ex.add_argument("--no-check", action="store_true", help="skip the comparison with the HF model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _dump_stacks_on_sigusr1()
    if args.verb is None:
        _parser().print_help()
        return 2
    from distill.errors import UserError  # heavy imports after argument parsing keeps --help fast

    _quiet_optional_imports()

    try:
        if args.verb == "config":
            import yaml
            from distill.config import load_config

            stage = "generate" if any(o.startswith("generate.") for o in args.overrides) or _has_section(
                args.config, "generate") else "train"
            print(yaml.safe_dump(load_config(args.config, args.overrides, stage=stage).to_dict(), sort_keys=False),
                  end="")
        elif args.verb == "quickstart":
            if (args.steps is not None and args.steps < 1) or args.minutes <= 0 or args.prompts < 0:
                raise UserError("--steps and --minutes must be positive, --prompts >= 0")
            if args.task == "classify":
                from distill.quickstart_classify import quickstart_classify

                quickstart_classify(args.out or "runs/quickstart-classify", minutes=args.minutes, steps=args.steps,
                                    seed=args.seed, max_eval_examples=args.max_eval_examples)
            else:
                from distill.quickstart import quickstart

                quickstart(args.out or "runs/quickstart", minutes=args.minutes, steps=args.steps, seed=args.seed,
                           prompts=args.prompts, max_eval_examples=args.max_eval_examples)
        elif args.verb == "plan":
            from distill.config import load_config
            from distill.errors import UserError
            from distill.plan import plan_main

            if args.processes < 1 or (args.gpu_memory is not None and args.gpu_memory <= 0):
                raise UserError("--processes must be >= 1 and --gpu-memory > 0")
            print(plan_main(load_config(args.config, args.overrides), args.processes, args.gpu_memory))
        elif args.verb == "train":
            from distill.training import train

            result = train(args.config, args.overrides)
            if os.environ.get("RANK", "0") == "0":  # once, not once per process
                print(_summary(result))
        elif args.verb == "cache":
            from distill.cache.writer import cache

            r = cache(args.config, args.overrides)
            if r["main_process"]:
                print(f"done: teacher cache in {r['dir']}: {r['shards']} shards ({r['written_now']} written now by "
                      f"this process), {r['positions']} positions, {r['bytes']} bytes, {r['bytes_per_position']} "
                      "bytes/position")
        elif args.verb == "generate":
            _generate(args)
        elif args.verb == "eval":
            _eval(args)
        elif args.verb == "export":
            _export(args)
    except UserError as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"distill: error: could not write{where}: {e.strerror}; free space (or fix permissions) and run the "
              "same command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from distill.training import Terminated

        print("distill: terminated" if isinstance(e, Terminated) else "distill: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


def _has_section(path: str, name: str) -> bool:
    """The YAML file at ``path`` has a top-level ``name`` section (a `distill generate` config); False
    when it cannot be read (load_config then says why)."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and name in raw


def _quiet_optional_imports() -> None:
    """transformers imports torchao whenever it is installed; on a CPU machine torchao then logs a
    warning per CUDA kernel library it cannot load, and torch one per enum it registers. Neither is
    about the user's run."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to stderr: where a stuck run is."""
    import faulthandler
    import signal

    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows), or stderr is not a real file
        pass


def _summary(result: dict) -> str:
    lines = [f"done: {result['step']} steps; student saved to {result['student']}"]
    for key, value in result.items():
        if key.startswith("eval/"):
            lines.append(f"  {key[5:]:<18} {value:.4f}" if isinstance(value, float) else f"  {key[5:]:<18} {value}")
    return "\n".join(lines)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    from distill.errors import UserError

    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"{flag} {value!r}: expected NAME=PATH")
        if name in pairs:
            raise UserError(f"{flag} {name!r} is given twice")
        pairs[name] = path
    return pairs


def _eval(args) -> None:
    """Evaluate, write eval.json and report.html, print the table.

    A model with non-finite (NaN or infinite) outputs gets one ``distill: warning:`` line on stderr
    and "non-finite" in the cells of the metrics it lacks; the exit code stays 0, since the
    evaluation itself succeeded and its result, that model's failure, is reported."""
    from distill.errors import UserError
    from distill.evaluate import evaluate_models
    from distill.report import nonfinite_warnings, read_run_metrics

    if args.generated:
        return _eval_generated(args)
    if not args.data:
        raise UserError("give --data SOURCE (the text to evaluate on), or --generated DIR")
    models, runs = _pairs(args.model, "--model"), _pairs(args.run, "--run")
    if not models:
        raise UserError("no models to evaluate: give at least one --model NAME=PATH")
    for name, path in [*models.items(), *([("teacher", args.teacher)] if args.teacher else [])]:
        if not os.path.exists(os.path.expanduser(path)) and path.startswith(("/", ".", "~")):
            raise UserError(f"model {name!r} not found: {path}")
    for path in runs.values():
        read_run_metrics(path)  # a bad run directory fails now, not after the evaluation
    from distill.evaluate_embed import evaluate_encoders, is_encoder

    if any(is_encoder(p) for p in models.values()):  # sentence encoders (a classifier teacher: its encoder)
        results = evaluate_encoders(models, args.data, teacher=args.teacher, text_field=args.text_field,
                                    label_field=args.label_field, max_length=args.max_length,
                                    max_examples=args.max_examples, batch_size=args.batch_size,
                                    speed=not args.no_speed, dtype=args.dtype)
        return _write_eval(results, args.out, runs)
    from distill.evaluate_classify import evaluate_classifiers, is_classifier

    if any(is_classifier(p) for p in [*models.values(), *([args.teacher] if args.teacher else [])]):
        results = evaluate_classifiers(models, args.data, teacher=args.teacher, text_field=args.text_field,
                                       text_pair_field=args.text_pair_field, label_field=args.label_field,
                                       max_length=args.max_length, max_examples=args.max_examples,
                                       batch_size=args.batch_size, speed=not args.no_speed, dtype=args.dtype)
        return _write_eval(results, args.out, runs)
    results = evaluate_models(models, args.data, teacher=args.teacher, max_length=args.max_length,
                              max_examples=args.max_examples, num_prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                              speed=not args.no_speed, dtype=args.dtype, draft_prompts=args.draft_prompts)
    _write_eval(results, args.out, runs)
    for line in nonfinite_warnings(results):
        print(f"distill: warning: {line}", file=sys.stderr)


def _write_eval(results: dict, out: str, runs: dict) -> None:
    from distill.report import write_report

    json_path, html_path = write_report(results, out, runs=runs)
    print(_eval_table(results))
    print(f"\nwrote {json_path}\n      {html_path}")


def _generate(args) -> None:
    from distill.generate import generate

    m = generate(args.config, args.overrides)
    c, r = m["counts"], m["run"]
    for line in m.get("warnings", []):
        print(f"distill: warning: {line}", file=sys.stderr)
    out = m["settings"]
    print(f"done: {c['kept']} of {c['samples']} samples kept ({c['prompts']} prompts) in {m['dir']}"
          f"/{m['data']}; {r['samples_now']} sampled now, {r['samples_per_s_now']:.2f} samples/s, "
          f"{r['tokens_per_s_now']:.0f} tokens/s")
    if out.get("cot") is not None:
        print(f"  verification: {c['correct']} correct, {c['wrong']} wrong, {c['unparseable']} without an answer")
    lp = m.get("logprobs")
    if lp and lp.get("cache"):
        print(f"  teacher top-{lp['k']} log-probs of {lp['rows']} rows: {lp['cache']}/ (with {lp['data']})")


def _eval_generated(args) -> None:
    from distill.errors import UserError
    from distill.evaluate import evaluate_generated
    from distill.report import generated_table, write_generated_report

    if args.model or args.data:
        raise UserError("--generated scores generated data: it takes --teacher, not --model or --data")
    result = evaluate_generated(args.generated, teacher=args.teacher, max_length=args.max_length,
                                batch_size=args.batch_size, dtype=args.dtype, max_examples=args.max_examples)
    json_path, html_path = write_generated_report(result, args.out)
    width = max(len(label) for label, _ in generated_table(result)) + 2
    print("\n".join(f"{label:<{width}}{value}" for label, value in generated_table(result)))
    print(f"\nwrote {json_path}\n      {html_path}")


def _export(args) -> None:
    from distill.export import export

    r = export(args.src, to=args.to, quant=args.quant, out=args.out, check=not args.no_check,
               group_size=args.group_size, progress=False)
    for line in r.get("warnings", []):
        print(f"distill: warning: {line}", file=sys.stderr)
    size = r["bytes"] / 1e6
    print(f"done: {r['path']} ({args.to} {r['quant']}, {size:.1f} MB from {r['source_bytes'] / 1e6:.1f} MB; "
          f"{r['seconds']:.1f} s)")
    check = r.get("check")
    if check is None:
        print("  not checked" + (" (--no-check)" if args.no_check else " (llama-cpp-python is not installed)")
              if args.to == "gguf" else "  not checked (--no-check)")
    elif args.to == "gguf":
        print(f"  llama.cpp tokenizes all {check['tokenizer_strings']} test strings as the HF tokenizer does")
    if check is not None:
        print(f"  vs the HF model on {check['positions']} positions: |Δ log p| mean {check['mean_abs_dlogp']:.4f}, "
              f"p95 {check['p95_abs_dlogp']:.4f}, max {check['max_abs_dlogp']:.4f}; KL {check['mean_kl']:.5f}; "
              f"top-1 agreement {check['top1_agreement']:.1%}")
    print(f"  summary: {r['path']}.json" if args.to == "gguf" else f"  summary: {r['path']}/export.json")


def _eval_table(results: dict) -> str:
    from distill.report import cell_text, shown_keys, task_metrics

    METRICS = task_metrics(results)  # noqa: N806
    names = list(results["models"])
    width = max(12, *(len(n) + 2 for n in names))
    keys = shown_keys(results, [k for k in METRICS if k != "size_mb"])
    label_width = max(len(METRICS[k][0]) for k in keys) + 2
    lines = [f"{'':<{label_width}}" + "".join(f"{n:>{width}}" for n in names)]
    for key in keys:
        label = METRICS[key][0]
        lines.append(f"{label:<{label_width}}" + "".join(
            f"{cell_text(results['models'][n], key):>{width}}" for n in names))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
