"""Does DeepSpeed ZeRO train distill's chunked loss correctly here? A probe, not part of `distill train`.

    pip install deepspeed   # not in distill's setup
    python benchmarks/deepspeed_probe.py --out runs/deepspeed-probe

A 2-layer Llama student (hidden 32, V = 64) computes distill's chunked KD + CE loss inside its root
module's forward (ZeRO-3 frees a module's parameters after its forward, so the LM head's weight is
registered as an external parameter of the root, ``deepspeed.zero.register_external_parameter``).
Two processes (gloo on CPU, ``DS_ACCELERATOR=cpu``) each take one half of a 4-row batch for one SGD
step, through (a) ``deepspeed.initialize`` directly and (b) Accelerate's DeepSpeed path
(``accelerate launch`` with a ``distributed_type: DEEPSPEED`` config; Accelerate ignores DeepSpeed
under ``cpu=True``, so it runs with ``cpu=False``), for ZeRO stages 0, 2 and 3. Process 0's gathered
parameters are compared with one process's step on the average of both halves ("average": what
data parallelism must give) and on process 0's half alone ("own half": no gradient reduction).
Each process takes its half by ``torch.distributed.get_rank()``; what Accelerate's own state says
(``num_processes``, ``process_index``) is recorded beside it. Prints a Markdown table and saves
``deepspeed_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

COMMON = r"""
import os, sys, torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
sys.path.insert(0, ROOT)
from distill.losses.chunked import chunked_kd_loss

class LossInside(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, t_logits):
        h = self.model.base_model(input_ids=ids).last_hidden_state
        parts = chunked_kd_loss(h[:, :-1].reshape(-1, h.shape[-1]), self.model.lm_head.weight, ids[:, 1:].reshape(-1),
                                teacher_logits=t_logits[:, :-1].reshape(-1, t_logits.shape[-1]), chunk_size=5,
                                ce_weight=0.5)
        return parts.loss / 30

def build():
    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return LossInside(AutoModelForCausalLM.from_config(cfg))

g = torch.Generator().manual_seed(1)
IDS, TL = torch.randint(0, 64, (4, 16), generator=g), torch.randn(4, 16, 64, generator=g)
"""

WORKER = COMMON + r"""
import deepspeed
import torch.distributed as dist
path, stage, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = {}
m = build()
if stage == 3:
    deepspeed.zero.register_external_parameter(m, m.model.lm_head.weight)
opt = torch.optim.SGD(m.parameters(), lr=1e-2)
if path == "deepspeed":
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=config)
    r = dist.get_rank()
    engine.backward(engine(IDS[2 * r:2 * r + 2], TL[2 * r:2 * r + 2]))
    engine.step()
else:
    from accelerate import Accelerator
    acc = Accelerator()
    acc.state.deepspeed_plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=2, train_batch_size=4,
                                                       zero_allow_untested_optimizer=True)
    engine, opt = acc.prepare(m, opt)
    r = dist.get_rank()  # Accelerate's own process_index / num_processes: recorded below
    seen = {"num_processes": acc.num_processes, "process_index": acc.process_index}
    acc.backward(engine(IDS[2 * r:2 * r + 2], TL[2 * r:2 * r + 2]))
    opt.step()
with deepspeed.zero.GatheredParameters(list(m.parameters())):
    if r == 0:
        torch.save({k: v.detach().clone() for k, v in m.state_dict().items()}, out)
torch.save(seen, f"{out}.{dist.get_rank()}.seen")
dist.barrier()
dist.destroy_process_group()
"""

REFERENCE = COMMON + r"""
out = sys.argv[1]
refs = {}
for name, rows in (("average", [slice(0, 2), slice(2, 4)]), ("own half", [slice(0, 2)])):
    m = build()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    (sum(m(IDS[s], TL[s]) for s in rows) / len(rows)).backward()
    opt.step()
    refs[name] = m.state_dict()
torch.save(refs, out)
"""

ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: {stage}
  gradient_accumulation_steps: 1
  gradient_clipping: 0.0
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/deepspeed-probe")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"ROOT = {str(ROOT)!r}\n"
    (out / "worker.py").write_text(prefix + WORKER)
    (out / "reference.py").write_text(prefix + REFERENCE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, str(out / "reference.py"), str(out / "reference.pt")], check=True, env=env,
                   capture_output=True)
    refs = torch.load(out / "reference.pt")
    rows = []
    for path in ("deepspeed", "accelerate"):
        for stage in (0, 2, 3):
            result = out / f"{path}-{stage}.pt"
            result.unlink(missing_ok=True)
            if path == "deepspeed":
                launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29611"]
            else:
                config = out / f"zero{stage}.yaml"
                config.write_text(ACCELERATE_CONFIG.format(stage=stage))
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                          "--main_process_port", "29611"]
            proc = subprocess.run([*launch, str(out / "worker.py"), path, str(stage), str(result)], env=env,
                                  capture_output=True, text=True)
            row = {"path": path, "stage": stage, "returncode": proc.returncode}
            if result.is_file():
                got = torch.load(result)
                for name, ref in refs.items():
                    row[name] = max((got[k] - ref[k]).abs().max().item() for k in ref)
                row["accelerate_saw"] = [torch.load(f"{result}.{r}.seen") for r in (0, 1)]
            else:
                row["error"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
            rows.append(row)
    import deepspeed

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "python": platform.python_version()}
    (out / "deepspeed_probe.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(meta)
    print("| path | ZeRO stage | max abs diff from the average step | from process 0's own half | "
          "Accelerate's (num_processes, process_index) on processes 0, 1 |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        if "average" in r:
            saw = ", ".join(f"({x['num_processes']}, {x['process_index']})" for x in r["accelerate_saw"] if x) or "-"
            print(f"| {r['path']} | {r['stage']} | {r['average']:.1e} | {r['own half']:.1e} | {saw} |")
        else:
            print(f"| {r['path']} | {r['stage']} | failed ({r['returncode']}): {r.get('error')} | |")


if __name__ == "__main__":
    main()
