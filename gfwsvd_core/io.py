"""Saving and loading compressed models as Hugging Face folders.

A compressed model is written as a normal Hugging Face folder: ``config.json``,
``model.safetensors`` (each factorised layer holds ``<layer>.down.weight`` r x n and
``<layer>.up.weight`` m x r, plus ``<layer>.up.bias``), ``README.md`` and the tokenizer and
generation files, with a namespaced block in ``config.json``::

    "gfwsvd": {"format_version": 1, "method": ..., "ranks": {layer: r}, "dense_types": {layer: ...},
               "bias": {layer: bool}, "source_model": ..., "calibration": ..., "model_class": ...,
               "tied": {dropped_key: kept_key}, "absent_modules": [...], **extra}

Plain ``from_pretrained`` on such a folder silently builds a wrong dense model, so
:func:`load_compressed` is the documented path; :func:`export_dense` writes a folder with the
factors multiplied back for other tools. Nothing is pickled: tensors go through safetensors and
metadata through JSON, and no custom (remote) model or tokenizer code is ever run. Folders are
written into a temporary sibling and moved into place, so a failed save never leaves a mix.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .errors import GfwsvdUserError, OutputPathError
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


class CompressedFormatError(GfwsvdUserError):
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


_NO_CUSTOM_CODE = "gfwsvd never runs custom (remote) model code, so only built-in transformers models load"


_BUDGET = threading.local()  # .left: registrations this thread's build may still make (None: no limit)
_BUDGET_LOCK = threading.Lock()
_BUDGET_HOOKED: list[bool] = []


def _count_registration(module, name, value) -> None:
    """Global parameter/buffer registration hook: fails once this thread's budgeted build has
    registered more tensors than allowed, so a config inflated to thousands of layers stops early."""
    left = getattr(_BUDGET, "left", None)
    if left is None or value is None:
        return
    if left <= 0:
        raise CompressedFormatError(
            f"{CONFIG_FILE} describes a model with more than {_BUDGET.limit} tensors, far more than "
            f"{WEIGHTS_FILE} holds; it was edited or belongs to another model."
        )
    _BUDGET.left = left - 1


def _install_budget_hook() -> None:
    """Install :func:`_count_registration` once, for good: adding and removing global hooks while
    other threads build models could disturb their iteration over the hooks."""
    from torch.nn.modules import module as torch_module

    with _BUDGET_LOCK:
        if not _BUDGET_HOOKED:
            torch_module.register_module_parameter_registration_hook(_count_registration)
            torch_module.register_module_buffer_registration_hook(_count_registration)
            _BUDGET_HOOKED.append(True)


def _skeleton(cfg: Mapping[str, Any], model_class: str, device=None, max_tensors: Optional[int] = None) -> nn.Module:
    """An (untrained) instance of ``model_class`` built from a config dict; no download, no custom code.

    ``max_tensors`` bounds the parameters and buffers the build may register (see :func:`_count_registration`).
    """
    import transformers

    cfg = dict(cfg)
    cfg.pop(BLOCK, None)
    custom = " (its config's auto_map points to custom code)" if cfg.get("auto_map") else ""
    config_class = _config_class(cfg.get("model_type"))
    if config_class is None:
        raise ValueError(
            f"unknown model_type {cfg.get('model_type')!r}{custom}: this transformers version has no "
            f"built-in class for it, and {_NO_CUSTOM_CODE}"
        )
    cls = getattr(transformers, model_class, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"model class {model_class!r} is not a built-in transformers model class{custom}; {_NO_CUSTOM_CODE}")
    config = config_class.from_dict(cfg)
    if max_tensors is not None:
        _install_budget_hook()
        _BUDGET.limit = _BUDGET.left = max_tensors
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(config)
    finally:
        _BUDGET.left = None


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
# output folders

OUTPUT_ROOT_ENV = "GFWSVD_OUTPUT_ROOT"


def output_root() -> Path:
    """Where the app may write folders: ``$GFWSVD_OUTPUT_ROOT``, else ``./gfwsvd-out`` (absolute)."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or "gfwsvd-out").expanduser().resolve()


