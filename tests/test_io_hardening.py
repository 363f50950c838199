"""The loader validates before it allocates, and saving never leaves a mixed folder behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gfwsvd_core.errors import GfwsvdUserError, OutputPathError
from gfwsvd_core.io import (
    CompressedFormatError,
    export_dense,
    load_compressed,
    output_root,
    resolve_output_folder,
    save_compressed,
)
from gfwsvd_core.meter import measure
from test_io import _compress, _output
from tiny_models import tokenizer

MiB = 2**20


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hard-io") / "bert"
    save_compressed(_compress("bert"), folder, tokenizer=tokenizer(), method="svd")
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, edit) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _edit_tensors(folder: Path, edit) -> Path:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _inflate(cfg):
    cfg.update(vocab_size=4_000_000, intermediate_size=200_000)  # ~ 3.5 GiB of float32 if built


def _huge_rank(cfg):
    name = next(iter(cfg["gfwsvd"]["ranks"]))
    cfg["gfwsvd"]["ranks"][name] = 2_000_000


def _int64(tensors):
    key = next(k for k in tensors if k.endswith("down.weight"))
    tensors[key] = tensors[key].to(torch.int64)


def _float64(tensors):
    key = next(k for k in tensors if k.endswith("down.weight"))
    tensors[key] = tensors[key].double()


@pytest.mark.parametrize("damage, fragment", [
    (("config", _inflate), "wrong shape"),
    (("config", _huge_rank), "a rank must be at most"),
    (("tensors", _int64), "needs a floating dtype"),
    (("tensors", _float64), "mixes floating dtypes"),
])
def test_rejected_folders_cost_almost_no_memory(saved, tmp_path, damage, fragment):
    where, edit = damage
    bad = _copy(saved, tmp_path / "bad")
    (_edit_config if where == "config" else _edit_tensors)(bad, edit)
    with measure() as rec:
        with pytest.raises(CompressedFormatError, match=fragment):
            load_compressed(bad)
    assert rec.scope == "stage"
    assert rec.cpu_peak_extra_mb < 50, rec  # before the fix: +773 MiB (inflated), +484 MiB (rank)


def test_compressed_format_error_is_a_user_error():
    assert issubclass(CompressedFormatError, GfwsvdUserError)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_meta_skeleton_restores_non_persistent_buffers(kind, tmp_path):
    """Position ids (BERT), rotary frequencies (LLaMA) are not saved: they must equal a fresh build."""
    model = _compress(kind)
    save_compressed(model, tmp_path / kind)
    loaded = load_compressed(tmp_path / kind)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    ref_buffers = dict(model.named_buffers())
    for name, buf in loaded.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=0, atol=0)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_output(loaded, ids), _output(model, ids))


def test_save_refuses_a_non_empty_folder(tmp_path):
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="is not empty"):
        save_compressed(_compress("gpt2"), target)
    assert (target / "notes.txt").read_text() == "mine" and len(list(target.iterdir())) == 1


def test_overwrite_replaces_the_whole_folder_without_stale_files(tmp_path):
    """Before: two files were overwritten and an old tokenizer/generation config stayed and was read."""
    target = tmp_path / "model"
    save_compressed(_compress("gpt2"), target, tokenizer=tokenizer())
    assert (target / "tokenizer.json").is_file() and (target / "generation_config.json").is_file()
    save_compressed(_compress("bert"), target, overwrite=True)  # no tokenizer, no generation config
    names = sorted(p.name for p in target.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    assert type(load_compressed(target)).__name__ == "BertModel"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary siblings left


def test_a_failed_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    target = tmp_path / "model"
    save_compressed(_compress("gpt2"), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OutputPathError, match="No space left"):
        save_compressed(_compress("bert"), target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_dense_refuses_a_non_empty_folder(tmp_path):
    target = tmp_path / "dense"
    target.mkdir()
    (target / "x").write_text("1")
    with pytest.raises(OutputPathError):
        export_dense(_compress("gpt2"), target)
    export_dense(_compress("gpt2"), target, overwrite=True)
    assert not (target / "x").exists() and (target / "config.json").is_file()


def test_output_folders_stay_inside_the_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    monkeypatch.setenv("GFWSVD_OUTPUT_ROOT", str(root))
    assert output_root() == root.resolve()
    assert resolve_output_folder("run-1") == root.resolve() / "run-1"
    assert resolve_output_folder(str(root / "a" / "b")) == root.resolve() / "a" / "b"
    for bad in ("../elsewhere", str(tmp_path / "elsewhere"), "/etc", "a/../../x", ""):
        with pytest.raises(OutputPathError):
            resolve_output_folder(bad)
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink out of the root is outside too
    with pytest.raises(OutputPathError, match="outside the output root"):
        resolve_output_folder("link/x")


def test_default_root_is_gfwsvd_out_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GFWSVD_OUTPUT_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert output_root() == (tmp_path / "gfwsvd-out").resolve()
