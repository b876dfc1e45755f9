"""FSDP2 for `distill train`: the student and the frozen teacher sharded over the processes.

``fully_shard`` (PyTorch's FSDP2) is applied here, by distill, on CPU (gloo) and GPU (NCCL) alike,
so the path the tests run is the path a GPU run takes. It is chosen by ``train.sharding=fsdp2`` or by
launching with an Accelerate config whose ``distributed_type`` is FSDP (``fsdp_version: 2``; see
examples/accelerate/); the config's ``fsdp_reshard_after_forward``, ``fsdp_offload_params`` and
``fsdp_activation_checkpointing`` are read from the environment ``accelerate launch`` sets.

- **Student**: every decoder layer is one FSDP unit and the wrapper around it (``Backbone``: the
  embeddings, final norm, LM head, and any projections trained beside it) the root unit. Parameters,
  gradients and optimizer state are split over the processes (dim-0 shards); a unit's parameters
  are all-gathered for its forward and again for its backward. The root stays gathered from its
  forward to the end of backward, which is what lets the chunked loss read the LM head's whole
  weight once per micro-batch outside the model's forward (no per-chunk gather); its gradient is
  reduce-scattered with the rest.
- **Teacher**: every decoder layer, and the input embeddings unless they are tied to the LM head,
  is its own unit, gathered for its forward and resharded right after (the teacher runs under
  ``no_grad``: nothing is kept for backward). Its final norm and LM head stay whole on every
  process, because the teacher signal reads ``head.weight`` directly (for Llama-3-8B that is 0.53B
  of its 8.0B parameters).
  Only process 0 reads the teacher's weights (``first_loads``); the others build its shape on the
  meta device and receive their shards by broadcast (``shard_teacher``). A ``student.model`` is
  loaded the same way, and a student from the teacher's layers is made on process 0 (meta elsewhere).
- **Mixed precision** (``train.precision=bf16``): the student's units gather bf16 copies of fp32
  master shards and reduce gradients in fp32 (``MixedPrecisionPolicy``), under the same autocast as
  DDP runs.
- **Checkpoints**: the model and optimizer as sharded state dicts (``torch.distributed.checkpoint``,
  each process writes its shards) in the checkpoint's ``sharded/`` folder, beside the scheduler and
  RNG states Accelerate writes; resuming loads them back into the same layout. The final
  ``student/`` is gathered to a full state dict on process 0 and saved in Hugging Face format.

Every process must run the same sequence of sharded forwards (each is a collective): evaluation
gives every process the same number of batches, and sampling in the loop stops when every
process's rows have ended (rows that ended earlier are padded, their completions unchanged). The
student samples with all its units gathered once per sampling call (``gathered``); the teacher
(``generation.seq_kd``) gathers one unit at a time, for every token. The cross-tokenizer teacher,
QAT, fp16 and the feature terms are refused under FSDP2 for now.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from distill.errors import UserError


@dataclass
class FSDPSettings:
    reshard_after_forward: bool = True  # the student's layers: free gathered parameters after forward
    offload: bool = False  # parameters, gradients and optimizer state on the CPU (CUDA runs)
    checkpointing: bool = False  # fsdp_activation_checkpointing of an Accelerate config
    param_dtype: Optional[torch.dtype] = None  # gathered student parameters (bf16 under train.precision=bf16)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def mode(sharding: str) -> str:
    """"ddp", "fsdp2" or "zero3": ``train.sharding``, where "auto" follows the launch (an Accelerate FSDP
    config sets ``ACCELERATE_USE_FSDP``, a DEEPSPEED one ``ACCELERATE_USE_DEEPSPEED``: distill/zero3.py)."""
    from distill import zero3

    if sharding != "auto":
        return sharding
    if zero3.launched():
        return "zero3"
    if not _env_flag("ACCELERATE_USE_FSDP", False):
        return "ddp"
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the Accelerate config asks for FSDP version {version}; distill shards with FSDP2: set "
                        "fsdp_config.fsdp_version: 2 (see examples/accelerate/fsdp2.yaml)")
    return "fsdp2"


def settings(precision: str) -> FSDPSettings:
    """The FSDP2 settings of this launch (the Accelerate config's, from the environment)."""
    return FSDPSettings(reshard_after_forward=_env_flag("FSDP_RESHARD_AFTER_FORWARD", True),
                        offload=_env_flag("FSDP_OFFLOAD_PARAMS", False),
                        checkpointing=_env_flag("FSDP_ACTIVATION_CHECKPOINTING", False),
                        param_dtype=torch.bfloat16 if precision == "bf16" else None)


def unsupported(config) -> Optional[str]:
    """Why this run cannot shard with FSDP2 (yet), or None."""
    L, t = config.loss, config.train
    if L.cross_tokenizer is not None:
        return "a cross-tokenizer teacher (loss.cross_tokenizer)"
    if t.qat is not None:
        return "train.qat"
    if L.features is not None:
        return "loss.features"
    if t.precision == "fp16":
        return "train.precision=fp16 (its loss scaler needs Accelerate's optimizer wrapper: use bf16)"
    return None


def mesh(device: torch.device, world: int):
    """The 1-D device mesh of all processes. A run started without a launcher (one process) gets a
    process group of its own, so it shards (into one piece) by the same code."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.mkstemp(prefix="distill-fsdp-")[1], 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    return init_device_mesh(device.type, (world,))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from distill.features import layer_modules

    layers = layer_modules(model)
    if not layers:
        raise UserError(f"{type(model).__name__}: found no decoder layers (model.layers.N) to shard with FSDP2")
    return layers


def _offload(s: FSDPSettings, device: torch.device) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy

    # On a CPU-only run everything is on the CPU already: there is nothing to offload.
    return {"offload_policy": CPUOffloadPolicy()} if s.offload and device.type == "cuda" else {}


def _device(device_mesh) -> torch.device:
    if device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_mesh.device_type)


class _FromFirst:
    """Filling a module that only process 0 loaded (``first_loads``) once it is sharded: made
    before ``fully_shard`` (process 0's whole tensors are kept until they are sent), ``fill``-ed after
    it: the other processes' meta parameters get storage, a tied head is tied again, and every
    tensor is broadcast from process 0 one at a time, each process keeping its shards
    (``set_model_state_dict`` with ``broadcast_from_rank0``)."""

    def __init__(self, module: nn.Module, head_owner: nn.Module, device: torch.device):
        import torch.distributed as dist

        self.module, self.device = module, device
        self.empty = any(p.is_meta for p in module.parameters())
        # Whether any process has meta parameters is what every process must agree on.
        flag = torch.tensor([int(self.empty)], device=device)
        dist.all_reduce(flag)
        self.broadcast = bool(flag.item())
        self.full = module.state_dict() if self.broadcast and dist.get_rank() == 0 else {}
        self.embeddings, self.head = head_owner.get_input_embeddings(), head_owner.get_output_embeddings()
        self.tied = self.embeddings.weight is self.head.weight

    def fill(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.empty:
            self.module._apply(lambda t: torch.empty_like(t, device=self.device) if t.is_meta else t)
            if self.tied:  # _apply replaced the tied parameter once per module that holds it
                self.head.weight = self.embeddings.weight
        if self.broadcast:
            set_model_state_dict(self.module, self.full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.full = {}


def shard_student(wrapper: nn.Module, model: nn.Module, s: FSDPSettings, device_mesh) -> nn.Module:
    """``fully_shard`` each decoder layer of ``model`` (the student inside ``wrapper``), then ``wrapper``
    as the root. The parameters are replaced in place by their shards (DTensors). A student from
    ``first_loads`` (real weights on process 0 only) is filled by broadcast, as ``shard_teacher`` says."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    extra = _offload(s, torch.device(device_mesh.device_type))
    if s.param_dtype is not None:
        extra["mp_policy"] = MixedPrecisionPolicy(param_dtype=s.param_dtype, reduce_dtype=torch.float32)
    from_first = _FromFirst(wrapper, model, _device(device_mesh))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=device_mesh, reshard_after_forward=s.reshard_after_forward, **extra)
    fully_shard(wrapper, mesh=device_mesh, **extra)  # the root: gathered from forward to the end of backward
    from_first.fill()
    # One forward through the root now (every process), so FSDP2 knows its root before anything
    # calls the model inside (sampling does).
    with torch.no_grad():
        wrapper(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device_mesh.device_type),
                attention_mask=torch.ones(1, 1, dtype=torch.long, device=device_mesh.device_type))
    wrapper.reshard()
    return wrapper