def resolve_output_folder(path: PathLike, root: Optional[PathLike] = None) -> Path:
    """``path`` inside the output root (relative paths are taken in it), or :class:`OutputPathError`.

    Symlinks and ``..`` are resolved first, so nothing can step outside the root."""
    text = "" if path is None else str(path).strip()
    if not text:
        raise OutputPathError("give a folder name to save to")
    base = Path(root).expanduser().resolve() if root is not None else output_root()
    target = Path(text).expanduser()
    target = (target if target.is_absolute() else base / target).resolve()
    if target == base or base not in target.parents:
        raise OutputPathError(
            f"{text!r} is outside the output root {str(base)!r} (or is the root itself); give a folder inside it, "
            f"or set {OUTPUT_ROOT_ENV} to allow another place"
        )
    return target


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{str(folder)!r} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise OutputPathError(f"folder {str(folder)!r} is not empty; give a new folder or pass overwrite=True")


def _write_folder(folder: Path, overwrite: bool, write) -> Path:
    """Run ``write(tmp)`` into a temporary sibling, then move it into place: a failure leaves the
    old folder untouched, and an overwritten folder keeps no stale files."""
    _check_target(folder, overwrite)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {str(folder.parent)!r}: {exc.strerror or exc}") from None
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        write(tmp)
        if folder.exists():
            _check_target(folder, overwrite)  # it may have been filled while we wrote
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
        tmp.rename(folder)
    except OSError as exc:
        if old is not None and not folder.exists():
            old.rename(folder)  # put the previous folder back
        raise OutputPathError(f"cannot write {str(folder)!r}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


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
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its :class:`LowRankLinear` layers) as a gfwsvd Hugging Face folder.

    Returns the folder. Tied tensors are written once and re-tied on load. Load it back with
    :func:`load_compressed`; plain ``from_pretrained`` would build a wrong dense model. A
    non-empty ``folder`` is refused unless ``overwrite``, which replaces it whole (nothing stale
    stays); the files are written to a temporary sibling first.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = _config_dict(model)
    if "_name_or_path" in cfg:  # where the weights came from, not this machine's folder layout
        cfg["_name_or_path"] = source_model
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

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "gfwsvd_format_version": str(FORMAT_VERSION)})
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation is not None and callable(can_generate) and can_generate():
            generation.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / README_FILE).write_text(_readme(folder, block), encoding="utf-8")

    return _write_folder(folder, overwrite, write)


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


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(folder: Path) -> dict[str, tuple[tuple[int, ...], Optional[torch.dtype]]]:
    """``{key: (shape, dtype)}`` from the safetensors header alone (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CompressedFormatError(f"folder {str(folder)!r} has no {WEIGHTS_FILE}.")
    try:
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(int(d) for d in sl.get_shape()), _DTYPES.get(str(sl.get_dtype())))
        return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CompressedFormatError(f"{path} is truncated or corrupt and cannot be read ({exc}).") from exc


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

    Everything is validated before any tensor is allocated: the model is rebuilt from
    ``config.json`` on the meta device (no download, no storage), each layer in ``ranks`` (an
    integer in ``1..min(m, n)``) becomes an empty :class:`LowRankLinear`, and the safetensors
    header must match exactly: nothing missing but the recorded tied keys, nothing unexpected,
    every shape equal, one floating dtype throughout. Only then are the tensors read and assigned;
    non-persistent buffers are re-created as a normal construction makes them. Every failure is a
    :class:`CompressedFormatError`.
    """
    folder = Path(folder)
    cfg, block = _read_block(folder)
    header = _read_header(folder)
    ranks: dict[str, int] = block["ranks"]
    tied: dict[str, str] = block.get("tied", {})

    try:
        model = _skeleton(cfg, block["model_class"], device="meta", max_tensors=2 * len(header) + 1000)
    except CompressedFormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:
        raise CompressedFormatError(f"cannot rebuild the model of {str(folder)!r} from its config: {exc}.") from exc
    except Exception as exc:  # config validation errors of other libraries (e.g. huggingface_hub)
        raise CompressedFormatError(f"the config of {str(folder)!r} is invalid: {exc}.") from exc
    arch_ids = _tensor_identities(model)
    for dropped, kept in tied.items():
        if not isinstance(dropped, str) or not isinstance(kept, str):
            raise CompressedFormatError(f"{CONFIG_FILE} has a malformed tied entry {dropped!r}: {kept!r}.")
        if dropped in header:
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
        except (KeyError, AttributeError) as exc:
            raise CompressedFormatError(f"{CONFIG_FILE} lists absent module {name!r}, which the model does not have.") from exc

    # factorised layers: check ranks against the shapes, then swap in empty (meta) LowRankLinear
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as exc:
            raise CompressedFormatError(f"{CONFIG_FILE} lists factorised layer {name!r}, which the model does not have.") from exc
        if not is_linear_like(dense):
            raise CompressedFormatError(f"{CONFIG_FILE} lists layer {name!r}, which is a {type(dense).__name__}, not a linear layer.")
        m, n = weight_shape(dense)
        if rank > min(m, n):
            raise CompressedFormatError(
                f"{CONFIG_FILE} gives layer {name!r} ({m} x {n}) rank {rank}; a rank must be at most {min(m, n)}."
            )
        dense_type = block["dense_types"].get(name, "linear")
        if dense_type not in ("linear", "conv1d"):
            raise CompressedFormatError(f"{CONFIG_FILE} gives layer {name!r} the unknown dense type {dense_type!r}.")
        down = header.get(f"{name}.down.weight")
        if down is not None and len(down[0]) == 2 and down[0][0] != rank:
            raise CompressedFormatError(
                f"{CONFIG_FILE} says layer {name!r} has rank {rank}, but its tensors have rank {down[0][0]}."
            )
        bias = bool(block["bias"].get(name, True))
        with torch.device("meta"):
            replace_layer(model, name, LowRankLinear(n, m, rank, bias=bias, dense_type=dense_type))

    expected = model.state_dict()
    missing = [k for k in expected if k not in header and k not in tied]
    unexpected = [k for k in header if k not in expected]
    bad_tied = [k for k in tied if k not in expected or tied[k] not in header]
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
        f"{k} {header[k][0]} instead of {tuple(expected[k].shape)}"
        for k in header if header[k][0] != tuple(expected[k].shape)
    ]
    if wrong:
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} has " + _fail_keys("tensors of the wrong shape", wrong) + ".")
    _check_dtypes(folder, header, expected)

    _restore_buffers(model, folder)  # parameters are still on meta: only the small buffers get storage
    tensors = _read_tensors(folder)  # validated: the only large allocation
    if {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} != header:
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} changed while it was being loaded.")
    try:
        model.load_state_dict(tensors, strict=False, assign=True)  # assign: keeps the saved dtype, no copy
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CompressedFormatError(f"the tensors of {str(folder)!r} do not fit the model ({exc}).") from exc
    _retie(model, tied)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CompressedFormatError(f"loading {str(folder)!r} left " + _fail_keys("tensors without values", left) + ".")
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CompressedFormatError(f"generation_config.json in {str(folder)!r} is invalid ({exc}).") from None
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None:
        model.to(device=device)
    return model.eval()


