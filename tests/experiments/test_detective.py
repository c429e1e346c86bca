"""detective smoke preset on SmolLM2 (the session fixture): the JSON contract, answers re-scored
from the saved replies, the one-pass letter scorer against `LocalBackend.score_options`, and the
item sources."""

import dataclasses
import json

import numpy as np
import pytest

from jaxeff.data import detective as det
from jaxeff.evals import detectbench as db
from jaxeff.experiments import detective as exp


@pytest.fixture(scope="module")
def backend(smollm2):
    from jaxeff.llm.backends import LocalBackend

    return LocalBackend(smollm2, bucket=256, max_batch=4)


def test_letter_scores_equal_score_options(backend):
    convs = [exp.messages(item, "detective") for item in db.SAMPLE_ITEMS[:2]]
    prefixes = ["", "Flour was found on the study door handle. Only the cook had flour."]
    # two rows of one 256 bucket: the shape the smoke run compiles too
    ours = exp.letter_logprobs(backend, convs, prefixes, [4] * 2, bucket=256)
    for conv, prefix, mine in zip(convs, prefixes, ours, strict=True):
        ref = backend.score_options(conv, exp.answer_continuations(prefix, 4))
        # the options share everything but the letter: differences between options agree
        np.testing.assert_allclose(np.subtract(mine, mine[0]), np.subtract(ref, ref[0]), atol=2e-3)
        assert all(v < 0 for v in mine)
    # option texts: the same teacher-forced sum as score_options on the written-out replies
    item = db.SAMPLE_ITEMS[0]
    text = exp.text_logprobs(backend, convs[:1], [""], [item.options])[0]
    ref = backend.score_options(convs[0], [f"Answer: {o}" for o in item.options])
    np.testing.assert_allclose(text, ref, atol=1e-4)


def test_detective_smoke_contract_on_a_user_file(backend, tmp_path):
    # two items (one self-written, one generated): the smoke's letter rows match the shape
    # compiled above, and every SmolLM2 pass is half the work of four rows
    items = [db.SAMPLE_ITEMS[0], det.make_puzzle(7)]
    path = tmp_path / "dev.jsonl"
    db.write_jsonl(items, path)
    cfg = dataclasses.replace(exp.get_config("smoke"), data_path=str(path))
    out = exp.run(cfg, workdir=str(tmp_path / "run"), backend=backend)
    assert {"acc_plain", "acc_detective", "evidence_overlap", "n"} <= set(out)
    assert out["n"] == len(items) and out["dataset"] == "detectbench"
    rows = [json.loads(x) for x in open(tmp_path / "run" / "replies.jsonl")]
    assert len(rows) == 2 * len(items)
    for cond, key in (("plain", "acc_plain"), ("detective", "acc_detective")):
        mine = [r for r in rows if r["condition"] == cond]
        assert [r["id"] for r in mine] == [it.id for it in items]
        hits = [int(np.argmax(r["scores"])) == r["answer"] for r in mine]
        assert out[key] == sum(hits) / len(hits)
        by_text = [int(np.argmax(r["text_scores"])) == r["answer"] for r in mine]
        assert out["acc_text"][cond] == sum(by_text) / len(by_text)
        parsed = [
            db.parse_answer(r["reply"], it.options) for r, it in zip(mine, items, strict=True)
        ]
        assert out["unparsed"][cond] == sum(p is None for p in parsed)
        assert 0.0 <= out["evidence_overlap"][cond] <= 1.0
    plain, detective = ([r for r in rows if r["condition"] == c] for c in exp.CONDITIONS)
    wins = sum(
        np.argmax(d["scores"]) == d["answer"] != np.argmax(p["scores"])
        for p, d in zip(plain, detective, strict=True)
    )
    assert out["detective_wins"] == wins


def test_items_default_to_samples_and_generated_and_bad_files_name_the_line(tmp_path):
    cfg = dataclasses.replace(exp.get_config("smoke"), generated=5)
    name, items, sources = exp.load_items(cfg)
    assert name == "builtin" and len(items) == len(db.SAMPLE_ITEMS) + 5
    assert sources.count("samples") == len(db.SAMPLE_ITEMS) and sources[-1] == "generated"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(db.SAMPLE_ITEMS[0].to_record()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        exp.load_items(dataclasses.replace(cfg, data_path=str(bad)))
    with pytest.raises(ValueError, match="unknown preset 'gpu'; allowed: smoke, cpu"):
        exp.get_config("gpu")
