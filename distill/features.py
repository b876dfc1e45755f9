"""Where the feature terms' inputs come from, shared by every loop that has them (the classifier /
encoder loop in ``distill.classify`` and the causal-LM loop in ``distill.training``): a model's
layers, their q / k / v projections and attention modules, hooks that keep their outputs, the
settings built from ``loss.features``, and the terms per position
(``distill.losses.features`` holds the math).

Indexing of hidden states follows Hugging Face's ``hidden_states``: 0 is the embedding output, i + 1
the output of layer i.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from distill.errors import UserError
from distill.losses.features import attention_kl, check_layer_map, hidden_state_loss, relation_kl, uniform_layer_map

log = logging.getLogger(__name__)

# The q / k / v projections inside one attention layer, by the names the common architectures use.
QKV = {"query": ("query", "q_proj", "q_lin"), "key": ("key", "k_proj", "k_lin"),
       "value": ("value", "v_proj", "v_lin")}
_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|layer|blocks)\.(\d+)$")


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers, in order (``encoder.layer.N``, ``model.layers.N``, ...)."""
    found = {}
    for name, module in model.named_modules():
        m = _LAYER.match(name)
        if m is not None and int(m.group(1)) not in found:
            found[int(m.group(1))] = module
    return [found[i] for i in sorted(found)]


def qkv_modules(layer: nn.Module, where: str) -> dict[str, nn.Module]:
    """The query / key / value projections of one layer (a fused qkv projection is not supported)."""
    out = {}
    for kind, names in QKV.items():
        hits = [m for n, m in layer.named_modules() if n.split(".")[-1] in names and isinstance(m, nn.Linear)]
        if len(hits) != 1:
            raise UserError(f"loss.features.relation_weight: cannot find one {kind} projection in {where}'s layer "
                            f"(looked for a Linear named {' / '.join(names)}); attention relations need separate "
                            "q / k / v projections")
        out[kind] = hits[0]
    return out


def attention_module(layer: nn.Module, where: str) -> nn.Module:
    """A decoder layer's self-attention (the outermost submodule whose class name ends in Attention)."""
    for name, module in layer.named_modules():
        if name and type(module).__name__.endswith("Attention"):
            return module
    raise UserError(f"loss.features.attention_weight: cannot find the attention module in {where}'s layers")


class Capture:
    """Forward hooks that keep the outputs of modules by key. ``always``: every forward records
    (until ``clear``); otherwise only forwards inside ``recording()`` do (sampling and evaluation
    with the same model then keep nothing)."""

    def __init__(self, modules: dict, *, always: bool = True, pick=None):
        self.outputs: dict = {}
        self.active = always
        self.pick = pick or (lambda key, output: output)
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def _hook(self, key):
        def hook(module, args, output):
            if self.active:
                self.outputs[key] = self.pick(key, output)
        return hook

    def clear(self) -> None:
        self.outputs = {}

    @contextlib.contextmanager
    def recording(self):
        """Record the forwards inside; yields the dict they fill, which the hooks let go of on exit."""
        self.outputs, self.active = {}, True
        try:
            yield self.outputs
        finally:
            self.outputs, self.active = {}, False


@dataclass
class FeatureSettings:
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"
    layer_map: list[int] = field(default_factory=list)  # teacher layer per student layer (-1: none)
    include_embeddings: bool = False
    attention_weight: float = 0.0
    attention_heads: str = "match"
    relation_weight: float = 0.0
    relation_heads: int = 0
    relation_layer: int = -1  # the teacher layer whose q / k / v the relations use
    embedding: Optional[dict] = None  # task=embedding: pooling, kind and the weights of loss.embedding

    @property
    def hidden(self) -> bool:
        return self.hidden_weight > 0

    @property
    def attentions(self) -> bool:
        return self.attention_weight > 0

    @property
    def relations(self) -> bool:
        return self.relation_weight > 0

    @property
    def any(self) -> bool:
        return self.hidden or self.attentions or self.relations

    def hidden_pairs(self) -> list[tuple[int, int]]:
        """(student, teacher) indices into ``hidden_states`` (0: the embeddings)."""
        pairs = [(s + 1, t + 1) for s, t in enumerate(self.layer_map) if t >= 0]
        return [(0, 0)] + pairs if self.include_embeddings else pairs

    def weights(self) -> dict:
        return {"hidden": self.hidden_weight, "attention": self.attention_weight, "relation": self.relation_weight}


def feature_settings(config, student: nn.Module, teacher: Optional[nn.Module]) -> FeatureSettings:
    """``loss.features`` (and, for task=embedding, ``loss.embedding``) checked against the two models."""
    f = config.loss.features
    e = None
    if config.task == "embedding":
        from dataclasses import asdict

        from distill.config import EmbeddingConfig

        e = asdict(config.loss.embedding or EmbeddingConfig())
    if f is None or teacher is None:
        return FeatureSettings(embedding=e)
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    try:
        layer_map = (check_layer_map(f.layer_map, n_s, n_t) if f.layer_map is not None
                     else uniform_layer_map(n_s, n_t))
    except ValueError as err:
        raise UserError(f"loss.features.layer_map: {err}") from None
    heads = f.relation_heads or student.config.num_attention_heads
    relation_layer = n_t - 1 if f.relation_layer is None else f.relation_layer
    if f.relation_weight > 0 and not 0 <= relation_layer < n_t:
        raise UserError(f"loss.features.relation_layer {relation_layer} is outside the teacher's 0..{n_t - 1}")
    return FeatureSettings(hidden_weight=f.hidden_weight, hidden_kind=f.hidden_kind, layer_map=layer_map,
                           include_embeddings=f.include_embeddings, attention_weight=f.attention_weight,
                           attention_heads=f.attention_heads, relation_weight=f.relation_weight, relation_heads=heads,
                           relation_layer=relation_layer, embedding=e)


