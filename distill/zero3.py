"""DeepSpeed ZeRO-3 for `distill train`: the student's parameters, gradients and optimizer state
partitioned over the processes by DeepSpeed's engine; the frozen teacher sharded as under FSDP2.

Chosen by launching with an Accelerate config whose ``distributed_type`` is DEEPSPEED
(examples/accelerate/zero3.yaml) or by ``train.sharding=zero3``. distill builds the engine itself
(``deepspeed.initialize``), as it applies ``fully_shard`` itself under FSDP2: Accelerate starts the
processes and keeps the scheduler and RNG states, but its own DeepSpeed wrapper is not used (on a
CPU-only machine Accelerate ignores DeepSpeed, and where it does not, its engine would free the LM
head that distill's chunked loss reads outside the model's forward).

- **Student**: ``deepspeed.initialize`` partitions every parameter (above DeepSpeed's persistence
  threshold, ``stage3_param_persistence_threshold``, 1e5 elements by default: smaller ones, e.g.
  norms, stay whole) and gathers a module's parameters for its forward and again for its backward.
  The LM head's weight is registered as an external parameter of the root module (``Backbone``),
  and everything that reads it runs inside the root's forward (``Backbone(objective=...)``): the
  training objective and evaluation's per-batch scores. So it is gathered once per micro-batch,
  as under FSDP2. DeepSpeed keeps fp32 master partitions and runs our AdamW / SGD on them, clips by
  the global norm (``gradient_clipping`` = ``train.max_grad_norm``), and reduce-scatters gradients
  averaged over the processes.
- **Teacher**: sharded with ``fully_shard`` exactly as under FSDP2 (``sharding.shard_teacher``: each
  decoder layer a unit gathered for its forward, the head and final norm whole, read by process 0
  only and broadcast). It has no optimizer and no gradients, which is what DeepSpeed's engine is for.
- **Precision**: parameters stay fp32 in DeepSpeed (no ``bf16`` section); ``train.precision=bf16``
  runs the forward under the same torch autocast as DDP and FSDP2. So the gathers move fp32 (twice
  FSDP2's bf16 gathers); DeepSpeed's own bf16 mode keeps bf16 weights, which is another recipe.
- **Non-finite steps** (``train.nonfinite``): the global norm of the partitioned gradients is taken
  before the engine's step (``grad_norm``); a dropped step clears the gradient partitions and never
  reaches the optimizer, its state or the schedule.
- **Checkpoints**: the engine's own (``engine.save_checkpoint``: each process writes its partitions
  of the fp32 masters and optimizer state) in the checkpoint's ``zero3/`` folder, inside distill's
  kill-safe layout; resuming loads them into the same number of processes. The final ``student/``
  is gathered one parameter at a time to process 0 and saved in Hugging Face format.

The DeepSpeed config is made from ``train.*`` (micro-batch, accumulation, clipping) and the launch's
``zero_stage`` / offload keys; a ``deepspeed_config_file`` may add ZeRO settings
(``zero_optimization``) but not what ``train.*`` decides (precision, optimizer, schedule; batch
sizes and clipping only as "auto" or equal).

Sampling in the loop (``generation.lmbda`` / ``seq_kd``): the student samples with every parameter
gathered once per sampling call and ZeRO-3's hooks off (``gathered``), so its decoding is local; the
teacher samples as under FSDP2, every process decoding until all have ended. Not under ZeRO-3 yet
(refused, as under FSDP2): the cross-tokenizer teacher, QAT, fp16, loss.features.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill.errors import UserError

LAUNCH = "ACCELERATE_USE_DEEPSPEED"  # set by `accelerate launch` with a DEEPSPEED config


def launched() -> bool:
    return os.environ.get(LAUNCH, "false").strip().lower() == "true"


@contextlib.contextmanager
def hidden_from_accelerate():
    """Accelerate's Accelerator, made inside this block, does not see the DeepSpeed launch: it starts
    the processes' group as for DDP, and distill builds the engine (``initialize``)."""
    value = os.environ.pop(LAUNCH, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[LAUNCH] = value


def import_deepspeed(device: torch.device):
    if device.type == "cpu":  # before DeepSpeed picks its accelerator (it would look for CUDA)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # a run started without a launcher: one process
    try:
        import deepspeed
    except ImportError:
        raise UserError("ZeRO-3 needs DeepSpeed: pip install 'distill[deepspeed]' (or shard with FSDP2: "
                        "accelerate launch --config_file examples/accelerate/fsdp2.yaml)") from None
    return deepspeed


def _env(name: str) -> Optional[str]:
    value = os.environ.get(name)
    return None if value is None or value.strip().lower() in ("", "none") else value.strip()


def _agree(where: str, key: str, value, wanted, setting: str) -> None:
    if value is None or value == "auto":
        return
    try:
        same = float(value) == float(wanted)
    except (TypeError, ValueError):
        same = False
    if not same:
        raise UserError(f"{where} sets {key}={value} but {setting}={wanted}: distill takes it from {setting} "
                        f"(set {key} to \"auto\" or leave it out)")


def ds_config(t, world: int) -> dict:
    """The DeepSpeed config of this run: train.* (``t``), the launch's ZeRO keys (environment) and the
    launch's ``deepspeed_config_file``, checked against each other."""
    cfg: dict = {}
    file = _env("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file is not None:
        try:
            cfg = json.loads(Path(file).read_text())
        except OSError as e:
            raise UserError(f"the DeepSpeed config file {file} cannot be read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"the DeepSpeed config file {file} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise UserError(f"the DeepSpeed config file {file} must hold a JSON object")
    where = f"the DeepSpeed config {file}" if file else "the Accelerate config"
    for key, setting in (("fp16", "train.precision"), ("bf16", "train.precision"), ("optimizer", "train.optimizer"),
                         ("scheduler", "train.schedule")):
        section = cfg.get(key)
        if section is not None and (key in ("optimizer", "scheduler") or section.get("enabled") not in (False, "auto")):
            raise UserError(f"{where} has a \"{key}\" section: distill sets that from {setting} (remove the section)")
    zero = dict(cfg.get("zero_optimization") or {})
    stage = zero.get("stage", _env("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 3)
    if str(stage) != "3":
        raise UserError(f"{where} asks for ZeRO stage {stage}; distill runs DeepSpeed at stage 3 only (zero_stage: 3), "
                        "or shard with FSDP2 (examples/accelerate/fsdp2.yaml), or train.sharding=ddp")
    zero["stage"] = 3
    for key, name in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                      ("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = _env(name)
        if device is not None and key not in zero:
            zero[key] = {"device": device}
    accum = _env("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accum is not None and accum != "1":  # Accelerate's default is 1: only a value set on purpose disagrees
        _agree("the Accelerate config", "gradient_accumulation_steps", accum, t.grad_accum_steps,
               "train.grad_accum_steps")
    clip = t.max_grad_norm or 0.0
    _agree("the Accelerate config", "gradient_clipping", _env("ACCELERATE_GRADIENT_CLIPPING"), clip,
           "train.max_grad_norm")
    for key, wanted, setting in (("train_micro_batch_size_per_gpu", t.batch_size, "train.batch_size"),
                                 ("gradient_accumulation_steps", t.grad_accum_steps, "train.grad_accum_steps"),
                                 ("train_batch_size", t.batch_size * t.grad_accum_steps * world,
                                  "train.batch_size x train.grad_accum_steps x processes"),
                                 ("gradient_clipping", clip, "train.max_grad_norm")):
        _agree(where, key, cfg.get(key), wanted, setting)
    return {**cfg, "zero_optimization": zero, "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "train_batch_size": t.batch_size * t.grad_accum_steps * world, "gradient_clipping": clip,
            "zero_allow_untested_optimizer": True,  # our AdamW / SGD on DeepSpeed's fp32 partitions
            "zero_force_ds_cpu_optimizer": False,  # ... also when the optimizer state is offloaded
            "steps_per_print": cfg.get("steps_per_print", 2 ** 31 - 1), "wall_clock_breakdown": False}


REDUCE_BUCKET, MAX_LIVE = 500_000_000, 1_000_000_000  # DeepSpeed's defaults (elements)


def memory_settings() -> tuple[int, int]:
    """(reduce_bucket_size, stage3_max_live_parameters) of this launch, in elements: what the memory
    plan counts of DeepSpeed (its gradient bucket is allocated whole, fp32; gathered parameters stay
    live up to the second), from the launch's deepspeed_config_file, else DeepSpeed's defaults."""
    file = _env("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    zero: dict = {}
    if file is not None:
        try:
            zero = json.loads(Path(file).read_text()).get("zero_optimization") or {}
        except (OSError, ValueError, AttributeError):  # ds_config says what is wrong with it, when the run starts
            zero = {}
    return _buffers(zero)


def _buffers(zero: dict) -> tuple[int, int]:
    return (int(float(zero.get("reduce_bucket_size", REDUCE_BUCKET))),
            int(float(zero.get("stage3_max_live_parameters", MAX_LIVE))))


def describe(config: dict) -> str:
    """One line: the DeepSpeed settings this run trains with (offload, buckets), as distill made them."""
    zero = config["zero_optimization"]
    bucket, live = _buffers(zero)
    where = {k: (zero.get(f"offload_{k}") or {}).get("device", "none") for k in ("optimizer", "param")}
    return (f"DeepSpeed ZeRO-3: offload optimizer {where['optimizer']}, offload parameters {where['param']}, "
            f"reduce_bucket_size {bucket:.3g}, stage3_max_live_parameters {live:.3g}, "
            f"stage3_param_persistence_threshold {float(zero.get('stage3_param_persistence_threshold', 1e5)):.3g}")


def initialize(backbone: nn.Module, optimizer, config: dict, device: torch.device):
    """The ZeRO-3 engine over ``backbone`` (a ``Backbone``), its parameters partitioned in place. The
    LM head's weight is registered as an external parameter of the root, so the objective, computed
    inside the root's forward, sees it whole."""
    deepspeed = import_deepspeed(device)
    # DeepSpeed's collectives call names torch deprecates (a warning per call), and it warns that our
    # optimizer is "untested" with ZeRO (it runs on DeepSpeed's fp32 partitions; tests/test_zero3.py).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    from deepspeed.utils import logger

    logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    deepspeed.zero.register_external_parameter(backbone, backbone.model.get_output_embeddings().weight)
    engine, _, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer, config=config)
    return engine


def gathered(engine):
    """The student whole for a sampling call, once (sampling runs one forward per token: without
    this each would gather every module again): DeepSpeed's ``unwrap_model_for_generation``, which
    gathers every parameter and takes ZeRO-3's hooks off the modules for the block, so its forwards
    are local (no collectives), then puts them back and partitions again."""
    from deepspeed.runtime.zero import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


def local_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of ``module``'s parameters held by this process, bytes of all of them)."""
    here = whole = 0
    for p in module.parameters():
        size = p.element_size()
        if hasattr(p, "ds_tensor"):
            whole += p.ds_numel * size
            here += p.ds_tensor.numel() * size
        else:
            whole += p.numel() * size
            here += p.numel() * size
    return here, whole


@torch.no_grad()
def grad_norm(engine) -> torch.Tensor:
    """The global L2 norm of the partitioned gradients (every process gets it), before the engine's
    step: what ``torch.nn.utils.clip_grad_norm_`` would return over the whole gradients."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_grad

    total = torch.zeros((), dtype=torch.float64, device=engine.device)
    for p in engine.module.parameters():
        if p.requires_grad:
            g = safe_get_local_grad(p)
            if g is not None:
                total += g.double().pow(2).sum()
    dist.all_reduce(total)
    return total.sqrt().float()


class Steps:
    """What the training loop calls an optimizer (``step``, ``zero_grad``) for the engine: ``step``
    is the engine's (clipping, the update of the fp32 partitions, zeroing); ``zero_grad`` after a
    dropped step clears the partitioned gradients without touching the optimizer."""

    def __init__(self, engine):
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)


def save(engine, folder: Path) -> None:
    """The engine's partitions (fp32 masters, optimizer state), written by every process into ``folder``."""
    engine.save_checkpoint(str(folder), tag="state", save_latest=False)


def load(engine, folder: Path) -> None:
    if not (folder / "state").is_dir():
        raise UserError(f"{folder.parent} has no ZeRO-3 state ({folder.name}/): it was not written by a ZeRO-3 "
                        "run; resume with the sharding it was saved with (train.sharding)")
    path, _ = engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"{folder} could not be loaded by DeepSpeed (written by another number of processes?)")


def full_state_dict(module: nn.Module, prefix: str = "") -> dict:
    """The whole state dict on process 0 (every process must call this; the others get {}), gathered
    one parameter at a time, on the CPU, with ``prefix`` stripped. Tied names share one tensor."""
    import deepspeed
    import torch.distributed as dist

    first = dist.get_rank() == 0
    state: dict = {}
    seen: dict = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            with deepspeed.zero.GatheredParameters([p]):
                seen[id(p)] = p.detach().cpu().clone() if first else None
        if first:
            state[name] = seen[id(p)]
    if first:
        kept = set(module.state_dict())  # persistent buffers only, as state_dict() has them
        state.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name in kept})
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
