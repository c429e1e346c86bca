"""Exported safetensors load in HF transformers as Llama with jaxeff's logits, and in jaxeff."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff.llm import hf
from jaxeff.nn import lora
from jaxeff.nn.transformer import Transformer, TransformerConfig

TOKENS = (jnp.arange(13) * 7 % 96)[None]


def _model(tie: bool):
    cfg = TransformerConfig(
        vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
        rope_base=1e5, norm_eps=1e-5, tie_embeddings=tie, init_std=0.2,
    )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _with_adapters(model):
    lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=("q", "k", "o", "up")))
    state = lora.lora_state(model)
    nnx.update(model, jax.tree.map(lambda a: a + 0.1, state))
    return model


@pytest.mark.interop
@pytest.mark.parametrize("tie", [True, False])
def test_exported_llama_loads_in_transformers_with_the_same_logits(tmp_path, tie, torch_one_thread):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = _with_adapters(_model(tie))
    ours = np.asarray(model(TOKENS)[0])
    hf.save_llama(model, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    theirs_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert isinstance(theirs_model, LlamaForCausalLM)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    back = hf.load_llama(str(tmp_path))
    assert back.cfg == dataclasses.replace(model.cfg, init_std=back.cfg.init_std)
    np.testing.assert_allclose(np.asarray(back(TOKENS)[0]), ours, atol=1e-5, rtol=0)


@pytest.mark.interop
def test_exported_tokenizer_and_chat_template_load_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    from jaxeff.data.tokenize import train_bpe_tokenizer
    from jaxeff.llm.chat import IM_END, IM_START, ChatTemplate

    tok = train_bpe_tokenizer(["the cook did it with flour"] * 5, vocab_size=300)
    tok.add_special_tokens([IM_START, IM_END])
    tok.encode_special_tokens = False
    end = tok.token_to_id(IM_END)
    chat = ChatTemplate(stop_ids=(end,), eos_id=end)
    hf.save_llama(_model(True), str(tmp_path), tokenizer=tok, chat=chat)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "who did it"}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat.format(messages)
    assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids
    assert theirs.eos_token == IM_END


def test_load_llama_rejects_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        hf.load_llama(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model_type='gpt2'; allowed: 'llama'"):
        hf.load_llama(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config(_model(True).cfg)))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        hf.load_llama(str(tmp_path))