def check_relation_widths(features: FeatureSettings, student: nn.Module, teacher: nn.Module) -> None:
    for side, m, index in (("student", student, -1), ("teacher", teacher, features.relation_layer)):
        for kind, lin in qkv_modules(layer_modules(m)[index], f"the {side}").items():
            if lin.out_features % features.relation_heads:
                raise UserError(f"loss.features.relation_heads={features.relation_heads} does not divide the "
                                f"{side}'s {kind} width {lin.out_features}")


def check_attentions(attentions, what: str) -> None:
    if attentions is None or any(a is None for a in (attentions.values() if isinstance(attentions, dict)
                                                     else attentions)):
        raise UserError(f"loss.features.attention_weight: {what}'s attention implementation returned no attention "
                        "probabilities (flash / sdpa kernels cannot); it must run eager attention")


def use_eager_attention(model: nn.Module, what: str) -> None:
    """Attention maps need the probabilities, which only eager attention returns: switch, and say so."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == "eager":
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError) as e:
        raise UserError(f"loss.features.attention_weight needs attention probabilities, but {what} cannot run eager "
                        f"attention: {e}") from None
    log.warning("loss.features.attention_weight: %s runs eager attention (it was %s), which returns the attention "
                "probabilities and is slower and heavier than fused kernels", what, current)


def feature_projections(features: FeatureSettings, student_width: int, teacher_width: int) -> nn.ModuleDict:
    """The hidden-state term's learned projections (student width -> teacher width), one per mapped
    student index; trained with the student, never saved with it."""
    from distill.losses.features import FeatureProjection

    return nn.ModuleDict({str(s): FeatureProjection(student_width, teacher_width) for s, _ in features.hidden_pairs()}
                         if features.hidden else {})


def per_position_terms(f: FeatureSettings, projections: nn.ModuleDict, student: dict, teacher: dict, mask: Tensor, *,
                       causal: bool = False) -> dict[str, Tensor]:
    """Each feature term per position, (B, T) float32, the mean over the mapped layers (0 at
    positions outside ``mask``). ``student`` / ``teacher``: "hidden" (indexable as ``hidden_states``),
    "attentions" (by layer), "qkv" ({query, key, value} of the relation layer); ``mask`` (B, T) bool,
    the real positions. ``causal``: relations over earlier keys only (decoders)."""
    terms = {}
    if f.hidden:  # FitNets / TinyBERT
        per = [hidden_state_loss(student["hidden"][s], teacher["hidden"][t], kind=f.hidden_kind,
                                 projection=projections[str(s)]) for s, t in f.hidden_pairs()]
        terms["hidden"] = torch.where(mask, torch.stack(per).mean(0), 0.0)
    if f.attentions:  # TinyBERT attention maps, KL per query
        per = [attention_kl(student["attentions"][s], teacher["attentions"][t], mask, heads=f.attention_heads)
               for s, t in enumerate(f.layer_map) if t >= 0]
        terms["attention"] = torch.stack(per).mean(0)
    if f.relations:  # MiniLM v2: q-q, k-k and v-v relations of the last student layer, averaged
        per = [relation_kl(student["qkv"][k], teacher["qkv"][k], mask, relation_heads=f.relation_heads, causal=causal)
               for k in QKV]
        terms["relation"] = torch.stack(per).mean(0)
    return terms


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerTaps(Capture):
    """Hooks on a causal LM for the feature terms: the embedding output and each layer's output
    (hidden states), each layer's attention probabilities, the relation layer's q / k / v. Records
    only inside ``recording()``; ``grouped`` of what it yields is {"hidden": {i: (B, T, d)},
    "attentions": {layer: (B, H, T, T)}, "qkv": {kind: (B, T, d)}}."""

    def __init__(self, model: nn.Module, f: FeatureSettings, *, side: str, relation_layer: int):
        layers = layer_modules(model)
        where = f"the {side}"
        if not layers:
            raise UserError(f"loss.features: cannot find {where}'s transformer layers")
        wanted: dict = {}
        if f.hidden:
            indices = {s if side == "student" else t for s, t in f.hidden_pairs()}
            for i in sorted(indices):
                wanted[("hidden", i)] = model.get_input_embeddings() if i == 0 else layers[i - 1]
        if f.attentions:
            for s, t in enumerate(f.layer_map):
                if t >= 0:
                    i = s if side == "student" else t
                    wanted[("attentions", i)] = attention_module(layers[i], where)
        if f.relations:
            for kind, lin in qkv_modules(layers[relation_layer], where).items():
                wanted[("qkv", kind)] = lin

        def pick(key, output):
            return output[1] if key[0] == "attentions" and isinstance(output, (tuple, list)) else (
                None if key[0] == "attentions" else _first(output))

        super().__init__(wanted, always=False, pick=pick)

    @staticmethod
    def grouped(outputs: dict) -> dict:
        """What ``recording()`` yielded, as {"hidden": {...}, "attentions": {...}, "qkv": {...}}."""
        out: dict = {"hidden": {}, "attentions": {}, "qkv": {}}
        for (group, key), value in outputs.items():
            out[group][key] = value
        return out