def _check_dtypes(folder: Path, header: Mapping[str, tuple], expected: Mapping[str, torch.Tensor]) -> None:
    """One floating dtype for every floating tensor, and exactly the expected dtype for the others."""
    floats = {}
    for key, (_, dt) in header.items():
        want = expected[key].dtype
        if dt is None:
            raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} stores {key!r} in an unsupported dtype.")
        if want.is_floating_point:
            if not dt.is_floating_point:
                raise CompressedFormatError(
                    f"{WEIGHTS_FILE} in {str(folder)!r} stores {key!r} as {dt}, but the model needs a floating dtype."
                )
            floats.setdefault(dt, key)
        elif dt != want:
            raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} stores {key!r} as {dt}, expected {want}.")
    if len(floats) > 1:
        shown = ", ".join(f"{dt} (e.g. {key!r})" for dt, key in floats.items())
        raise CompressedFormatError(f"{WEIGHTS_FILE} in {str(folder)!r} mixes floating dtypes: {shown}.")


_MAX_BUFFER_BYTES = 64 * 2**20


_CHECKED_INTS = (torch.int16, torch.int32, torch.int64)


def _sentinel(dtype: torch.dtype):
    """A value no init leaves in a buffer (NaN, the most negative integer); 0 where none exists."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    return torch.iinfo(dtype).min if dtype in _CHECKED_INTS else 0


def _unset(t: torch.Tensor) -> bool:
    """Whether ``t`` still holds its sentinel (or is on meta): the model's init did not fill it."""
    if t.is_meta:
        return True
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return bool(torch.isnan(t).any())
    return t.dtype in _CHECKED_INTS and bool((t == torch.iinfo(t.dtype).min).any())


