"""Saving and loading compressed models (design.md section 6).

A compressed model is written as a normal Hugging Face folder: ``config.json``,
``model.safetensors`` (each factorised layer holds ``<layer>.down.weight`` r x n and
``<layer>.up.weight`` m x r, plus ``<layer>.up.bias``) and the tokenizer files, with a namespaced
block in ``config.json``::

    "gfwsvd": {"format_version": 1, "method": ..., "ranks": {layer: r}, "dense_types": {layer: ...},
               "bias": {layer: bool}, "source_model": ..., "calibration": ..., "model_class": ...,
               "tied": {dropped_key: kept_key}, "absent_modules": [...], **extra}

Plain ``from_pretrained`` on such a folder silently builds a wrong dense model, so
:func:`load_compressed` is the documented path; :func:`export_dense` writes a folder with the
factors multiplied back for other tools. Nothing is pickled: tensors go through safetensors and
metadata through JSON.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .factorized import LowRankLinear, replace_layer, to_dense
from .layers import is_linear_like, weight_shape

FORMAT_VERSION = 1
BLOCK = "gfwsvd"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
_RESERVED = (
    "format_version", "method", "ranks", "dense_types", "bias", "source_model", "calibration",
    "model_class", "tied", "absent_modules",
)

PathLike = Union[str, Path]


class CompressedFormatError(ValueError):
    """A folder that is not a valid gfwsvd export (missing, foreign, corrupt or tampered)."""


# ----------------------------------------------------------------------------------------------
# helpers


def _low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError(f"{type(model).__name__} has no Hugging Face config; only transformers models can be saved")
    cfg = json.loads(config.to_json_string(use_diff=False))  # JSON-safe (dtypes as strings)
    cfg.pop(BLOCK, None)
    return cfg


def _config_class(model_type: Optional[str]):
    from transformers import CONFIG_MAPPING

    if not model_type or model_type not in CONFIG_MAPPING:
        return None
    return CONFIG_MAPPING[model_type]


def _skeleton(cfg: Mapping[str, Any], model_class: str, device=None) -> nn.Module:
    """An (untrained) instance of ``model_class`` built from a config dict; no download."""
    import transformers

    cfg = dict(cfg)
    cfg.pop(BLOCK, None)
    config_class = _config_class(cfg.get("model_type"))
    if config_class is None:
        raise ValueError(f"unknown model_type {cfg.get('model_type')!r}: this transformers version cannot build it")
    cls = getattr(transformers, model_class, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"model class {model_class!r} is not a transformers model class")
    config = config_class.from_dict(cfg)
    if device is None:
        return cls(config)
    with torch.device(device):
        return cls(config)


def _absent_modules(model: nn.Module, skeleton: nn.Module) -> list[str]:
    """Top-most submodules the config-built skeleton has and the model lacks (e.g. BERT's pooler
    when built with ``add_pooling_layer=False``); the loader sets them to None."""
    have = {name for name, _ in model.named_modules()}
    absent = []
    for name, _ in skeleton.named_modules():
        if not name or name in have:
            continue
        parent = name.rpartition(".")[0]
        if parent == "" or parent in have:
            absent.append(name)
    return absent


def _shared_storage_plan(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write, each storage once, and ``{dropped_key: kept_key}`` for exact aliases.

    Keys that alias an earlier tensor exactly (same storage, offset, shape and strides: tied
    weights) are dropped and recorded; partial overlaps (views of one buffer) are saved as copies.
    """
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}  # exact alias key -> first name
    storages: set[int] = set()
    for key, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device: nothing to save")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        alias = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ptr is not None and alias in seen:
            tied[key] = seen[alias]
            continue
        if ptr is not None:
            seen[alias] = key
            if ptr in storages:  # shares memory with another, differently shaped tensor
                t = t.clone()
            storages.add(ptr)
        out[key] = t.cpu().contiguous()
    return out, tied


def _tensor_identities(model: nn.Module) -> dict[str, int]:
    """``{state-dict key: id of the parameter / buffer object}``; tied keys share an id (meta works too)."""
    ids = {k: id(p) for k, p in model.named_parameters(remove_duplicate=False)}
    ids.update({k: id(b) for k, b in model.named_buffers(remove_duplicate=False)})
    return ids


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return getattr(module, attr)


def _retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    for dropped, kept in tied.items():
        target = _get_tensor(model, kept)
        module_name, _, attr = dropped.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters and isinstance(target, nn.Parameter):
            module._parameters[attr] = target
        elif attr in module._buffers:
            module._buffers[attr] = target
        else:
            setattr(module, attr, target)


