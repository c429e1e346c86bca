"""Vript-Hard scorers against hand-computed scores on small CSVs, CSV errors, and the default
tagger and MiniLM embedder (the embedder against HF transformers' BertModel)."""

import numpy as np
import pytest

from jaxeff.evals import vript


def write(tmp_path, text, name="pred.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------- RR


def test_rr_first_choice_wins_and_missing_predictions_are_skipped(tmp_path):
    path = write(
        tmp_path,
        "id,pred,gt\n"
        'v1,"(B) because the man waves",(B)\n'  # right
        'v2,"Either (A) or (C)","The answer is (C)"\n'  # first choice (A): wrong
        "v3,I am not sure,(D)\n"  # no choice: wrong, still counted
        "v4,,(A)\n"  # empty: skipped
        "v5,NA,(A)\n",  # pandas NA string: skipped
    )
    out = vript.score_csv(path, "RR")
    assert out["counted"] == 3 and out["correct"] == 1
    assert out["acc"] == pytest.approx(1 / 3)
    assert out["per_row"] == {"v1": True, "v2": False, "v3": False}


def test_rr_ground_truth_from_a_mapping(tmp_path):
    path = write(tmp_path, "id,pred\na,Answer: (C)\nb,(A)\n")
    out = vript.score_csv(path, "RR", gts={"a": "C", "b": "(B) a red car"})
    assert out["per_row"] == {"a": True, "b": False}
    with pytest.raises(ValueError, match=r"line 3: RR row id 'b' has no gt"):
        vript.score_csv(path, "RR", gts={"a": "C"})


# --------------------------------------------------------------------------------------- ERO


def test_ero_at_k_with_the_official_fallback_quirk(tmp_path):
    path = write(
        tmp_path,
        "id,pred,gt\n"
        'a,"Scene (C) -> Scene (A) -> Scene (B)",CAB\n'  # 3 positions right
        # fewer than three 'Scene (X)': the first capitals T, C, A are read: 0 right
        'b,"The order is C, A, B",CAB\n'
        # two 'Scene (X)' only: capitals S, B, S: 0 right although B, A, C was meant
        'c,"Scene (B) then Scene (A), C last",BAC\n'
        'd,"B C A",BAC\n'  # B right, C and A swapped: 1 right
        'e,"Scene (A)\nScene (C)oncludes. Scene (B)",(A)(C)(B)\n'  # capitals of gt: A C B
        "f,,ABC\n",  # skipped
    )
    out = vript.score_csv(path, "ERO")
    assert out["per_row"] == {"a": 3, "b": 0, "c": 0, "d": 1, "e": 3}
    assert out["counted"] == 5
    assert out["acc@1"] == pytest.approx(3 / 5)
    assert out["acc@2"] == pytest.approx(2 / 5)
    assert out["acc@3"] == pytest.approx(2 / 5)


def test_ero_ground_truth_list_and_bad_gt(tmp_path):
    path = write(tmp_path, "id,pred\nv,Scene (B) Scene (A) Scene (C)\n")
    assert vript.score_csv(path, "ERO", gts={"v": ["B", "C", "A"]})["per_row"] == {"v": 1}
    bad = write(tmp_path, "id,pred,gt\nv,Scene (B) Scene (A) Scene (C),AB\n", "bad.csv")
    with pytest.raises(ValueError, match="line 2: ERO gt 'AB' must give three scene letters"):
        vript.score_csv(bad, "ERO")


# --------------------------------------------------------------------------------------- CSV


def test_bad_csv_names_the_line(tmp_path):
    path = write(tmp_path, 'id,pred\na,"two\nlines"\nb,x,extra\n')
    with pytest.raises(ValueError, match=r"pred\.csv:4: 3 fields, the header has 2"):
        vript.read_predictions(path)
    path = write(tmp_path, "id,prediction\na,x\n", "hdr.csv")
    with pytest.raises(ValueError, match=r"hdr\.csv:1: header must name columns id, pred"):
        vript.read_predictions(path)
    with pytest.raises(ValueError, match="does not exist"):
        vript.read_predictions(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="task='CAP'; allowed: HAL, RR, ERO"):
        vript.score_csv(tmp_path / "hdr.csv", "CAP")


# --------------------------------------------------------------------------------------- HAL


class StubTagger:
    """Tags from a word list; lemma drops one trailing 's' (and maps 'is' to 'be')."""

    TAGS = {"cat": "NOUN", "kittens": "NOUN", "dogs": "NOUN", "dog": "NOUN", "car": "NOUN"}
    TAGS |= {"is": "VERB", "runs": "VERB", "the": "DET", "here": "ADV", "Rex": "PROPN"}
    stop_words = frozenset({"be", "the"})

    def pos(self, text):
        return [(w, self.TAGS.get(w, "X")) for w in text.split()]

    def lemma(self, word):
        return "be" if word == "is" else word[:-1] if word.endswith("s") else word


class StubEmbedder:
    VECTORS = {
        "cat": [1, 0, 0],
        "kitten": [0.8, 0.6, 0],  # cos(cat) = 0.8
        "run": [0.6, 0, 0.8],  # cos(cat) = 0.6
        "dog": [0, 1, 0],  # cos(cat) = 0, cos(kitten) = 0.6
        "car": [0, 0, 1],
        "Rex": [0, 0.5, 0],  # cos(dog) = 1
    }

    def encode(self, texts):
        return np.array([self.VECTORS[t] for t in texts], float)


def test_hal_hand_computed_with_the_recall_quirk(tmp_path):
    path = write(
        tmp_path,
        "id,pred,gt\n"
        # gt words {cat} ('is' -> 'be' is a stop word); pred words {kitten, run, dog}: kitten
        # (0.8) and run (0.6) match cat, dog (0.0) does not: m = 2, P = 2/3, R = m/|G| = 2
        # (the official quirk), F1 = 2 * 2/3 * 2 / (2/3 + 2) = 1
        "r1,kittens runs dogs,the cat is here\n"
        "r2,,the cat\n"  # empty prediction: 0, 0, 0
        # pred {Rex, car}, gt {car, dog}: both match (Rex~dog = 1), m = 2: P = 1, R = 1, F1 = 1
        "r3,Rex car,car dogs\n"
        # pred {dog}; gt {cat}: cos 0 -> P = R = F1 = 0
        "r4,dog,cat\n",
    )
    out = vript.score_csv(path, "HAL", tagger=StubTagger(), embedder=StubEmbedder())
    per = {r["id"]: (r["precision"], r["recall"], r["f1"]) for r in out["per_row"]}
    assert per["r1"] == pytest.approx((2 / 3, 2.0, 1.0))
    assert per["r2"] == (0.0, 0.0, 0.0)
    assert per["r3"] == pytest.approx((1.0, 1.0, 1.0))
    assert per["r4"] == (0.0, 0.0, 0.0)
    assert out["precision"] == pytest.approx((2 / 3 + 1) / 4)
    assert out["recall"] == pytest.approx(3 / 4)
    assert out["f1"] == pytest.approx(2 / 4)
    assert vript.hal_words("the cat is here Rex", StubTagger()) == ["Rex", "cat"]


def test_hal_list_ground_truth_from_mapping(tmp_path):
    path = write(tmp_path, "id,pred\nv,car dog\n")
    out = vript.score_csv(
        path, "HAL", gts={"v": ["car", "cat"]}, tagger=StubTagger(), embedder=StubEmbedder()
    )
    # pred {car, dog}, gt {car, cat}: car matches, dog does not -> P = 1/2, R = 1/2
    assert (out["precision"], out["recall"]) == pytest.approx((0.5, 0.5))


def test_hal_with_spacy_and_minilm_separates_a_hallucinated_caption(tmp_path):
    pytest.importorskip("spacy")
    try:
        vript.minilm_dir()
        tagger = vript.SpacyTagger()
    except ValueError as err:
        pytest.skip(str(err))
    gt = "A man in a red jacket rides a bicycle down a snowy street while a dog follows him."
    faithful = "A man wearing a red jacket is riding a bike along a snowy road, a dog behind him."
    invented = "Two women cook pasta in a kitchen and a parrot sings on the fridge."
    path = write(
        tmp_path,
        f'id,pred,gt\nsame,"{gt}","{gt}"\nok,"{faithful}","{gt}"\nbad,"{invented}","{gt}"\n',
    )
    out = vript.score_csv(path, "HAL", tagger=tagger, embedder=vript.MiniLMEmbedder())
    per = {r["id"]: r for r in out["per_row"]}
    assert per["same"]["precision"] == 1.0 and per["same"]["recall"] == 1.0
    assert per["ok"]["precision"] > per["bad"]["precision"] + 0.3
    assert {"man", "bicycle", "street", "dog"} <= set(vript.hal_words(gt, tagger))


@pytest.mark.interop
def test_minilm_embedder_matches_transformers_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    try:
        path = vript.minilm_dir()
    except ValueError as err:
        pytest.skip(str(err))
    texts = ["dog", "a red bicycle rides down the street", "Kitchen"]
    ours = vript.MiniLMEmbedder(path).encode(texts)
    model = transformers.BertModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
