"""Decode throughput of jaxeff's KV-cache generator on SmolLM2 against Hugging Face.

Both sides load the same GGUF file (SmolLM2-135M-Instruct, Q4_1, dequantized to float32), run
the same prompts with greedy decoding for exactly ``new_tokens`` tokens (no early stop), at
batch 1 and batch 8 (left padding), after one warm-up call; each side is timed over
``repeats`` calls in the same process and the median is used. HF runs `transformers` on CPU
torch.

    jaxeff run generate-bench          # JSON: jaxeff_tok_s, hf_tok_s ({"b1", "b8"}),
                                       #       ratio_b1, ratio_b8, same_greedy_b1, engine
    jaxeff run generate-bench --preset gpu   # ~1 min on one H100/H200: random SmolLM2-135M, bf16
    jaxeff run generate-bench --preset tpu   # the same on one TPU chip

The ``gpu`` and ``tpu`` presets need no GGUF file and no HF: a randomly initialised model of
SmolLM2-135M's shape (``random_init``; `TransformerConfig.smollm2_135m`) computing in bfloat16
decodes ``new_tokens`` = 256 tokens after prompts of ``prompt_len`` = 2048 random ids (so the
KV cache holds 2304 slots) at batch 1 and 8, with no stop id; ``hf_tok_s`` is None and the
ratios are left out. Four compiles (prefill and decode per batch) take most of the minute.
`lowerable_step` lowers its decode step without the hardware.

jaxeff decodes with ``Generator(loop=cfg.loop)``: ``"device"`` (default; the decode loop is one
compiled ``lax.while_loop``, one host sync per request) or ``"host"`` (one compiled step per
token from Python); ``engine`` in the JSON names it.

Goal: ratios >= 2. A decode step streams every float32 weight once per token, so batch 1 is
bound by memory bandwidth; jaxeff's step is one compiled program with the KV cache donated
(updated in place), while HF dispatches ~30 layers of eager torch ops per token.
"""

from __future__ import annotations

import dataclasses

from jaxeff.experiment import Experiment

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers:",
    "The quick brown fox",
    "In 1969, the first humans",
    "Translate to French: I like apples.",
)


@dataclasses.dataclass(frozen=True)
class GenerateBenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 64
    repeats: int = 3
    model_path: str | None = None
    bucket: int = 32
    hf_threads: int = 0  # torch threads for HF (0: torch's default)
    # True: random weights of SmolLM2-135M's shape and random prompts of prompt_len ids, no
    # GGUF file, no tokenizer, no stop id (needs hf=False)
    random_init: bool = False
    prompt_len: int = 2048  # prompt ids per row with random_init (PROMPTS are used otherwise)
    hf: bool = True  # time Hugging Face on the same GGUF too
    dtype: str = "float32"  # compute dtype of the jaxeff model (parameters stay float32)
    seed: int = 0
    loop: str = "device"  # Generator's decode loop: "device" (lax.while_loop) or "host"


def get_config(preset: str) -> GenerateBenchConfig:
    if preset == "smoke":
        return GenerateBenchConfig(batch_sizes=(1, 2), new_tokens=4, repeats=1)
    if preset == "cpu":
        return GenerateBenchConfig(new_tokens=32)
    if preset in ("gpu", "tpu"):
        return GenerateBenchConfig(
            batch_sizes=(1, 8),
            new_tokens=256,
            repeats=3,
            bucket=128,
            random_init=True,
            prompt_len=2048,
            hf=False,
            dtype="bfloat16",
        )
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu, gpu, tpu")


def _check(cfg: GenerateBenchConfig) -> None:
    from jaxeff.nn.config import DTYPES

    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}; allowed: {', '.join(DTYPES)}")
    if cfg.loop not in ("device", "host"):
        raise ValueError(f"loop={cfg.loop!r}; allowed: device, host")
    if cfg.random_init and cfg.hf:
        raise ValueError("random_init=True needs hf=False (HF loads the GGUF's weights)")
    if cfg.random_init and cfg.prompt_len < 1:
        raise ValueError(f"prompt_len={cfg.prompt_len} must be >= 1 with random_init")
    if not cfg.random_init and max(cfg.batch_sizes) > len(PROMPTS):
        raise ValueError(f"batch_sizes must be <= {len(PROMPTS)} (the number of prompts)")


def _random_model(cfg: GenerateBenchConfig):
    from flax import nnx

    from jaxeff.nn.config import TransformerConfig
    from jaxeff.nn.transformer import Transformer

    mcfg = TransformerConfig.smollm2_135m(dtype=cfg.dtype)
    return Transformer(mcfg, rngs=nnx.Rngs(cfg.seed))