def _fail_keys(what: str, keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {shown}{more}"


def _json_safe(value: Any, label: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label} must be JSON-serialisable: {exc}") from exc
    return value


# ----------------------------------------------------------------------------------------------
# save


def save_compressed(
    model: nn.Module,
    folder: PathLike,
    tokenizer=None,
    method: str = "",
    source_model: str = "",
    calibration: Any = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``model`` (with its :class:`LowRankLinear` layers) as a gfwsvd Hugging Face folder.

    Returns the folder. Tied tensors are written once and re-tied on load. Load it back with
    :func:`load_compressed`; plain ``from_pretrained`` would build a wrong dense model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = _config_dict(model)
    model_class = type(model).__name__
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} clash with the reserved keys of the gfwsvd block")

    low = _low_rank_layers(model)
    try:  # the loader rebuilds the model from its config: check now that it can
        skeleton = _skeleton(cfg, model_class, device="meta")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"{model_class} cannot be rebuilt from its config ({exc}), so load_compressed could not "
            "load this folder; use export_dense instead"
        ) from exc
    absent = _absent_modules(model, skeleton)
    arch_ids = _tensor_identities(skeleton)
    del skeleton

    tensors, tied = _shared_storage_plan(model.state_dict())
    for dropped, kept in list(tied.items()):
        # the loader re-ties only what the config-built model ties itself; other aliases are
        # written twice (as copies) so that nothing missing is ever tolerated without a tie
        if dropped not in arch_ids or arch_ids.get(dropped) != arch_ids.get(kept):
            tensors[dropped] = tensors[kept].clone()
            del tied[dropped]
    block = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "ranks": {name: m.rank for name, m in low.items()},
        "dense_types": {name: m.dense_type for name, m in low.items()},
        "bias": {name: m.up.bias is not None for name, m in low.items()},
        "source_model": source_model,
        "calibration": _json_safe(calibration, "calibration"),
        "model_class": model_class,
        "tied": tied,
        "absent_modules": absent,
        **_json_safe(extra, "extra"),
    }
    cfg[BLOCK] = block
    cfg["architectures"] = [model_class]

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "gfwsvd_format_version": str(FORMAT_VERSION)})
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    (folder / README_FILE).write_text(_readme(folder, block), encoding="utf-8")
    return folder


def _readme(folder: Path, block: Mapping[str, Any]) -> str:
    ranks = block["ranks"]
    return (
        "# gfwsvd compressed model\n\n"
        f"Method: {block['method'] or 'unspecified'}; source model: "
        f"{block['source_model'] or 'unspecified'}; {len(ranks)} factorised layers "
        f"(format version {block['format_version']}).\n\n"
        "Load it with the gfwsvd loader (plain `from_pretrained` would build a wrong dense model):\n\n"
        "```python\n"
        "from gfwsvd_core.io import load_compressed\n"
        f'model = load_compressed("{folder}")\n'
        "```\n"
    )


# ----------------------------------------------------------------------------------------------
# load


