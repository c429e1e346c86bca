"""ampo / strago smoke presets: the JSON contract and run files (a tiny random Llama as task and
optimizer model: plumbing only), and the tasks built from shipped data."""

import json

import pytest

from jaxeff.experiments import prompt_optimization as po

KEYS = {"test_acc_seed", "test_acc_optimized", "llm_calls"}


@pytest.mark.parametrize("name", ["ampo", "strago"])
def test_smoke_contract(name, tmp_path, smollm2):
    cfg = po.get_config("smoke", name)
    out = po.run(cfg, workdir=str(tmp_path), parts=smollm2)  # tokenizer and template reused
    assert KEYS <= set(out)
    assert 0 <= out["test_acc_seed"] <= 1 and 0 <= out["test_acc_optimized"] <= 1
    history = json.load(open(tmp_path / "history.json"))
    assert out["llm_calls"] == history[-1]["llm_calls"] > 0
    assert out["val_scores"] == [h["val_score"] for h in history]
    assert out["val_acc_optimized"] == max(out["val_scores"])
    if name == "strago":
        assert len(out["acr"]) == len(out["bcr"]) == len(history) - 1
    assert (tmp_path / "val_scores.png").stat().st_size > 1000
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert {r["split"] for r in records} == {"val", "test"}


def test_tasks_from_shipped_data():
    from num2words import num2words

    train, val, test, options = po.make_task(po.get_config("cpu"))
    assert len(train) == 24 and len(val) == 24 and len(test) == 48
    assert set(options) == {po.LANGUAGES[x] for x in po.get_config("cpu").languages}
    assert {e.target for e in test} == set(options)
    assert len({e.input for e in train + val + test}) == 96  # no phrase twice
    assert num2words(23, lang="fr") == "vingt-trois"  # the data is num2words' own text
    cfg = po.PromptOptConfig(task="module", n_train=4, n_val=4, n_test=8)
    train, _, _, options = po.make_task(cfg)
    for e in train:
        assert e.target in options and e.target not in e.input
    with pytest.raises(ValueError, match="task='poems'; allowed: language, module"):
        po.make_task(po.PromptOptConfig(task="poems"))
    with pytest.raises(ValueError, match=r"languages \['xx'\] unknown"):
        po.make_task(po.PromptOptConfig(languages=("en", "xx")))
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        po.get_config("gpu")
