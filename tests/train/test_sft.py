"""SFT: the loss mask is exactly the assistant tokens, packing changes nothing, training learns,
LoRA leaves the base weights alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.llm.chat import IM_END, IM_START, ChatTemplate
from jaxeff.nn import lora
from jaxeff.nn.transformer import Transformer, TransformerConfig
from jaxeff.train import sft

CHAT = ChatTemplate(default_system="Be brief.")
CONVERSATION = [
    {"role": "user", "content": "What is seven plus five?"},
    {"role": "assistant", "content": "Twelve, since 7 + 5 = 12."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": " 24 \n(twenty-four)"},
]


@pytest.fixture(scope="module")
def tokenizer():
    from jaxeff.data.tokenize import train_bpe_tokenizer

    texts = [m["content"] for m in CONVERSATION] * 20 + ["user assistant system Be brief."] * 5
    tok = train_bpe_tokenizer(texts, vocab_size=320)
    tok.add_special_tokens([IM_START, IM_END])
    tok.encode_special_tokens = False  # ChatML markers are single tokens, as in SmolLM2's
    return tok


def _tiny(vocab, seed=0, init_std=0.02):
    # a frozen random embedding of std 0.02 caps the logits near uniform: LoRA tests use more
    cfg = TransformerConfig(
        init_std=init_std, vocab_size=vocab, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32
    )
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _runs(mask):
    """Start and end of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, mask = sft.encode_chat(CONVERSATION, tokenizer, CHAT)
    text = CHAT.format(CONVERSATION, add_generation_prompt=False)
    assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
    runs = _runs(mask)
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for (start, end), content in zip(runs, assistant, strict=True):
        # each masked run is the content followed by <|im_end|>, tokenized on its own
        want = tokenizer.encode(content + IM_END, add_special_tokens=False).ids
        assert ids[start:end].tolist() == want
        # and it is preceded by the assistant header, which is not learned
        header = tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False).ids
        assert ids[start - len(header) : start].tolist() == header
    assert mask.sum() == sum(e - s for s, e in runs)
    with pytest.raises(ValueError, match="at least one assistant message"):
        sft.encode_chat(CONVERSATION[:1], tokenizer, CHAT)


def test_packed_rows_give_each_example_its_own_loss(tokenizer):
    """sft_loss on packed rows == a NumPy loop over each example run alone."""
    model = _tiny(tokenizer.get_vocab_size())
    convs = [CONVERSATION[:2], CONVERSATION, CONVERSATION[2:]]
    examples = sft.encode_all(convs, tokenizer, CHAT)
    lengths = [len(e[0]) for e in examples]
    seq_len = max(lengths) + min(lengths)  # room for two per row
    rows = sft.pack(examples, seq_len)
    assert rows["tokens"].shape == (2, seq_len + 1)
    assert sorted(np.unique(rows["segment_ids"][rows["segment_ids"] > 0]).tolist()) == [1, 2]

    nll_sum, count = 0.0, 0
    for ids, mask in examples:
        logits = np.asarray(model(jnp.asarray(ids[None, :-1]))[0])[0].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                nll_sum -= logp[t, ids[t + 1]]
                count += 1
    graphdef, state = nnx.split(model)
    out = sft.sft_loss(graphdef, state, {k: jnp.asarray(v) for k, v in rows.items()}, None)
    assert float(out.metrics["token_count"]) == count
    np.testing.assert_allclose(float(out.metrics["nll_sum"]), nll_sum, rtol=1e-4)
    with pytest.raises(ValueError, match="more than a row"):
        sft.pack(examples, 8)


def test_lora_finetune_learns_and_keeps_base_weights(tokenizer):
    model = _tiny(tokenizer.get_vocab_size(), init_std=0.3)
    base = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    cfg = sft.SFTConfig(
        method="lora",
        lora=lora.LoRAConfig(rank=4, targets=lora.TARGETS),
        seq_len=192,
        batch_size=2,
        steps=30,
        learning_rate=1e-2,
        warmup_steps=2,
        log_every=10,
        progress=False,
    )
    model, records = sft.finetune(
        model, [CONVERSATION] * 4, tokenizer, CHAT, cfg, eval_conversations=[CONVERSATION]
    )
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 30]
    assert val[-1]["loss"] < 0.5 * val[0]["loss"]
    after = nnx.state(model, nnx.Param)
    for path, value in nnx.to_flat_state(base):
        if "lora" not in str(path[-1]):
            np.testing.assert_array_equal(
                np.asarray(dict(nnx.to_flat_state(after))[path][...]), value[...]
            )


def test_full_finetune_with_any_optax_optimizer_reaches_exact_match(tokenizer):
    conv = [{"role": "user", "content": "seven"}, {"role": "assistant", "content": "Twelve"}]
    model = _tiny(tokenizer.get_vocab_size(), seed=1)
    chat = ChatTemplate(stop_ids=(tokenizer.token_to_id(IM_END),))
    assert sft.exact_match(model, tokenizer, chat, [conv], max_new_tokens=4) == 0.0
    cfg = sft.SFTConfig(method="full", seq_len=64, batch_size=1, steps=40, progress=False)
    model, _ = sft.finetune(model, [conv], tokenizer, chat, cfg, tx=optax.adam(1e-2))
    assert sft.exact_match(model, tokenizer, chat, [conv], max_new_tokens=4) == 1.0
    with pytest.raises(ValueError, match="must end with an assistant message"):
        sft.exact_match(model, tokenizer, chat, [conv[:1]])


def test_bad_sft_config_is_refused():
    with pytest.raises(ValueError, match="allowed: lora, full"):
        sft.SFTConfig(method="qlora")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sft.SFTConfig(steps=0)
