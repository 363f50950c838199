"""The loader never runs custom code, re-creates buffers exactly or fails, and saving never
deletes what another writer put into the target meanwhile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn.modules import module as torch_module

import gfwsvd_core.io as gio
from gfwsvd_core.errors import OutputPathError
from gfwsvd_core.io import CompressedFormatError, load_compressed, load_tokenizer, resolve_output_folder, save_compressed
from test_io import _compress, _output
from tiny_models import VOCAB, tiny_bert, tiny_llama

MARKER_CODE = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('custom code ran')\n"


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    return save_compressed(_compress("bert"), tmp_path_factory.mktemp("safety") / "bert")


def _copy_with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _custom_type(cfg):
    cfg.update(model_type="my_custom", auto_map={"AutoModel": "modeling_my.MyModel"})
    cfg["gfwsvd"]["model_class"] = "MyModel"


def _custom_class(cfg):
    cfg["auto_map"] = {"AutoModel": "modeling_my.MyBertModel"}
    cfg["gfwsvd"]["model_class"] = "MyBertModel"


@pytest.mark.parametrize("edit, fragment", [
    (_custom_type, "unknown model_type 'my_custom'.*auto_map.*never runs custom"),
    (_custom_class, "not a built-in transformers model class.*auto_map.*never runs custom"),
])
def test_config_needing_custom_code_is_refused_without_running_it(saved_bert, tmp_path, edit, fragment):
    folder = _copy_with_config(saved_bert, tmp_path / "custom", edit)
    (folder / "modeling_my.py").write_text(MARKER_CODE)
    with pytest.raises(CompressedFormatError, match=fragment):
        load_compressed(folder)
    assert not (folder / "RAN").exists()


def test_tokenizer_needing_custom_code_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "MyTokenizer", "auto_map": {"AutoTokenizer": ["tok_my.MyTokenizer", None]}}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (folder / "tok_my.py").write_text(MARKER_CODE)
    with pytest.raises(CompressedFormatError, match="custom \\(remote\\) code, which gfwsvd never runs"):
        load_tokenizer(folder)
    assert not (folder / "RAN").exists()


def test_a_tensor_left_on_meta_is_an_error(saved_bert, monkeypatch):
    monkeypatch.setattr(gio, "_restore_buffers", lambda *args, **kwargs: None)
    with pytest.raises(CompressedFormatError, match="tensors without values: 'embeddings.position_ids'"):
        load_compressed(saved_bert)


def test_a_buffer_the_init_does_not_recreate_is_an_error(saved_bert, monkeypatch):
    from transformers.models.bert import modeling_bert

    monkeypatch.setattr(modeling_bert.BertPreTrainedModel, "_init_weights", lambda self, module: None)
    with pytest.raises(CompressedFormatError, match="does not re-create 2 non-persistent buffers: 'embeddings.position_ids'"):
        load_compressed(saved_bert)


def test_rope_scaling_buffers_equal_a_fresh_build(tmp_path):
    """Rotary frequencies depend on the rope parameters: they must come from the model's own init."""
    model = tiny_llama()
    model.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    model = type(model)(model.config).eval()
    loaded = load_compressed(save_compressed(model, tmp_path / "rope"))
    for name, buf in model.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buf), name
    assert not any("_is_hf_initialized" in m.__dict__ for m in loaded.modules())
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_output(loaded, ids), _output(model, ids))


def test_inflated_layer_count_stops_early_and_the_budget_ends_with_the_load(saved_bert, tmp_path):
    folder = _copy_with_config(saved_bert, tmp_path / "layers", lambda c: c.update(num_hidden_layers=50_000))
    with pytest.raises(CompressedFormatError, match="more than \\d+ tensors, far more than model.safetensors holds"):
        load_compressed(folder)
    hooks = len(torch_module._global_parameter_registration_hooks)
    assert len(load_compressed(saved_bert).encoder.layer) == 2  # the budget fits a real model
    assert len(torch_module._global_parameter_registration_hooks) == hooks  # installed once, never re-added
    assert len(tiny_bert(layers=100).encoder.layer) == 100  # ~1600 tensors: builds outside a load are not limited


def test_file_changed_between_header_and_read_is_an_error(saved_bert, monkeypatch):
    real = gio._read_tensors

    def swapped(folder):
        tensors = real(folder)
        key = next(iter(tensors))
        tensors[key] = tensors[key].double()
        return tensors

    monkeypatch.setattr(gio, "_read_tensors", swapped)
    with pytest.raises(CompressedFormatError, match="changed while it was being loaded"):
        load_compressed(saved_bert)


def test_constructor_errors_are_format_errors(saved_bert, tmp_path):
    folder = _copy_with_config(saved_bert, tmp_path / "heads", lambda c: c.update(num_attention_heads=5))
    with pytest.raises(CompressedFormatError):
        load_compressed(folder)


def test_save_keeps_what_another_writer_put_into_the_target_meanwhile(tmp_path):
    target = tmp_path / "out"

    class Intruder:  # a tokenizer whose save fills the target folder, as a concurrent writer would
        def save_pretrained(self, where):
            target.mkdir(exist_ok=True)
            (target / "theirs.txt").write_text("keep me")
            Path(where, "tokenizer.json").write_text("{}")

    with pytest.raises(OutputPathError, match="is not empty"):
        save_compressed(_compress("gpt2"), target, tokenizer=Intruder())
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temporary sibling is gone


def test_no_path_is_an_output_path_error(tmp_path):
    for empty in (None, "", "   "):
        with pytest.raises(OutputPathError):
            resolve_output_folder(empty, root=tmp_path)
