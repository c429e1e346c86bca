"""Decode throughput of jaxeff's KV-cache generator on SmolLM2 against Hugging Face.

Both sides load the same GGUF file (SmolLM2-135M-Instruct, Q4_1, dequantized to float32), run
the same prompts with greedy decoding for exactly ``new_tokens`` tokens (no early stop), at
batch 1 and batch 8 (left padding), after one warm-up call; each side is timed over
``repeats`` calls in the same process and the median is used. HF runs `transformers` on CPU
torch.

    jaxeff run generate-bench          # JSON: jaxeff_tok_s, hf_tok_s ({"b1", "b8"}),
                                       #       ratio_b1, ratio_b8, same_greedy_b1

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


def get_config(preset: str) -> GenerateBenchConfig:
    if preset == "smoke":
        return GenerateBenchConfig(batch_sizes=(1, 2), new_tokens=4, repeats=1)
    if preset == "cpu":
        return GenerateBenchConfig(new_tokens=32)
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


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

    import torch

    from jaxeff.bench import median_time
    from jaxeff.infer.generate import Generator
    from jaxeff.llm.gguf import load_gguf, smollm2_path

    del workdir, resume
    if max(cfg.batch_sizes) > len(PROMPTS):
        raise ValueError(f"batch_sizes must be <= {len(PROMPTS)} (the number of prompts)")
    path = cfg.model_path or smollm2_path()
    model, tokenizer, _ = load_gguf(path)
    gen = Generator(model, bucket=cfg.bucket)
    if cfg.hf_threads:
        torch.set_num_threads(cfg.hf_threads)
    hf, hf_tok = _hf_model(path)
    out = {"jaxeff_tok_s": {}, "hf_tok_s": {}}
    for b in cfg.batch_sizes:
        prompts = list(PROMPTS[:b])
        ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]

        def jaxeff_call(ids=ids):
            return gen.generate(ids, cfg.new_tokens)

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
        tokens = b * cfg.new_tokens
        out["jaxeff_tok_s"][f"b{b}"] = tokens / median_time(jaxeff_call, cfg.repeats)
        out["hf_tok_s"][f"b{b}"] = tokens / median_time(hf_call, cfg.repeats)
        ratio = out["jaxeff_tok_s"][f"b{b}"] / out["hf_tok_s"][f"b{b}"]
        out[f"ratio_b{b}"] = ratio
        sys.stderr.write(
            f"batch {b}: jaxeff {out['jaxeff_tok_s'][f'b{b}']:.1f} tok/s, "
            f"HF {out['hf_tok_s'][f'b{b}']:.1f} tok/s, ratio {ratio:.2f}\n"
        )
    out["new_tokens"] = cfg.new_tokens
    out["torch_threads"] = torch.get_num_threads()
    return out


EXPERIMENTS = {
    "generate-bench": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__),
}
