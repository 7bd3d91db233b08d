"""Students: from a config, from a pretrained directory, or initialised from the teacher.

Initialising from the teacher (the DistilBERT recipe) builds the teacher's architecture with fewer
layers and copies the embeddings, the chosen subset of transformer layers (in order) and everything
after them (final LayerNorm, pooler, LM head) by parameter name. The DistilBERT extraction scripts did
the same by hand for BERT/RoBERTa → DistilBERT and GPT-2; here one table of per-family layer
prefixes covers them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# model_type → the parameter-name prefix of the i-th transformer layer (without any base-model
# prefix such as "bert." or "transformer.", which is matched as an optional prefix).
LAYER_PREFIXES = {
    "bert": "encoder.layer.",
    "roberta": "encoder.layer.",
    "xlm-roberta": "encoder.layer.",
    "camembert": "encoder.layer.",
    "distilbert": "transformer.layer.",
    "gpt2": "h.",
    # Decoder LLMs: model.layers.<i> under *ForCausalLM.
    "llama": "layers.",
    "mistral": "layers.",
    "qwen2": "layers.",
    "qwen3": "layers.",
    "gemma": "layers.",
    "gemma2": "layers.",
}


def default_student_layers(num_teacher_layers: int) -> list[int]:
    """Every other teacher layer: 0, 2, 4, ... (12 → 6 layers, 6 → 3, 4 → 2)."""
    return list(range(0, num_teacher_layers, 2))


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def init_student_from_teacher(teacher: nn.Module, layers: list[int] | None = None) -> nn.Module:
    """A copy of ``teacher``'s architecture with ``len(layers)`` layers, initialised with the
    teacher's embeddings, its layers ``layers`` (student layer j ← teacher layer layers[j]) and its
    head. Supported families: BERT, RoBERTa (and XLM-R/CamemBERT), DistilBERT, GPT-2, Llama,
    Mistral, Qwen2/Qwen3, Gemma/Gemma2; any task head of theirs (``*ForMaskedLM``,
    ``*LMHeadModel``, ``*ForCausalLM``, bare ``*Model``). ``ValueError`` otherwise."""
    config = teacher.config
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYER_PREFIXES:
        raise ValueError(
            f"cannot initialise a student from a {model_type!r} teacher ({type(teacher).__name__}): "
            f"supported families are {', '.join(sorted(LAYER_PREFIXES))}. Give --student-config "
            f"or --student-pretrained instead"
        )
    n_teacher = num_layers(teacher)
    layers = default_student_layers(n_teacher) if layers is None else list(layers)
    if not layers:
        raise ValueError("student_layers must name at least one teacher layer")
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise ValueError(
            f"student_layers {bad} out of range: the teacher has {n_teacher} layers (0..{n_teacher - 1})"
        )
    student_config = config.__class__.from_dict(config.to_dict())
    # attribute_map: n_layer (GPT-2), n_layers (DistilBERT)
    student_config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        student_config.layer_types = [config.layer_types[i] for i in layers]
    student = teacher.__class__(student_config)

    pattern = re.compile(r"^((?:.*\.)?" + re.escape(LAYER_PREFIXES[model_type]) + r")(\d+)\.(.*)$")
    teacher_state = teacher.state_dict()
    new_state = {}
    for name in student.state_dict():
        m = pattern.match(name)
        source = f"{m.group(1)}{layers[int(m.group(2))]}.{m.group(3)}" if m else name
        if source not in teacher_state:
            raise ValueError(f"cannot map student parameter {name!r}: teacher has no {source!r}")
        new_state[name] = teacher_state[source].detach().clone()
    student.load_state_dict(new_state)
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    return student


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def copy_check(student: nn.Module, teacher: nn.Module, layers: list[int]) -> bool:
    """True when ``student`` holds exactly the teacher parameters its layer map says (test aid)."""
    model_type = teacher.config.model_type
    pattern = re.compile(r"^((?:.*\.)?" + re.escape(LAYER_PREFIXES[model_type]) + r")(\d+)\.(.*)$")
    t = teacher.state_dict()
    for name, value in student.state_dict().items():
        m = pattern.match(name)
        source = f"{m.group(1)}{layers[int(m.group(2))]}.{m.group(3)}" if m else name
        if not torch.equal(value, t[source]):
            return False
    return True


def model_dir(path: str) -> str:
    """``path``, or its ``model/`` subdirectory when ``path`` is a checkpoint directory."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        return str(p / "model")
    return path


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of ``model`` (the units FSDP2 shards one by one), found by the
    family's layer prefix; empty for an unknown family (the model is then one unit)."""
    prefix = LAYER_PREFIXES.get(getattr(model.config, "model_type", None))
    if prefix is None:
        return []
    tail = prefix.rstrip(".")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == tail or name.endswith("." + tail)):
            return list(module)
    return []
