"""Decoders in low precision: statistics and factors in float32/float64 whatever the model's
dtype, compressed weights cast back to it, export and reload exact in that dtype."""

import pytest
import torch

import tiny_models
from gfwsvd_core import pipeline
from gfwsvd_core.errors import ConfigurationError
from gfwsvd_core.factorized import LowRankLinear
from gfwsvd_core.io import load_compressed, save_compressed


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


@pytest.mark.parametrize("make", [tiny_models.tiny_gpt2, tiny_models.tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_decoder_round_trips_exactly(tmp_path, make, dtype):
    folder = tiny_models.save_tiny(make(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), samples=8, eval_samples=4, max_length=24, batch_size=4, device="cpu",
                           dtype=dtype)
    want = pipeline.DTYPES[dtype]
    assert next(exp.model.parameters()).dtype == want and exp.data_record()["dtype"] == dtype
    pipeline.collect(exp, ["gfwsvd", "svdllm"])
    s = exp.stats[exp.layers[0]]
    kept = [t for t in (s.X, s.D, s.G) if t is not None]
    assert kept and all(t.dtype == torch.float32 for t in kept)  # samples in float32
    assert s.xx_sum.dtype == s.dd_sum.dtype == torch.float64  # moments in float64
    for method in ("gfwsvd", "svdllm[update=true]"):
        comp, rep = pipeline.run_compression(exp, method, ratio=0.5)
        assert all(torch.isfinite(torch.tensor(v)) for v in rep["metrics"].values()), rep["metrics"]
        low = [m for m in comp.model.modules() if isinstance(m, LowRankLinear)]
        assert low and all(m.up.weight.dtype == m.down.weight.dtype == want for m in low)
        out = save_compressed(comp.model, tmp_path / method, tokenizer=exp.bundle.tokenizer, method=comp.method)
        loaded = load_compressed(out)
        assert {p.dtype for p in loaded.parameters()} == {want}
        ids = exp.eval_batches[0]["input_ids"]
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, comp.model(input_ids=ids).logits)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="unknown dtype 'int8'; valid: float32, bfloat16, float16"):
        pipeline.prepare(dtype="int8")


def test_packed_causal_lm_windows_have_no_padding(tmp_path):
    from gfwsvd_core.tasks import TASKS, get_task

    assert "causal-lm-packed" in TASKS
    folder = tiny_models.save_tiny(tiny_models.tiny_gpt2(), tmp_path / "model")
    exp = pipeline.prepare(model=str(folder), task="causal-lm-packed", samples=12, eval_samples=6, max_length=16,
                           batch_size=2, device="cpu", dtype="bfloat16")
    for b in exp.calib_batches + exp.eval_batches:
        assert b["input_ids"].shape[1] == 16 and bool(b["attention_mask"].all())
        assert torch.equal(b["labels"], b["input_ids"])
    # the windows are the joined token stream, cut in order
    tok, task = exp.bundle.tokenizer, get_task("causal-lm-packed")
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id  # the separator between texts
    stream = []
    for t in exp.calib.texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [sep]
    got = torch.cat([b["input_ids"] for b in exp.calib_batches]).flatten().tolist()
    assert got == stream[: len(got)] and len(stream) - len(got) < 16
    pipeline.collect(exp, ["kfac"])
    comp, rep = pipeline.run_compression(exp, "kfac", ratio=0.5)
    assert rep["metrics"]["perplexity"] > 1 and rep["task"] == "causal-lm-packed"
    with pytest.raises(Exception, match="fewer than one window"):
        task.make_batches(tok, ["a b"], max_length=512)
