"""`jaxeff generate` on the command line: SmolLM2's greedy completion equals HF's."""

import subprocess
import sys

import pytest

from jaxeff.parallel.multiprocess import cpu_child_env


@pytest.mark.interop
def test_jaxeff_generate_matches_hf_greedy_and_names_paris(
    hf_model, hf_tokenizer, torch_one_thread
):
    import torch

    prompt = "The capital of France is"
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, "generate", prompt, "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
        timeout=600,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ours = out.stdout.rstrip("\n")
    enc = hf_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ids = hf_model.generate(**enc, max_new_tokens=12, do_sample=False)
    theirs = hf_tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == theirs
    assert "Paris" in ours


def test_generate_with_a_missing_model_file_is_one_line_exit_2(tmp_path):
    code = "import sys; from jaxeff.cli import main; sys.exit(main(sys.argv[1:]))"
    missing = str(tmp_path / "nope.gguf")
    out = subprocess.run(
        [sys.executable, "-c", code, "generate", "hi", "--model", missing],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.gguf" in lines[0] and "does not exist" in lines[0]