def _read_block(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not folder.exists():
        raise CompressedFormatError(f"folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise CompressedFormatError(f"{str(folder)!r} is not a folder.")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CompressedFormatError(f"folder {str(folder)!r} has no {CONFIG_FILE}, so it is not a model export.")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressedFormatError(f"{config_path} is not readable JSON ({exc}).") from exc
    if not isinstance(cfg, dict):
        raise CompressedFormatError(f"{config_path} does not hold a JSON object.")
    block = cfg.pop(BLOCK, None)
    if block is None:
        raise CompressedFormatError(
            f"{str(folder)!r} is not a gfwsvd export (its {CONFIG_FILE} has no \"{BLOCK}\" block); "
            "load it with from_pretrained."
        )
    if not isinstance(block, dict):
        raise CompressedFormatError(f"the \"{BLOCK}\" block of {config_path} is not a JSON object.")
    version = block.get("format_version")
    if version != FORMAT_VERSION:
        raise CompressedFormatError(
            f"{str(folder)!r} has gfwsvd format_version {version!r}, but this version of gfwsvd reads only "
            f"format_version {FORMAT_VERSION}."
        )
    for key, kind in (("ranks", dict), ("dense_types", dict), ("bias", dict), ("model_class", str)):
        if not isinstance(block.get(key), kind):
            raise CompressedFormatError(f"the \"{BLOCK}\" block of {config_path} lacks a valid {key!r} entry.")
    for key, kind in (("tied", dict), ("absent_modules", list)):
        if not isinstance(block.get(key, kind()), kind):
            raise CompressedFormatError(f"the \"{BLOCK}\" block of {config_path} has an invalid {key!r} entry.")
    for name, rank in block["ranks"].items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CompressedFormatError(f"{config_path} gives layer {name!r} the invalid rank {rank!r}.")
    return cfg, block


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CompressedFormatError(f"folder {str(folder)!r} has no {WEIGHTS_FILE}.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CompressedFormatError(f"{path} is truncated or corrupt and cannot be read ({exc}).") from exc


def load_compressed(folder: PathLike, device=None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Load a folder written by :func:`save_compressed`, with strict checks; eval mode.

    The model is rebuilt from ``config.json`` (no download), each layer in ``ranks`` is replaced
    by an empty :class:`LowRankLinear`, and the tensors must match exactly: nothing missing but
    the recorded tied keys, nothing unexpected, every shape equal. Every failure is a
    :class:`CompressedFormatError`.
    """
    folder = Path(folder)
    cfg, block = _read_block(folder)
    tensors = _read_tensors(folder)
    ranks: dict[str, int] = block["ranks"]
    tied: dict[str, str] = block.get("tied", {})

    try:
        model = _skeleton(cfg, block["model_class"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CompressedFormatError(f"cannot rebuild the model of {str(folder)!r} from its config: {exc}.") from exc
    arch_ids = _tensor_identities(model)
    for dropped, kept in tied.items():
        if not isinstance(dropped, str) or not isinstance(kept, str):
            raise CompressedFormatError(f"{CONFIG_FILE} has a malformed tied entry {dropped!r}: {kept!r}.")
        if dropped in tensors:
            raise CompressedFormatError(
                f"{CONFIG_FILE} records {dropped!r} as a tied copy of {kept!r}, but {WEIGHTS_FILE} holds it too."
            )
        if dropped not in arch_ids or arch_ids.get(dropped) != arch_ids.get(kept):
            raise CompressedFormatError(
                f"{CONFIG_FILE} records {dropped!r} as tied to {kept!r}, but {block['model_class']} does not tie "
                "them, so the missing tensor cannot be restored."
            )

    for name in block.get("absent_modules", []):
        try:
            replace_layer(model, name, None)
        except KeyError as exc:
            raise CompressedFormatError(f"{CONFIG_FILE} lists absent module {name!r}, which the model does not have.") from exc

    # factorised layers: check ranks against the tensors, then swap in empty LowRankLinear
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as exc:
            raise CompressedFormatError(f"{CONFIG_FILE} lists factorised layer {name!r}, which the model does not have.") from exc
        if not is_linear_like(dense):
            raise CompressedFormatError(f"{CONFIG_FILE} lists layer {name!r}, which is a {type(dense).__name__}, not a linear layer.")
        m, n = weight_shape(dense)
        dense_type = block["dense_types"].get(name, "linear")
        if dense_type not in ("linear", "conv1d"):
            raise CompressedFormatError(f"{CONFIG_FILE} gives layer {name!r} the unknown dense type {dense_type!r}.")
        down = tensors.get(f"{name}.down.weight")
        if down is not None and down.dim() == 2 and down.shape[0] != rank:
            raise CompressedFormatError(
                f"{CONFIG_FILE} says layer {name!r} has rank {rank}, but its tensors have rank {down.shape[0]}."
            )
        bias = bool(block["bias"].get(name, True))
        replace_layer(model, name, LowRankLinear(n, m, rank, bias=bias, dense_type=dense_type))

    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    bad_tied = [k for k in tied if k not in expected or tied[k] not in tensors]
    unlisted = [
        k[: -len(".down.weight")] for k in unexpected
        if k.endswith(".down.weight") and f"{k[: -len('.down.weight')]}.weight" in missing
    ]
    if unlisted:
        raise CompressedFormatError(
            f"{WEIGHTS_FILE} in {str(folder)!r} holds " + _fail_keys("factorised layers missing from the ranks in " + CONFIG_FILE, unlisted) + "."
        )
    if missing:
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} lacks " + _fail_keys("expected tensors", missing) + ".")
    if unexpected:
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} has " + _fail_keys("unexpected tensors", unexpected) + ".")
    if bad_tied:
        raise CompressedFormatError(f"{CONFIG_FILE} records " + _fail_keys("tied tensors that do not resolve", bad_tied) + ".")
    wrong = [
        f"{k} {tuple(tensors[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in tensors
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} has " + _fail_keys("tensors of the wrong shape", wrong) + ".")

    # assign=True keeps each saved tensor's dtype (no silent up/down-casting)
    model.load_state_dict(tensors, strict=False, assign=True)
    _retie(model, tied)
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device=device)
    return model.eval()


def load_tokenizer(folder: PathLike):
    """The tokenizer saved in ``folder`` (``AutoTokenizer``), or None when there is none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ----------------------------------------------------------------------------------------------
# dense export


def _head_untied(model: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return False
    emb, head = get_in(), get_out()
    if emb is None or head is None or not hasattr(emb, "weight") or not hasattr(head, "weight"):
        return False
    return head.weight is not emb.weight


def export_dense(model: nn.Module, folder: PathLike, tokenizer=None) -> Path:
    """Write a plain Hugging Face folder with every factorised layer multiplied back.

    Any ``AutoModel*.from_pretrained(folder)`` loads it; outputs equal the factorised model's up
    to float rounding. The gfwsvd block is not written (this is an ordinary dense model).
    """
    folder = Path(folder)
    dense = copy.deepcopy(model)
    for name, module in _low_rank_layers(dense).items():
        replace_layer(dense, name, to_dense(module))
    config = getattr(dense, "config", None)
    if config is not None and hasattr(config, BLOCK):
        delattr(config, BLOCK)
    if config is not None and getattr(config, "tie_word_embeddings", False) and _head_untied(dense):
        # the head was factorised, so it no longer shares the embedding: say so, or from_pretrained
        # would tie the multiplied-back head to the embedding again
        config.tie_word_embeddings = False
    folder.mkdir(parents=True, exist_ok=True)
    dense.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


__all__ = [
    "FORMAT_VERSION", "CompressedFormatError", "save_compressed", "load_compressed", "load_tokenizer",
    "export_dense",
]