@contextlib.contextmanager
def gathered(root: nn.Module, s: FSDPSettings):
    """Every unit of the sharded student gathered for the block, once (sampling runs one forward per
    token: without this, each would all-gather every layer again), then resharded. The gathered copy
    is the whole student in its compute dtype."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    root.set_reshard_after_forward(False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not root:
                unit.set_reshard_after_forward(s.reshard_after_forward, recurse=False)


def everyone_done(done: bool, device: torch.device) -> bool:
    """Whether every process is ``done`` (one all-reduce)."""
    import torch.distributed as dist

    left = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(left)
    return left.item() == 0


def first_loads(load: Callable[[bool], nn.Module]) -> nn.Module:
    """``load(True)`` on process 0 (the weights read once on this machine), ``load(False)`` (the shape
    only, parameters on the meta device) on the others, which ``shard_teacher`` then fills with their
    shards. A UserError of process 0 (a missing file, non-finite weights) is raised on every process,
    so none waits for the others in a collective."""
    import torch.distributed as dist

    error, model = None, None
    if dist.get_rank() == 0:
        try:
            model = load(True)
        except UserError as e:
            error = str(e)
    said = [error]
    dist.broadcast_object_list(said, src=0)
    if said[0] is not None:
        raise UserError(said[0])
    return model if model is not None else load(False)


def shard_teacher(teacher: nn.Module, device_mesh) -> None:
    """``fully_shard`` each decoder layer of the frozen teacher and its input embeddings (unless they
    are tied to the LM head), each resharded after its forward; the final norm and the LM head stay
    whole (the teacher signal reads ``head.weight`` directly). Everything ends on the mesh's device,
    one unit at a time (the whole teacher is never on the device of one process).

    A teacher from ``first_loads`` has real weights on process 0 only: the others' meta parameters
    are made real here and every tensor is broadcast from process 0, one at a time, each process
    keeping its shards (``set_model_state_dict`` with ``broadcast_from_rank0``). So only process 0
    ever holds the whole teacher in host memory."""
    from torch.distributed.fsdp import fully_shard

    device = _device(device_mesh)
    from_first = _FromFirst(teacher, teacher, device)
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=device_mesh, reshard_after_forward=True)
    if not from_first.tied:
        fully_shard(from_first.embeddings, mesh=device_mesh, reshard_after_forward=True)
    from_first.fill()
    teacher.to(device)


def local_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of ``module``'s parameters held by this process, bytes of all of them)."""
    from torch.distributed.tensor import DTensor

    here = whole = 0
    for p in module.parameters():
        size = p.element_size()
        whole += p.numel() * size
        here += (p.to_local().numel() if isinstance(p, DTensor) else p.numel()) * size
    return here, whole


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the sharded gradients (a plain tensor), and, when ``max_norm`` is finite,
    the gradients scaled so it is at most ``max_norm`` (torch.nn.utils.clip_grad_norm_'s rule)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    scale = max_norm / (norm.item() + 1e-6)  # clip_grad_norm_'s rule
    if scale < 1:  # (clip_grads_with_norm_ leaves DTensor gradients unscaled when given a plain norm)
        for g in grads:
            g.mul_(scale)
    return norm


def save(model: nn.Module, optimizer, folder: Path) -> None:
    """The model's and optimizer's shards, written by every process into ``folder``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load(model: nn.Module, optimizer, folder: Path) -> None:
    """Load ``save``'s shards back into ``model`` and ``optimizer`` (the same processes and layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / ".metadata").is_file():
        raise UserError(f"{folder.parent} has no sharded model state ({folder.name}/): it was not written by an "
                        "FSDP2 run; resume with the sharding it was saved with (train.sharding)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module, prefix: str = "") -> dict:
    """The whole state dict on process 0 (every process must call this; the others get {}), on the
    CPU, with ``prefix`` stripped from its keys."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:  # a tied parameter is gathered once per name: make its names one tensor again, as
        first: dict = {}  # transformers' save_pretrained expects of tied weights (it then writes one)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in state and first.setdefault(id(p), name) != name:
                state[name] = state[first[id(p)]]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
