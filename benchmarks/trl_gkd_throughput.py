"""On-policy distillation throughput of TRL's ``GKDTrainer``, as a baseline for ``distill``'s own trainer.

What it measures: ``trl.experimental.gkd.GKDTrainer`` run fully on-policy (``lmbda=1``). Every step the
student samples a completion for each prompt of the batch (``unwrapped_model.generate``, plain sampling:
temperature 1, top_k 0, top_p 1, up to ``--max-new-tokens``, stopping at EOS), then the student (with
grad) and the teacher (no grad) run a forward over prompt + completion and the generalized JSD
(``beta=0.5``) over the completion positions is back-propagated; AdamW, lr 1e-4, one micro-batch per
step. The teacher is the bundled Llama (``distill/assets/teacher``), the student a freshly initialised
``distill.quickstart.STUDENT_ARCH`` Llama (``torch.manual_seed(seed)``), both float32 weights; with
``--precision bf16`` the forwards (generation included) run under bf16 autocast (``bf16=True``).

Timing: the first ``--warmup-steps`` (2) optimizer steps are excluded; ``wall_s`` is the sum of the
remaining steps' ``on_step_begin`` -> ``on_step_end`` times (generation + both forwards + backward +
optimizer step; batch collation and logging fall outside and are reported apart as
``wall_s_with_overhead``, end of the last warm-up step -> end of the last step). Tokens of timed steps:
``generated_tokens`` = completion tokens the student sampled, up to and including the first EOS
(what ``generate_on_policy_outputs`` keeps: ``labels != -100``); ``trained_tokens`` = supervised
positions of the loss (shifted ``labels != -100``, the same positions, so the two are equal);
``tokens_per_s = (generated_tokens + trained_tokens) / wall_s``. One JSON line goes to stdout (and to
``OUT/result.json``).

Prompts are JSON Lines rows ``{"prompt": ...}`` fed as plain text: the ids the models see are exactly
``tokenizer(prompt, add_special_tokens=False).input_ids`` (no BOS, no chat markup). They are given to
TRL's own collator (``DataCollatorForChatML``) pre-tokenized (its ``input_ids`` + ``completion_mask``
branch), with a one-token placeholder completion (EOS) that the on-policy step replaces by the
student's sample; the script asserts on every batch that the prompts generated from are the plain ids.

Run it with a venv holding TRL (not the project's venv):

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0   # the CPU build
    /work/trl-venv/bin/pip install transformers==5.24.0 accelerate datasets trl torch==2.13.0
    /work/trl-venv/bin/python benchmarks/trl_gkd_throughput.py --prompts /tmp/onpolicy/train_prompts.jsonl \\
        --steps 20 --batch-size 8 --max-new-tokens 64 --precision bf16 --seed 0 --out /tmp/trl_gkd_out

Tested with trl 1.16.0, transformers 5.24.0, accelerate 1.16.0, torch 2.13.0+cpu.

Notes on what TRL does (trl 1.16.0; the reasons for the settings here):
- ``GKDConfig`` inherits ``SFTConfig``'s ``gradient_checkpointing=True`` default, and GKD then generates
  with ``use_cache=False`` (every new token re-runs the whole sequence) besides recomputing activations
  in the backward. Both are off here (``activation_checkpointing=False``), as in ``distill``; pass
  ``--activation-checkpointing`` to time TRL's default instead. The LR schedule is made constant
  (the Trainer's default is a linear decay), which changes no work.
- Generation is ``model.generate`` on the left-padded prompts with the KV cache (``use_cache=True``
  unless gradient checkpointing), in train mode (``model.eval()`` is never called; dropout is disabled
  by ``disable_dropout=True``, and this Llama has none), under the same bf16 autocast as training
  (accelerate patches ``model.forward``), and without per-row seeds. Finished rows keep being decoded
  (their tokens become pad) until every row ended or ``max_new_tokens``.
- The prompt is then run again: student and teacher each do a full forward over prompt + completion
  (full-vocabulary logits, fp32 after autocast) — no reuse of the generation's cache or logits. That
  forward gets no ``position_ids`` (positions 0..T-1 including the left padding) while ``generate``
  derives them from the mask; RoPE being relative, this differs only by rounding.
- The EOS id comes from the *student's* ``generation_config``; the bundled config says 2, but this
  tokenizer's only special token ``<|endoftext|>`` (id 0) is EOS and pad, so both models get 0.
- The Trainer normalises the loss by ``num_items_in_batch`` counted from the *collator's* labels (the
  placeholder completion), not from the tokens generated on-policy. ``model_accepts_loss_kwargs`` is
  therefore switched off so GKD's own ``batchmean`` (mean over the completion tokens) is used; this
  changes the loss scale only, not the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "distill" / "assets" / "teacher"
EOS_ID = 0  # <|endoftext|>: the tokenizer's only special token, EOS and pad (config.json's 1/2 are wrong)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help='JSON Lines, one {"prompt": ...} per row')
    p.add_argument("--steps", type=int, default=20, help="optimizer steps in all, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="TRL's SFTConfig default (on), which also turns the KV cache off in generation; "
                        "off here unless given")
    p.add_argument("--out", required=True, help="output_dir of the Trainer (nothing is saved there but result.json)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error("--steps must be larger than --warmup-steps")
    return args


def load_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def main(argv=None) -> dict:
    args = parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)

    import datasets
    import transformers
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer  # trl >= 0.24: moved to experimental
    except ImportError:
        from trl import GKDConfig, GKDTrainer

    sys.path.insert(0, str(REPO))
    from distill.quickstart import STUDENT_ARCH

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    # Tokenizer and models (float32 weights, EOS = pad = 0).
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.pad_token_id == EOS_ID, (
        tokenizer.eos_token_id, tokenizer.pad_token_id)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32)
    arch = dict(STUDENT_ARCH)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=len(tokenizer), **arch)
    torch.manual_seed(args.seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for model in (student, teacher):
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id = EOS_ID
            cfg.pad_token_id = EOS_ID

    # Data: plain prompt ids + a one-token placeholder completion, which the on-policy step replaces.
    texts = load_prompts(args.prompts)
    prompt_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    known_prompts = {tuple(ids) for ids in prompt_ids}
    train_dataset = datasets.Dataset.from_dict({
        "prompt": texts,  # read (not used) by the collator when input_ids are given
        "input_ids": [ids + [EOS_ID] for ids in prompt_ids],
        "completion_mask": [[0] * len(ids) + [1] for ids in prompt_ids],
    })

    training_args = GKDConfig(
        output_dir=args.out,
        lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=args.max_new_tokens, seq_kd=False,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant", max_steps=args.steps, seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,  # SFTConfig defaults it to True
        use_cpu=True, bf16=args.precision == "bf16",
        eval_strategy="no", save_strategy="no", report_to="none",
        logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, max_length=1024,
    )

    class Timer(TrainerCallback):
        """Per-step wall-clock, from ``on_step_begin`` to ``on_step_end`` (global_step is 1-based there)."""

        def __init__(self):
            self.begin, self.step_s, self.end_at, self.logs = {}, {}, {}, []

        def on_step_begin(self, args, state, control, **kw):
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.step_s[state.global_step] = now - self.begin[state.global_step]
            self.end_at[state.global_step] = now

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

    class CountingGKDTrainer(GKDTrainer):
        """GKDTrainer that records, per step, what the on-policy step generated and what the loss trained on."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.counts = {}  # 1-based step -> dict

        def _step(self) -> dict:
            return self.counts.setdefault(self.state.global_step + 1, {"generated": 0, "trained": 0,
                                                                      "generate_s": 0.0, "decoded_cols": 0})

        def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
            prompts, mask = inputs["prompts"], inputs["prompt_attention_mask"]
            for row, row_mask in zip(prompts.tolist(), mask.tolist()):
                ids = tuple(t for t, m in zip(row, row_mask) if m)
                assert ids in known_prompts, "a prompt's ids differ from tokenizer(prompt, add_special_tokens=False)"
            start = time.perf_counter()
            ids, attention_mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            rec = self._step()
            rec["generate_s"] += time.perf_counter() - start
            rec["generated"] += int((labels != -100).sum())  # completion tokens through the first EOS
            rec["decoded_cols"] += ids.shape[1] - prompts.shape[1]
            return ids, attention_mask, labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._step()["trained"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    timer = Timer()
    trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=training_args,
                                 train_dataset=train_dataset, processing_class=tokenizer, callbacks=[timer])
    # Loss normalised by the generated completion tokens (GKD's batchmean), not by the placeholder labels.
    trainer.model_accepts_loss_kwargs = False

    # The collator must hand the plain ids to generate, left-padded with 0.
    probe = trainer.data_collator([train_dataset[i] for i in range(min(4, len(train_dataset)))])
    for i, (row, row_mask) in enumerate(zip(probe["prompts"].tolist(), probe["prompt_attention_mask"].tolist())):
        assert [t for t, m in zip(row, row_mask) if m] == prompt_ids[i], f"collator changed prompt {i}"
    assert trainer.generation_config.eos_token_id == EOS_ID, trainer.generation_config
    assert trainer.generation_config.use_cache == (not args.activation_checkpointing), trainer.generation_config

    trainer.train()
    assert all(p.dtype == torch.float32 for m in (student, teacher) for p in m.parameters())  # autocast only

    timed = list(range(args.warmup_steps + 1, args.steps + 1))
    assert all(s in timer.step_s and s in trainer.counts for s in timed), (timer.step_s.keys(), trainer.counts.keys())
    wall = sum(timer.step_s[s] for s in timed)
    generated = sum(trainer.counts[s]["generated"] for s in timed)
    trained = sum(trainer.counts[s]["trained"] for s in timed)
    generate_s = sum(trainer.counts[s]["generate_s"] for s in timed)
    losses = [log["loss"] for log in timer.logs if "loss" in log]
    result = {
        "tool": "trl",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "steps_timed": len(timed),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "precision": args.precision,
        "generated_tokens": generated,
        "trained_tokens": trained,
        "wall_s": round(wall, 3),
        "generated_tokens_per_s": round(generated / wall, 2),
        "tokens_per_s": round((generated + trained) / wall, 2),
        "seconds_per_step": round(wall / len(timed), 4),
        # Extras, for reading the numbers above.
        "generate_s": round(generate_s, 3),
        "decoded_positions": sum(trainer.counts[s]["decoded_cols"] for s in timed) * args.batch_size,
        "wall_s_with_overhead": round(timer.end_at[args.steps] - timer.end_at[args.warmup_steps], 3),
        "activation_checkpointing": args.activation_checkpointing,
        "kv_cache_in_generation": bool(trainer.generation_config.use_cache),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "result.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