def _restore_buffers(model: nn.Module, folder: Path) -> None:
    """Give the non-persistent buffers (position ids, rotary frequencies), which no state dict
    holds, the values a normal construction gives them, while every parameter is still on meta.

    This is what ``from_pretrained`` does: real (sentinel-filled) CPU buffers, then the model's own
    ``initialize_weights``, whose parameter inits are no-ops on meta. A buffer the init leaves
    unset is an error, never silent garbage.
    """
    places: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in model.named_modules():
        for key, buf in mod._buffers.items():
            if buf is not None and buf.is_meta:
                places.setdefault(id(buf), []).append((f"{mod_name}.{key}".lstrip("."), mod, key))
    if not places:
        return
    metas = {ident: spots[0][1]._buffers[spots[0][2]] for ident, spots in places.items()}
    size = sum(b.numel() * b.element_size() for b in metas.values())
    if size > max(_MAX_BUFFER_BYTES, (folder / WEIGHTS_FILE).stat().st_size):
        raise CompressedFormatError(
            f"{CONFIG_FILE} of {str(folder)!r} asks for {size / 2**20:.0f} MiB of computed buffers, more than the "
            "weights themselves; it was edited."
        )
    init = getattr(model, "initialize_weights", None)
    if not callable(init):
        raise CompressedFormatError(f"{type(model).__name__} has no initialize_weights to re-create its buffers.")
    for ident, spots in places.items():
        value = torch.empty_like(metas[ident], device="cpu").fill_(_sentinel(metas[ident].dtype))
        for _, mod, key in spots:
            mod._buffers[key] = value
    modules = list(model.modules())
    try:
        for mod in modules:
            mod.__dict__.pop("_is_hf_initialized", None)  # initialise every module, as a fresh build does
        init()
    except Exception as exc:  # noqa: BLE001 - the model's own code, driven by the config
        raise CompressedFormatError(f"re-creating the buffers of {str(folder)!r} failed: {exc}.") from exc
    finally:
        for mod in modules:
            mod.__dict__.pop("_is_hf_initialized", None)
    unset = [name for spots in places.values() for name, mod, key in spots if _unset(mod._buffers[key])]
    if unset:
        raise CompressedFormatError(
            f"{type(model).__name__}'s init does not re-create " + _fail_keys("non-persistent buffers", unset) + "."
        )


def load_tokenizer(folder: PathLike):
    """The tokenizer saved in ``folder`` (``AutoTokenizer``), or None when there is none.

    Tokenizers that need custom code are refused (:class:`CompressedFormatError`), never run."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, ImportError, AttributeError) as exc:
        custom = "trust_remote_code" in str(exc) or "auto_map" in _read_text(folder / "tokenizer_config.json")
        why = "it needs custom (remote) code, which gfwsvd never runs" if custom else str(exc)
        raise CompressedFormatError(f"the tokenizer in {str(folder)!r} cannot be loaded: {why}.") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


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


def export_dense(model: nn.Module, folder: PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder with every factorised layer multiplied back.

    Any ``AutoModel*.from_pretrained(folder)`` loads it; outputs equal the factorised model's up
    to float rounding. The gfwsvd block is not written (this is an ordinary dense model). A
    non-empty ``folder`` is refused unless ``overwrite`` (see :func:`save_compressed`).
    """
    folder = Path(folder)
    _check_target(folder, overwrite)
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

    def write(tmp: Path) -> None:
        dense.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _write_folder(folder, overwrite, write)


__all__ = [
    "FORMAT_VERSION", "CompressedFormatError", "save_compressed", "load_compressed", "load_tokenizer",
    "export_dense", "output_root", "resolve_output_folder",
]
