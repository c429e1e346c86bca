"""Bad input files for every file reader of jaxeff: GGUF (`read_gguf_config`, `load_gguf`), HF
safetensors checkpoints (`load_llama`, and `save_llama` into a path that is a file), CTR CSV
(`read_ctr_csv`), DetectBench JSONL (`load_jsonl`), Vript caption JSON (`read_vript_json`) and
predictions CSV (`read_predictions`), LoRA adapter directories (`read_adapter_config`,
`load_adapter`).

Each garbage, truncated, empty, wrong-format or missing file must raise one ValueError whose
message is a single line naming the file and what is wrong, never a bare KeyError,
UnicodeDecodeError, json/csv/numpy error or a hang. The files are tiny and written here; the
only real file used is the first few KB of the SmolLM2 GGUF (when the wheel is installed).
"""

import json
import os
import struct

import numpy as np
import pytest

from jaxeff.data.ctr import read_ctr_csv
from jaxeff.data.video import read_vript_json
from jaxeff.evals.detectbench import load_jsonl
from jaxeff.evals.vript import read_predictions
from jaxeff.llm import gguf as llm_gguf
from jaxeff.llm import hf
from jaxeff.nn import lora

GARBAGE = bytes(range(128, 256)) * 8 + bytes(range(256))  # not UTF-8, not any format
DEEP = b"[" * 100_000  # json's recursion limit


def _raises(match, named, call, *args, **kwargs):
    """``call(*args, **kwargs)`` raises one ValueError matching ``match``, on one line, that
    names ``named`` (a file or directory)."""
    with pytest.raises(ValueError, match=match) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(named) in message, message
    return message


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


# --- GGUF -------------------------------------------------------------------------------------

try:
    import gguf
except ImportError:  # the llm extra is not installed
    gguf = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="needs the gguf package (llm extra)")

