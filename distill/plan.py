"""`distill plan`: the memory one process of a causal-LM run needs, from the model configs alone.

No weights are loaded. The models are built under ``FakeTensorMode`` (tensors with shapes, dtypes
and devices but no storage), which gives exact parameter counts for any architecture transformers
knows, and a fake forward of the student at the run's micro-batch and length gives the bytes its
autograd graph saves for backward: the activations, under the run's precision and attention
implementation, counted per storage as autograd holds them.

The rest is arithmetic (``components``), per process:

- student: parameters (fp32 master weights), gradients (fp32), optimizer state (AdamW: two fp32
  moments; SGD without momentum: none); DDP adds its gradient buckets (one more fp32 copy of the
  gradients) when there is more than one process;
- teacher: its parameters in ``teacher_dtype`` (none for a cache teacher);
- activations: the saved tensors above; with ``train.gradient_checkpointing`` each decoder layer
  keeps only its input and one layer's saved tensors are recomputed at a time in backward;
- loss buffers: chunked, about 7 · chunk · V · 4 bytes plus the head's fp32 gradient (V · d · 4) and
  the hidden states' (B · T · d · 4); dense, about 7 (B · T, V) fp32 tensors (both measured in
  BENCHMARKS.md "Losses: dense vs chunked");
- the teacher's forward: its last hidden states and about three of its widest intermediates.

FSDP2 (what distill/sharding.py does) divides the student's parameters, gradients and optimizer
state by the number of processes and adds the root's gathered parameters and two decoder layers'
(the one computing and the one prefetched) in the compute dtype, and one layer's unsharded fp32
gradient before its reduce-scatter. Under bf16 its activations come from a fake forward of a bf16
student (FSDP2's gathered parameters are bf16, so the residual stream is, and autocast makes no
weight copies). The teacher's decoder layers and untied input embeddings are divided by the number
of processes, its head and final norm are whole, and one unit at a time is gathered.

ZeRO-3 (distill/zero3.py) divides the student's parameters, gradients and optimizer state alike
(its fp32 master partitions are the parameters' own, as distill runs it), keeps DDP's activations
(fp32 parameters under autocast) and FSDP2's teacher, and adds DeepSpeed's own buffers, measured
to dominate small runs: its gradient reduce bucket (``reduce_bucket_size`` fp32 elements, 5e8 =
1.86 GiB by default, allocated whole) and the gathered fp32 parameters it keeps live for reuse
(up to ``stage3_max_live_parameters``, 1e9 by default: the whole student, when it is smaller).
Both are read from the launch's ``deepspeed_config_file`` when it sets them. Its gradient
partitions are one flat buffer allocated at start, so they count whole beside the activations.

Not counted: the KV cache of sampling in the loop (``generation``), the cross-tokenizer alignment's
buffers, QAT's fake-quantized weight copies, and the feature terms' projections and captured
states.

The estimate is of tensor bytes; the allocator, CUDA context and Python add to it. The check in
`distill train` refuses a run only when the estimate alone exceeds the memory (``train.memory_gb``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill import zero3
from distill.config import Config
from distill.errors import UserError

GiB = 2 ** 30
DENSE_VN_TENSORS = 7  # (B·T, V) fp32 tensors the dense objective holds at its peak (BENCHMARKS.md)
CHUNK_CV_TENSORS = 7  # (chunk, V) fp32 tensors the chunked objective holds at its peak
TEACHER_WIDEST = 3  # the teacher's widest intermediates alive at once in its forward
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


ORDER = ("student parameters", "gradients", "optimizer state", "DDP gradient buckets", "DeepSpeed reduce bucket",
         "gathered student layers", "teacher parameters", "gathered teacher layers", "activations", "loss buffers",
         "teacher forward")


class MemoryPlanError(UserError):
    """A run whose plan exceeds its memory (the refusal of `distill train`)."""


@dataclass
class Shape:
    """What the plan needs of one model, counted on a fake instance."""

    params: int  # unique parameters (tied embeddings once)
    layers: int  # decoder layers
    layer_params: int  # the largest decoder layer's parameters
    hidden: int
    intermediate: int
    vocab: int  # LM-head rows
    embedding: int = 0  # the input embeddings' parameters when they are not tied to the LM head


@dataclass
class Activations:
    """Bytes the student's forward saves for backward: ``fixed + per_example · B`` at micro-batch B
    (fixed: what does not grow with the batch, such as the bf16 copies autocast makes of the weights),
    for the whole forward and for its decoder layers together."""

    fixed: int
    per_example: int
    layers_fixed: int  # the decoder layers' share (all of them)
    layers_per_example: int
    layer_input_per_example: int  # one decoder layer's input (what checkpointing keeps per layer)
    layers: int

    def at(self, batch: int, checkpointing: bool) -> int:
        whole = self.fixed + self.per_example * batch
        if not checkpointing or not self.layers:
            return whole
        in_layers = self.layers_fixed + self.layers_per_example * batch
        one_layer = in_layers // self.layers  # recomputed one layer at a time in backward
        return whole - in_layers + self.layers * self.layer_input_per_example * batch + one_layer


TRANSIENT = ("activations", "loss buffers", "teacher forward")  # alive from the forward into the backward


@dataclass
class Plan:
    """Per-process bytes by component, for one strategy, at one micro-batch. ``total``: the persistent
    components plus, with one micro-batch per step (whose gradients are set to None after each
    step), the larger of the gradients and the forward's transients, which are not alive at once
    (backward frees activations as it writes gradients); with accumulation, all of them; under
    ZeRO-3 all of them too (its gradient partitions are one buffer, allocated at start)."""

    strategy: str  # "ddp", "fsdp2" or "zero3"
    processes: int
    batch: int
    checkpointing: bool
    accumulation: int = 1
    parts: dict = field(default_factory=dict)  # component -> bytes

    @property
    def total(self) -> int:
        # ZeRO-3's gradient partitions live in one flat buffer DeepSpeed allocates at start and keeps.
        if self.accumulation > 1 or self.strategy == "zero3":
            return sum(self.parts.values())
        transient = sum(self.parts.get(k, 0) for k in TRANSIENT)
        persistent = sum(v for k, v in self.parts.items() if k not in TRANSIENT and k != "gradients")
        return persistent + max(self.parts.get("gradients", 0), transient)


@dataclass
class Inputs:
    """Everything the arithmetic reads, resolved from a config (``inputs_of``) or written by hand (tests)."""

    student: Shape
    teacher: Optional[Shape]
    activations: Activations
    batch: int
    length: int
    optimizer: str  # adamw | sgd
    teacher_bytes: int  # per teacher parameter
    compute_bytes: int  # per activation / gathered parameter (2 under bf16 / fp16, else 4)
    chunk_size: int  # 0: dense
    vocab: int  # the run's vocabulary (rows the loss reads)
    accumulation: int = 1  # micro-batches per optimizer step (train.grad_accum_steps)
    # The student's under FSDP2's mixed precision (parameters, and so the residual stream, in the
    # compute dtype); None: the same as ``activations``.
    sharded_activations: Optional[Activations] = None
    # ZeRO-3: DeepSpeed's reduce_bucket_size and stage3_max_live_parameters (elements; distill/zero3.py)
    zero3_buckets: tuple[int, int] = (zero3.REDUCE_BUCKET, zero3.MAX_LIVE)


def components(x: Inputs, *, strategy: str, processes: int, batch: Optional[int] = None,
               checkpointing: bool = False) -> Plan:
    """The per-process bytes of each component (see the module docstring for what each counts)."""
    if strategy not in ("ddp", "fsdp2", "zero3"):
        raise ValueError(f"strategy must be ddp, fsdp2 or zero3, got {strategy!r}")
    b = x.batch if batch is None else batch
    n = processes
    s, t = x.student, x.teacher
    shard = 1 if strategy == "ddp" else n
    parts = {
        "student parameters": 4 * s.params // shard,
        "gradients": 4 * s.params // shard,
        "optimizer state": (8 if x.optimizer == "adamw" else 0) * s.params // shard,
    }
    if strategy == "ddp" and n > 1:
        parts["DDP gradient buckets"] = 4 * s.params
    if strategy == "fsdp2":
        root = s.params - s.layers * s.layer_params
        parts["gathered student layers"] = x.compute_bytes * (root + 2 * s.layer_params) + 4 * s.layer_params
    elif strategy == "zero3":  # fp32 partitions (DeepSpeed's masters are the same tensors), fp32 gathers
        root = s.params - s.layers * s.layer_params
        bucket, live = x.zero3_buckets
        # Gathered parameters stay live (for their reuse in backward) up to stage3_max_live_parameters:
        # the whole student under DeepSpeed's default (1e9) unless it is larger.
        parts["gathered student layers"] = 4 * min(s.params, max(live, root + 2 * s.layer_params))
        parts["DeepSpeed reduce bucket"] = 4 * bucket  # allocated whole at start, whatever the model
    if t is None:
        parts["teacher parameters"] = 0
    elif strategy in ("fsdp2", "zero3"):  # (zero3's teacher is FSDP2's) the layers and untied input embeddings
        # sharded, the head and norm whole
        sharded = t.layers * t.layer_params + t.embedding
        parts["teacher parameters"] = x.teacher_bytes * (sharded // n + t.params - sharded)
        parts["gathered teacher layers"] = x.teacher_bytes * max(t.layer_params, t.embedding)  # one unit at a time
    else:
        parts["teacher parameters"] = x.teacher_bytes * t.params
    acts = x.sharded_activations if strategy == "fsdp2" and x.sharded_activations is not None else x.activations
    parts["activations"] = acts.at(b, checkpointing)
    rows = b * x.length
    if x.chunk_size > 0:
        parts["loss buffers"] = (CHUNK_CV_TENSORS * min(x.chunk_size, rows) * x.vocab * 4 + x.vocab * s.hidden * 4
                                 + rows * s.hidden * 4)
    else:
        parts["loss buffers"] = DENSE_VN_TENSORS * rows * x.vocab * 4
    if t is not None:
        parts["teacher forward"] = rows * x.teacher_bytes * (t.hidden + TEACHER_WIDEST * max(t.intermediate, t.hidden))
    return Plan(strategy=strategy, processes=n, batch=b, checkpointing=checkpointing, accumulation=x.accumulation,
                parts=parts)


def largest_batch(x: Inputs, budget: int, *, strategy: str, processes: int, checkpointing: bool,
                  limit: int = 4096) -> int:
    """The largest micro-batch whose plan fits ``budget`` bytes (0 if not even one example does).
    Every component grows at most linearly in the batch, so the search doubles then bisects."""
    def fits(b: int) -> bool:
        return components(x, strategy=strategy, processes=processes, batch=b, checkpointing=checkpointing).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------------------------------------
# From a config: fake models, no weights


@contextlib.contextmanager
def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        yield


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from distill.features import layer_modules

    return list(layer_modules(model))


def shape_of(model: nn.Module) -> Shape:
    """Parameter counts of a (fake) causal LM, tied weights counted once."""
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    layers = _decoder_layers(model)
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    c = model.config
    hidden = c.hidden_size
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return Shape(params=params, layers=len(layers), layer_params=layer_params, hidden=hidden,
                 intermediate=getattr(c, "intermediate_size", None) or 4 * hidden, vocab=head.shape[0],
                 embedding=0 if embedding is head else embedding.numel())


def _saved(model: nn.Module, layers: list, *, length: int, batch: int, autocast_dtype, packed: bool):
    """(all bytes saved for backward, the decoder layers' share, one layer's input bytes) of one forward."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict = {}  # storage id -> (bytes, saved inside a decoder layer, the storage kept alive)
    inside = [False]
    layer_input = [0]
    hooks = []
    for layer in layers:
        def pre(mod, args, kwargs):
            inside[0] = True
            h = args[0] if args else kwargs.get("hidden_states")
            layer_input[0] = max(layer_input[0], h.numel() * h.element_size())

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda mod, args, out: inside.__setitem__(0, False)))

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in params and key not in saved:
            saved[key] = (storage.nbytes(), inside[0], storage)
        return tensor

    ids = torch.zeros(batch, length, dtype=torch.long)
    # A packed batch has no padding: transformers then drops the mask (causal SDPA, native GQA); a
    # fake mask's values cannot be read, so an all-ones one would take the padded path.
    mask = None if packed else torch.ones_like(ids)
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast(
                "cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            model.base_model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return (sum(v[0] for v in saved.values()), sum(v[0] for v in saved.values() if v[1]), layer_input[0])


def saved_activations(model: nn.Module, *, length: int, autocast_dtype: Optional[torch.dtype],
                      packed: bool = True) -> Activations:
    """What a forward of ``model``'s backbone at ``length`` tokens saves for backward, counted once per
    storage (views and re-saved tensors share one), parameters excluded, from forwards at batch 1
    and 2 (every saved tensor's size is affine in the batch). ``packed``: rows without padding.
    ``model`` may be fake (inside ``_fake()``): nothing is allocated then."""
    layers = _decoder_layers(model)
    kw = dict(length=length, autocast_dtype=autocast_dtype, packed=packed)
    (a1, l1, i1), (a2, l2, _) = (_saved(model, layers, batch=b, **kw) for b in (1, 2))
    return Activations(fixed=2 * a1 - a2, per_example=a2 - a1, layers_fixed=2 * l1 - l2, layers_per_example=l2 - l1,
                       layer_input_per_example=i1, layers=len(layers))


def _hf_config(path: str, *, revision=None, trust_remote_code=False):
    from transformers import AutoConfig

    local = Path(path).expanduser()
    if local.is_absolute() or path.startswith(".") or local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{path}: " + ("no config.json in this folder" if local.is_dir() else "no such model folder"))
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the model config of {path}: {str(e).splitlines()[0]}") from None


def _lm(hf_config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM of ``hf_config`` (fake, inside ``_fake()``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def student_config(config: Config, vocab_size: int):
    """The student's transformers config, as `distill train` would build the student (no weights)."""
    s = config.student
    if s.model:
        return _hf_config(s.model, revision=s.revision, trust_remote_code=s.trust_remote_code)
    if s.config is not None:
        from distill.models import arch_config

        return arch_config(s.config, vocab_size=vocab_size)
    teacher = _hf_config(config.teacher.model, revision=config.teacher.revision,
                         trust_remote_code=config.teacher.trust_remote_code)
    teacher.num_hidden_layers = len(s.init_from_teacher_layers)
    return teacher


def inputs_of(config: Config, tokenizer=None) -> Inputs:
    """The plan's inputs for a validated causal-LM config: tokenizer (the run's, loaded when not
    given) and model configs only."""
    from distill.build import load_run_tokenizer, teacher_dtype

    if config.task != "causal_lm":
        raise UserError(f"distill plan covers task causal_lm; this config has task {config.task}")
    t, L = config.train, config.loss
    if tokenizer is None:
        _, tokenizer = load_run_tokenizer(config)
    live = config.teacher.model and config.teacher.source == "live"
    teacher_hf = _hf_config(config.teacher.model, revision=config.teacher.revision,
                            trust_remote_code=config.teacher.trust_remote_code) if live else None
    student_hf = student_config(config, len(tokenizer))
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    with _fake():  # shapes only: nothing below allocates
        teacher_shape = shape_of(_lm(teacher_hf)) if live else None
        student = _lm(student_hf)
        packed = config.data.packing and config.data.format in ("auto", "text")
        acts = saved_activations(student, length=config.data.max_length, autocast_dtype=compute, packed=packed)
        shape = shape_of(student)
        sharded = (saved_activations(_lm(student_hf, compute), length=config.data.max_length, autocast_dtype=compute,
                                     packed=packed) if compute == torch.bfloat16 else None)  # sharding.settings
    return Inputs(student=shape, teacher=teacher_shape, activations=acts, sharded_activations=sharded, batch=t.batch_size,
                  length=config.data.max_length, optimizer=t.optimizer,
                  teacher_bytes=BYTES[teacher_dtype(config)], compute_bytes=BYTES.get(compute, 4),
                  chunk_size=L.chunk_size, vocab=len(tokenizer), accumulation=t.grad_accum_steps,
                  zero3_buckets=zero3.memory_settings())


def device_memory(processes_here: int = 1) -> tuple[int, str]:
    """(bytes, what they are) one process may use: the GPU's total memory, else available RAM
    shared by the processes on this machine."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name} memory"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                return available // max(processes_here, 1), (
                    "available RAM" + (f" / {processes_here} processes" if processes_here > 1 else ""))
    except OSError:
        pass
    return 0, "unknown"


def size(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2 ** 20:,.1f} MiB"


def table(x: Inputs, processes: int, budget: Optional[int], checkpointing: bool) -> str:
    """The plan as text: components per strategy, total, fit, and the largest micro-batch that fits."""
    strategies = ("ddp", "fsdp2", "zero3")
    plans = [components(x, strategy=s, processes=processes, checkpointing=checkpointing) for s in strategies]
    rows = [(name, [size(p.parts[name]) if name in p.parts else "-" for p in plans])
            for name in ORDER if any(name in p.parts for p in plans)]
    rows.append(("total", [size(p.total) for p in plans]))
    if budget:
        rows.append(("fits", ["yes" if p.total <= budget else "NO" for p in plans]))
        for ckpt in (False, True):
            rows.append(("largest micro-batch" + (" (checkpointing)" if ckpt else ""),
                         [str(largest_batch(x, budget, strategy=s, processes=processes, checkpointing=ckpt))
                          for s in strategies]))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'per process':<{width}}{'DDP':>14}{'FSDP2':>14}{'ZeRO-3':>14}"]
    lines += [f"{name:<{width}}" + "".join(f"{v:>14}" for v in values) for name, values in rows]
    return "\n".join(lines)


def budget_of(config: Config, processes_here: int, gpu_memory: Optional[float] = None) -> tuple[int, str]:
    """(bytes, where they come from) per process: ``gpu_memory`` GiB, else train.memory_gb, else the device's."""
    if gpu_memory is not None:
        return int(gpu_memory * GiB), "--gpu-memory"
    if config.train.memory_gb:
        return int(config.train.memory_gb * GiB), "train.memory_gb"
    return device_memory(processes_here)


def check_fits(config: Config, processes: int, processes_here: int, tokenizer=None, strategy: str = "ddp") -> None:
    """Refuse a run whose plan (for the ``strategy`` it runs) exceeds its memory, before weights load.
    ``train.memory_gb``: the budget (default: the device's, ``device_memory``); 0: no check."""
    t = config.train
    if t.memory_gb == 0:
        return
    budget, what = budget_of(config, processes_here)
    if not budget:
        return
    x = inputs_of(config, tokenizer)
    plan = components(x, strategy=strategy, processes=processes, checkpointing=t.gradient_checkpointing)
    if plan.total <= budget:
        return
    top = sorted(plan.parts.items(), key=lambda kv: -kv[1])[:4]
    best = largest_batch(x, budget, strategy=strategy, processes=processes, checkpointing=t.gradient_checkpointing)
    hint = (f"train.batch_size={best} fits" if best else
            "not even micro-batch 1 fits: a smaller teacher dtype, a cache teacher, more memory or sharding")
    raise MemoryPlanError(
        f"this run needs about {size(plan.total)} per process but has {size(budget)} ({what}): "
        + ", ".join(f"{k} {size(v)}" for k, v in top) + f"; {hint} (see `distill plan`; train.memory_gb=0 skips this check)")


def loading(x: Inputs, student_from: str) -> str:
    """What loading the weights costs in host memory under DDP, FSDP2 and ZeRO-3. ``student_from``: "model"
    (student.model, read from disk), "config" (built by every process from the seed) or "teacher"
    (student.init_from_teacher_layers, made by process 0 from the teacher it read). The student is
    loaded in fp32."""
    student = f"the student ({size(4 * x.student.params)})"
    whole = student if x.teacher is None else f"the teacher ({size(x.teacher_bytes * x.teacher.params)}) and {student}"
    if student_from in ("model", "teacher"):  # teacher: the student is made of its layers, on process 0
        fsdp = "process 0 alone reads them and sends the others their shards"
    elif x.teacher is None:
        fsdp = "every process builds the student from its config, then keeps its shards"
    else:
        fsdp = ("process 0 alone reads the teacher and sends the others their shards; every process builds the "
                "student from its config")
    if student_from == "teacher" or x.teacher is None:
        zero = f"every process holds {whole} until DeepSpeed partitions the student"
    else:
        zero = (f"process 0 alone reads the teacher and sends the others their shards; every process holds {student} "
                "until DeepSpeed partitions it")
    return f"loading (host memory): under DDP every process holds {whole}; under FSDP2 {fsdp}; under ZeRO-3 {zero}."


def plan_main(config: Config, processes: int, gpu_memory: Optional[float]) -> str:
    """The text `distill plan` prints."""
    x = inputs_of(config)
    t = config.train
    budget, what = budget_of(config, 1 if torch.cuda.is_available() else processes, gpu_memory)
    head = [f"student {x.student.params / 1e6:,.1f}M parameters ({x.student.layers} layers), "
            + (f"teacher {x.teacher.params / 1e6:,.1f}M ({x.teacher.layers} layers, {x.teacher_bytes} B each)"
               if x.teacher is not None else "no teacher in memory"),
            f"micro-batch {x.batch} x {x.length} tokens, vocabulary {x.vocab:,}, "
            f"{'chunked loss (' + str(x.chunk_size) + ' rows)' if x.chunk_size else 'dense loss'}, "
            f"{t.optimizer}, precision {t.precision}, {processes} process{'es' if processes > 1 else ''}, "
            f"gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}",
            f"memory per process: {size(budget)} ({what})" if budget else "memory per process: unknown"]
    foot = ("total: the persistent parts plus the larger of the gradients and the forward's activations, loss "
            "buffers and teacher forward (with grad_accum_steps 1 they are not alive at once; with accumulation, "
            "all of it).\nEstimates of tensor bytes: the allocator, CUDA context and Python come on top (on CPU "
            "the resident peak ran 1.3-1.7x the tensor peak, 2.7x in one run, BENCHMARKS.md).\ndistill train runs "
            "FSDP2 under train.sharding=fsdp2 or an Accelerate FSDP launch config, ZeRO-3 under "
            "train.sharding=zero3 or a DEEPSPEED one, DDP otherwise.")
    s = config.student
    load = loading(x, "model" if s.model else "teacher" if s.init_from_teacher_layers else "config")
    return "\n".join(head + ["", table(x, processes, budget, t.gradient_checkpointing), "", load, foot])
