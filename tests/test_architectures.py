"""More architecture families, each with a quirk peftko must not depend on: fused qkv (Phi-3),
scaled embeddings (Gemma 2), Conv1D layers and n_positions (GPT-2), learned positions (OPT),
multi-query attention (Falcon). Train 2 steps in 4-bit, merge, reload with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftko.cli import main
from peftko.model.tiny_base import train_tokenizer
from tests.conftest import train_args

ARCHS = {
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2, "tie_word_embeddings": False, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "falcon": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True}),
}


def build(name: str, tok, folder):
    cls, extra = ARCHS[name]
    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 512}
    config = getattr(transformers, cls)(**ids, **({} if name == "gpt2" else sizes), **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


pytestmark = pytest.mark.slow  # a base of each architecture built, trained, merged and reloaded


@pytest.fixture(scope="module")
def tokenizer(base_texts):
    return train_tokenizer(base_texts)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_train_merge_reload(name, tokenizer, small_corpus, tmp_path):
    base = build(name, tokenizer, tmp_path / "base")
    run, merged = tmp_path / "run", tmp_path / "merged"
    r = CliRunner().invoke(main, train_args(base, small_corpus, run, "--quant", "4bit", "--max-steps", "2"))
    assert r.exit_code == 0, r.output + repr(r.exception)
    r = CliRunner().invoke(main, ["merge", str(run), "--output", str(merged), "--dtype", "float32"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    manifest = json.loads((run / "peftko.json").read_text())
    tok = AutoTokenizer.from_pretrained(merged)
    text = "".join(m["marker"] + "가나다" for m in manifest["markers"])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= manifest["vocab"]["tokenizer_before"]] == [m["id"] for m in manifest["markers"]]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.shape[0] == manifest["vocab"]["rows_after"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([ids])).logits).all()