READERS = {
    "read_gguf_config": llm_gguf.read_gguf_config,
    "load_gguf": lambda path: llm_gguf.load_gguf(path, cache_dir=os.path.dirname(path)),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_gguf(path, *, arch="llama", tokens=None, merges=(), dim=8, tensor=True):
    """A Llama GGUF with the metadata jaxeff reads and at most one tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(16)
    if isinstance(dim, str):
        w.add_string("llama.embedding_length", dim)
    else:
        w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(SPECIALS + (tokens or ["a", "b"]))
    w.add_token_merges(list(merges))
    if tensor:
        w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def smollm2_head():
    """The first 8 KB of the SmolLM2 GGUF (magic, counts and the start of the metadata)."""
    try:
        path = llm_gguf.smollm2_path()
    except ValueError as err:
        pytest.skip(str(err))
    with open(path, "rb") as f:
        return f.read(8192)


GGUF_FILES = {
    "empty": (b"", "not a readable GGUF file"),
    "garbage": (GARBAGE, "not a readable GGUF file"),
    "text": (b"this is not a gguf file\n" * 20, "not a readable GGUF file"),
    "magic only": (b"GGUF", "not a readable GGUF file"),
    "magic and version": (b"GGUF" + struct.pack("<I", 3), "not a readable GGUF file"),
    "huge counts": (
        b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + b"\0" * 64,
        "not a readable GGUF file",
    ),
    "safetensors": (struct.pack("<Q", 2) + b"{}", "not a readable GGUF file"),
}


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", GGUF_FILES)
def test_gguf_garbage(tmp_path, reader, case):
    content, match = GGUF_FILES[case]
    path = _write(tmp_path / "model.gguf", content)
    _raises(match, path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("cut", [4, 8, 16, 23, 24, 40, 100, 1000, 8192])
def test_gguf_truncated_real_header(tmp_path, smollm2_head, reader, cut):
    path = _write(tmp_path / "smollm2.gguf", smollm2_head[:cut])
    _raises("not a readable GGUF file", path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
def test_gguf_wrong_magic(tmp_path, reader):
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    path = _write(tmp_path / "model.gguf", b"GGML" + good[4:])
    _raises("not a readable GGUF file", path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("where", ["header", "metadata", "tensor info", "tensor data"])
def test_gguf_truncated(tmp_path, reader, where):
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    data_start = len(good) - 64 * 4  # the one tensor, 64 float32, ends the file
    cut = {"header": 20, "metadata": 200, "tensor info": data_start - 40, "tensor data": -8}
    path = _write(tmp_path / "model.gguf", good[: cut[where]])
    _raises("not a readable GGUF file", path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
def test_gguf_missing_file(tmp_path, reader):
    path = tmp_path / "absent.gguf"
    _raises("does not exist", path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
def test_gguf_metadata_not_utf8(tmp_path, reader):
    good = _tiny_gguf(tmp_path / "good.gguf").read_bytes()
    value = struct.pack("<Q", 5) + b"llama"  # general.architecture's value
    assert good.count(value) == 1
    path = _write(tmp_path / "model.gguf", good.replace(value, struct.pack("<Q", 5) + b"\xff" * 5))
    _raises("utf-8", path, READERS[reader], path)


@needs_gguf
@pytest.mark.parametrize("reader", READERS)
def test_gguf_wrong_metadata(tmp_path, reader):
    path = _tiny_gguf(tmp_path / "model.gguf", dim="wide")
    _raises("'llama.embedding_length' must be a number, got 'wide'", path, READERS[reader], path)
    path = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _raises("architecture 'gpt2'", path, READERS[reader], path)
    path = _tiny_gguf(tmp_path / "odd.gguf", dim=7)  # 2 heads do not divide a width of 7
    _raises("n_heads", path, READERS[reader], path)


@needs_gguf
def test_gguf_bad_tokenizer_and_missing_tensor(tmp_path):
    path = _tiny_gguf(tmp_path / "merges.gguf", merges=["a b"])  # "ab" is not a token
    _raises("malformed metadata", path, READERS["load_gguf"], path)
    path = _tiny_gguf(tmp_path / "weights.gguf", tokens=["a", "b", "ab"], merges=["a b"])
    _raises("lacks tensor 'token_embd.weight'", path, READERS["load_gguf"], path)


# --- HF safetensors -----------------------------------------------------------------------------

HF_CONFIG = {
    "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 4,
    "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}  # fmt: skip


def _hf_tensors():
    out = {"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}
    out["model.norm.weight"] = np.ones(4, np.float32)
    for name in hf._BLOCK.values():
        out[f"model.layers.0.{name}"] = np.zeros((4,) if "norm" in name else (4, 4), np.float32)
    return out


def _hf_dir(tmp_path, config=HF_CONFIG, weights=None):
    """A Llama checkpoint directory: ``config`` (a dict, or raw bytes) and ``weights`` (tensors,
    raw bytes, or None for valid tensors); either is left out when it is ``...``."""
    from safetensors.numpy import save_file

    directory = tmp_path / "ckpt"
    directory.mkdir()
    if config is not ...:
        raw = config if isinstance(config, bytes) else json.dumps(config).encode()
        (directory / "config.json").write_bytes(raw)
    if isinstance(weights, bytes):
        (directory / "model.safetensors").write_bytes(weights)
    elif weights is not ...:
        save_file(weights or _hf_tensors(), str(directory / "model.safetensors"))
    return directory


def _safetensors_bytes(tmp_path):
    from safetensors.numpy import save_file

    save_file(_hf_tensors(), str(tmp_path / "good.safetensors"))
    return (tmp_path / "good.safetensors").read_bytes()


def _without(name):
    tensors = _hf_tensors()
    del tensors[name]
    return tensors


def _reshaped(name, shape):
    return _hf_tensors() | {name: np.zeros(shape, np.float32)}


HF_CONFIGS = {
    "missing": (..., "config.json is missing"),
    "not json": (b"{model_type: llama", "config.json is not valid JSON"),
    "garbage": (GARBAGE, "config.json is not valid JSON"),
    "empty": (b"", "config.json is not valid JSON"),
    "nested too deeply": (DEEP, "config.json is not valid JSON"),
    "a list": ([HF_CONFIG], "config.json: expected a JSON object, got list"),
    "not llama": (HF_CONFIG | {"model_type": "gpt2"}, "model_type='gpt2'; allowed: 'llama'"),
    "no hidden_size": (
        {k: v for k, v in HF_CONFIG.items() if k != "hidden_size"},
        "hidden_size must be a positive integer, got missing",
    ),
    "string width": (HF_CONFIG | {"hidden_size": "4"}, "hidden_size must be a positive integer"),
    "zero heads": (HF_CONFIG | {"num_attention_heads": 0}, "num_attention_heads must be a posi"),
    "string eps": (HF_CONFIG | {"rms_norm_eps": "small"}, "rms_norm_eps must be a number"),
}


@pytest.mark.parametrize("case", HF_CONFIGS)
def test_hf_bad_config(tmp_path, case):
    config, match = HF_CONFIGS[case]
    directory = _hf_dir(tmp_path, config=config)
    named = directory if config is ... else directory / "config.json"
    _raises(match, named, hf.load_llama, str(directory))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "model.safetensors is missing"),
        ("garbage", "not a readable safetensors file"),
        ("empty", "not a readable safetensors file"),
        ("huge header", "not a readable safetensors file"),
        ("header not json", "not a readable safetensors file"),
        ("cut at 8", "not a readable safetensors file"),
        ("cut at 100", "not a readable safetensors file"),
        ("cut in the data", "not a readable safetensors file"),
        ("lacks a tensor", "lacks tensor 'model.layers.0.mlp.up_proj.weight'"),
        ("wrong shape", r"'model.layers.0.mlp.up_proj.weight' has shape \(3, 4\), config"),
        ("wrong embedding", r"'model.embed_tokens.weight' has shape \(9, 4\)"),
    ],
)
def test_hf_bad_weights(tmp_path, case, match):
    good = _safetensors_bytes(tmp_path)
    weights = {
        "missing": ...,
        "garbage": GARBAGE,
        "empty": b"",
        "huge header": struct.pack("<Q", 2**40) + b"{}",
        "header not json": struct.pack("<Q", 5) + b"{nope",
        "cut at 8": good[:8],
        "cut at 100": good[:100],
        "cut in the data": good[:-1],
        "lacks a tensor": _without("model.layers.0.mlp.up_proj.weight"),
        "wrong shape": _reshaped("model.layers.0.mlp.up_proj.weight", (3, 4)),
        "wrong embedding": _reshaped("model.embed_tokens.weight", (9, 4)),
    }[case]
    directory = _hf_dir(tmp_path, weights=weights)
    named = directory if weights is ... else directory / "model.safetensors"
    _raises(match, named, hf.load_llama, str(directory))


def test_hf_valid_tiny_checkpoint_loads(tmp_path):
    model = hf.load_llama(str(_hf_dir(tmp_path)))
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.vocab_size) == (4, 1, 8)


def test_hf_export_into_a_file(tmp_path):
    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    model = Transformer(hf.config_from_hf(HF_CONFIG), rngs=nnx.Rngs(0))
    target = _write(tmp_path / "export", "a file, not a directory")
    _raises("exists and is not a directory", target, hf.save_llama, model, str(target))
    _raises("cannot create directory", target, hf.save_llama, model, str(target / "sub"))
    assert target.read_text() == "a file, not a directory"


# --- CTR CSV ------------------------------------------------------------------------------------

CTR_FILES = {
    "empty": (b"", "empty file, expected a CSV header"),
    "blank lines": (b"\n\n\n", "empty file, expected a CSV header"),
    "no label column": (b"click,a,b\n1,x,y\n", "no label column 'label'"),
    "non-numeric label": (
        b"label,a\n1,x\nyes,y\n",
        r":3: column 'label' must be 0 or 1, got 'yes'",
    ),
    "label 2": (b"label,a\n2,x\n", r":2: column 'label' must be 0 or 1, got '2'"),
    "ragged row": (b"label,a\n1,x\n0,y,z\n", r":3: 3 values for 2 header columns"),
    "short row": (b"label,a,b\n1,x\n", r":2: 2 values for 3 header columns"),
    "binary garbage": (GARBAGE, "not a UTF-8 text CSV file"),
    "huge field": (b"label,a\n1," + b"x" * 200_000 + b"\n", "malformed CSV"),
    "only a label": (b"label\n1\n", "no feature columns besides 'label'"),
}


@pytest.mark.parametrize("case", CTR_FILES)
def test_ctr_bad_csv(tmp_path, case):
    content, match = CTR_FILES[case]
    path = _write(tmp_path / "train.csv", content)
    _raises(match, path, read_ctr_csv, str(path))


def test_ctr_bad_val_split_and_missing_file(tmp_path):
    train = _write(tmp_path / "train.csv", "label,a\n1,x\n0,y\n")
    val = _write(tmp_path / "val.csv", GARBAGE)
    _raises("not a UTF-8 text CSV file", val, read_ctr_csv, str(train), str(val))
    val = _write(tmp_path / "val2.csv", "label,b\n1,x\n")
    _raises(r"missing columns \['a'\]", val, read_ctr_csv, str(train), str(val))
    _raises("not found", tmp_path / "absent.csv", read_ctr_csv, str(tmp_path / "absent.csv"))


@pytest.mark.parametrize(
    "content",
    [GARBAGE, DEEP, b"", b"[]", b'{"feature_specs": {"a": {}}}'],
    ids=["garbage", "nested too deeply", "empty", "a list", "no vocab_size"],
)
def test_ctr_bad_feature_map(tmp_path, content):
    train = _write(tmp_path / "train.csv", "label,a\n1,0\n")
    fmap = _write(tmp_path / "feature_map.json", content)
    _raises("not a FuxiCTR feature_map.json", fmap, read_ctr_csv, str(train), feature_map=str(fmap))


# --- DetectBench JSONL --------------------------------------------------------------------------

RECORD = {"context": "c", "question": "q", "options": ["x", "y"], "answer": 1}
LINE = json.dumps(RECORD).encode() + b"\n"

DETECT_FILES = {
    "empty": (b"", "holds no items"),
    "blank lines": (b"\n \n\t\n", "holds no items"),
    "line 3 not json": (LINE + LINE + b"{'context': 'c'}\n", r":3: not valid JSON"),
    "cut line": (LINE + LINE[:30], r":2: not valid JSON"),
    "two records on a line": (LINE[:-1] + LINE, r":1: not valid JSON"),
    "missing answer": (
        json.dumps({k: v for k, v in RECORD.items() if k != "answer"}).encode(),
        r":1: missing field 'answer'",
    ),
    "answer out of range": (
        LINE + json.dumps(RECORD | {"answer": 2}).encode(),
        r":2: 'answer' must be a 0-based option index",
    ),
    "a list": (b"[1, 2]\n", r":1: expected a JSON object, got list"),
    "binary garbage on line 2": (LINE + b"\xff\xfe\x00garbage\n", r":2: not UTF-8 text"),
    "binary garbage": (GARBAGE, r":1: not UTF-8 text"),
    "nested too deeply": (DEEP, r":1: not valid JSON"),
}


@pytest.mark.parametrize("case", DETECT_FILES)
def test_detectbench_bad_jsonl(tmp_path, case):
    content, match = DETECT_FILES[case]
    path = _write(tmp_path / "detective.jsonl", content)
    _raises(match, path, load_jsonl, path)


def test_detectbench_missing_file(tmp_path):
    _raises("does not exist", tmp_path / "absent.jsonl", load_jsonl, tmp_path / "absent.jsonl")


# --- Vript caption JSON and predictions CSV -----------------------------------------------------

SCENE = {"caption": {"content": "a red 3 moves left"}, "voiceover": []}
VRIPT_FILES = {
    "empty": (b"", "not valid JSON"),
    "not json": (b"meta: {}", "not valid JSON"),
    "binary garbage": (GARBAGE, "not valid JSON"),
    "nested too deeply": (DEEP, "not valid JSON"),
    "a list": (b"[]", "top level must be a JSON object, got list"),
    "no meta": (json.dumps({"data": {}}), "key 'meta' must be an object, got NoneType"),
    "no data": (json.dumps({"meta": {}}), "key 'data' must be an object, got NoneType"),
    "bad scene id": (json.dumps({"meta": {}, "data": {"v": SCENE}}), "scene id must look like"),
    "no content": (
        json.dumps({"meta": {}, "data": {"v-Scene-001": {"caption": {}}}}),
        "caption key 'content' must be a string, got missing",
    ),
    "caption a string": (
        json.dumps({"meta": {}, "data": {"v-Scene-001": {"caption": "x"}}}),
        "key 'caption' must be an object, got str",
    ),
}


@pytest.mark.parametrize("case", VRIPT_FILES)
def test_vript_bad_caption_json(tmp_path, case):
    content, match = VRIPT_FILES[case]
    path = _write(tmp_path / "v_caption.json", content)
    _raises(match, path, read_vript_json, path)


def test_vript_caption_missing_or_a_directory(tmp_path):
    _raises("no such Vript caption file", tmp_path / "x.json", read_vript_json, tmp_path / "x.json")
    _raises("cannot read the Vript caption file", tmp_path, read_vript_json, tmp_path)


PREDICTION_FILES = {
    "empty": (b"", "empty file; expected a header 'id,pred"),
    "no pred column": (b"id,answer\n1,x\n", r":1: header must name columns id, pred"),
    "json instead of csv": (b'[{"id": 1, "pred": "x"}]', r":1: header must name columns id, pred"),
    "ragged row": (b"id,pred\n1,x\n2,y,z\n", r":3: 3 fields, the header has 2"),
    "binary garbage": (GARBAGE, "not a UTF-8 text CSV file"),
    "huge field": (b"id,pred\n1," + b"x" * 200_000 + b"\n", "malformed CSV"),
    "header only": (b"id,pred\n", "no prediction rows"),
}


@pytest.mark.parametrize("case", PREDICTION_FILES)
def test_vript_bad_predictions_csv(tmp_path, case):
    content, match = PREDICTION_FILES[case]
    path = _write(tmp_path / "preds.csv", content)
    _raises(match, path, read_predictions, path)


def test_vript_predictions_missing(tmp_path):
    _raises("does not exist", tmp_path / "p.csv", read_predictions, tmp_path / "p.csv")


# --- LoRA adapter directory ---------------------------------------------------------------------

ADAPTER = {"rank": 2, "alpha": 4.0, "targets": ["q", "v"], "seed": 0}
ADAPTER_CONFIGS = {
    "not json": (b"rank: 2", "not valid JSON"),
    "binary garbage": (GARBAGE, "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "nested too deeply": (DEEP, "not valid JSON"),
    "a list": ([ADAPTER], "expected an object with keys"),
    "peft keys": ({"r": 2, "lora_alpha": 4, "target_modules": ["q"]}, "expected an object with k"),
    "no targets": ({"rank": 2}, "'targets' must be a list of projection names, got missing"),
    "targets a string": (ADAPTER | {"targets": "qv"}, "'targets' must be a list of projection"),
    "targets numbers": (ADAPTER | {"targets": [1]}, "'targets' must be a list of projection"),
    "unknown target": (ADAPTER | {"targets": ["qkv"]}, r"targets=\('qkv',\) is invalid"),
    "rank a string": (ADAPTER | {"rank": "2"}, "'rank' must be an integer, got '2'"),
    "rank 2.5": (ADAPTER | {"rank": 2.5}, "'rank' must be an integer, got 2.5"),
    "rank 0": (ADAPTER | {"rank": 0}, "rank must be >= 1"),
    "alpha null": (ADAPTER | {"alpha": None}, "'alpha' must be a number, got None"),
}


@pytest.mark.parametrize("case", ADAPTER_CONFIGS)
def test_lora_bad_adapter_config(tmp_path, case):
    content, match = ADAPTER_CONFIGS[case]
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    path = _write(tmp_path / "adapter" / "adapter_config.json", raw)
    _raises(match, path, lora.read_adapter_config, str(path.parent))


def test_lora_missing_config(tmp_path):
    _raises("adapter_config.json is missing", tmp_path, lora.read_adapter_config, str(tmp_path))


@pytest.mark.parametrize("weights", ["garbage files", "a file", "missing"])
def test_lora_garbage_weights(tmp_path, weights):
    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    directory = tmp_path / "adapter"
    _write(directory / "adapter_config.json", json.dumps(ADAPTER))
    if weights == "garbage files":
        for name in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"):
            _write(directory / "adapter" / name, GARBAGE)
    elif weights == "a file":
        _write(directory / "adapter", GARBAGE)
    model = Transformer(hf.config_from_hf(HF_CONFIG), rngs=nnx.Rngs(0))
    _raises(
        "is corrupt or does not fit the model", directory, lora.load_adapter, str(directory), model
    )