def lowerable_step(cfg: GenerateBenchConfig):
    """``(fn, abstract_args)``: the greedy one-token decode step that generate-bench times (the
    per-layer model `jaxeff.infer.generate.Generator` decodes with) at the largest batch, into a
    KV cache of the prompt + ``new_tokens`` slots (bucketed as `Generator` does), with
    ``jax.ShapeDtypeStruct`` weights, cache and inputs. Random init only: a GGUF's shape would
    need the file."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.infer.generate import Generator, batch_bucket, round_up

    _check(cfg)
    if not cfg.random_init:
        raise ValueError("lowerable_step needs random_init=True (the gpu / tpu presets)")
    model = nnx.eval_shape(lambda: _random_model(cfg).unstacked())
    gen = Generator(model, bucket=cfg.bucket)
    rows = batch_bucket(max(cfg.batch_sizes))
    cache_len = round_up(cfg.prompt_len, cfg.bucket) + round_up(cfg.new_tokens, cfg.bucket)
    cache = jax.eval_shape(lambda: model.init_cache(rows, cache_len))
    step = jax.jit(functools.partial(gen._step, mode="greedy"), donate_argnums=(1,))
    ids = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return step, (gen._weights, cache, ids, ids, key, scalar, scalar)


def _hf_model(path: str):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    import torch

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def run(cfg: GenerateBenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import sys

    from jaxeff.bench import median_time
    from jaxeff.infer.generate import Generator

    del workdir, resume
    _check(cfg)
    if cfg.random_init:
        import numpy as np

        model = _random_model(cfg)
        rng = np.random.default_rng(cfg.seed)
        random_ids = rng.integers(0, model.cfg.vocab_size, (max(cfg.batch_sizes), cfg.prompt_len))
    else:
        from jaxeff.llm.gguf import load_gguf, smollm2_path

        path = cfg.model_path or smollm2_path()
        model, tokenizer, _ = load_gguf(path, dtype=cfg.dtype)
    gen = Generator(model, bucket=cfg.bucket, loop=cfg.loop)
    if cfg.hf:
        import torch

        if cfg.hf_threads:
            torch.set_num_threads(cfg.hf_threads)
        hf, hf_tok = _hf_model(path)
    out = {"jaxeff_tok_s": {}, "hf_tok_s": {} if cfg.hf else None}
    for b in cfg.batch_sizes:
        if cfg.random_init:
            ids = [row.tolist() for row in random_ids[:b]]
        else:
            prompts = list(PROMPTS[:b])
            ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]

        def jaxeff_call(ids=ids):
            return gen.generate(ids, cfg.new_tokens)

        tokens = b * cfg.new_tokens
        if not cfg.hf:
            jaxeff_call()  # warm-up: compiles prefill and decode for this bucket
            out["jaxeff_tok_s"][f"b{b}"] = tokens / median_time(jaxeff_call, cfg.repeats)
            sys.stderr.write(f"batch {b}: jaxeff {out['jaxeff_tok_s'][f'b{b}']:.1f} tok/s\n")
            continue

        enc = hf_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

        def hf_call(enc=enc):
            with torch.inference_mode():
                return hf.generate(
                    **enc,
                    max_new_tokens=cfg.new_tokens,
                    min_new_tokens=cfg.new_tokens,
                    do_sample=False,
                    pad_token_id=hf_tok.pad_token_id,
                )

        ours = jaxeff_call()  # warm-up: compiles prefill and decode for this bucket
        theirs = hf_call()
        if b == 1:
            # HF's min_new_tokens bans EOS while ours decodes through it: compare up to it
            prompt_len = enc["input_ids"].shape[1]
            hf_ids = theirs[0, prompt_len:].tolist()
            eos = hf_tok.eos_token_id
            end = ours[0].index(eos) if eos in ours[0] else len(ours[0])
            out["same_greedy_b1"] = ours[0][:end] == hf_ids[:end]
            out["greedy_tokens_compared"] = end
        out["jaxeff_tok_s"][f"b{b}"] = tokens / median_time(jaxeff_call, cfg.repeats)
        out["hf_tok_s"][f"b{b}"] = tokens / median_time(hf_call, cfg.repeats)
        ratio = out["jaxeff_tok_s"][f"b{b}"] / out["hf_tok_s"][f"b{b}"]
        out[f"ratio_b{b}"] = ratio
        sys.stderr.write(
            f"batch {b}: jaxeff {out['jaxeff_tok_s'][f'b{b}']:.1f} tok/s, "
            f"HF {out['hf_tok_s'][f'b{b}']:.1f} tok/s, ratio {ratio:.2f}\n"
        )
    out["new_tokens"] = cfg.new_tokens
    out["engine"] = {"generator": "jaxeff.infer.generate.Generator", "loop": cfg.loop}
    out["dtype"] = cfg.dtype
    out["random_init"] = cfg.random_init
    if cfg.random_init:
        out["prompt_len"] = cfg.prompt_len
    out["torch_threads"] = torch.get_num_threads() if cfg.hf else None
    return out


EXPERIMENTS = {
    "generate-bench": Experiment(
        get_config,
        run,
        presets=("smoke", "cpu", "gpu", "tpu"),
        doc=__doc__,
        lowerable=lowerable_step,
    ),
}
