"""Batched generation with fixed, recorded decoding settings; the NEFTune paper's length ablations.

Prompts are rendered the way training renders them (:mod:`noisyft.templates`), tokenized one by one, sorted by
length (longest first, so the first batch shows the peak memory and neighbours need little padding), padded on
the **left** (a decoder-only model continues from the last position of every row) and passed to
``model.generate`` with the KV cache. Results come back in input order.

Every record says how it ended: ``new_tokens`` counts the tokens generated up to and including the first end of
sequence token (rows that finished early are padded by ``generate`` afterwards; that padding is not counted),
``finish_reason`` is ``"eos"`` when an end token was produced, ``"length"`` when ``max_new_tokens`` ran out.

Length ablations (NEFTune paper, Table 5): answers with a "long, detailed answer" request appended to the
instruction (:data:`LONG_ANSWER_SUFFIX`), and answers whose end token is blocked until ``min_new_tokens`` new
tokens (the paper: 250), beside the default answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from noisyft import templates
from noisyft._io import atomic_write_text, iter_jsonl_objects

logger = logging.getLogger(__name__)

__all__ = [
    "LONG_ANSWER_SUFFIX",
    "GenerationSettings",
    "ablation_settings",
    "format_prompt",
    "generate_responses",
    "length_ablations",
    "read_generations",
    "write_generations",
]

LONG_ANSWER_SUFFIX = "\n\nPlease give a long, detailed answer."
FINISH_REASONS = ("eos", "length")
ROLES = ("system", "user", "assistant")

Instruction = str | Sequence[dict]


@dataclasses.dataclass
class GenerationSettings:
    """Decoding settings; the defaults are the NEFTune paper's (greedy decoding).

    Args:
        max_new_tokens: Most tokens generated per answer (the end token included).
        do_sample: False = greedy (argmax at every step); True = sampling with ``temperature`` and ``top_p``
            (top-k is switched off, so these two are the whole sampling rule).
        temperature: Logits are divided by it before sampling. Only with ``do_sample=True``.
        top_p: Nucleus sampling: sample from the smallest set of tokens whose probability adds up to ``top_p``.
            Only with ``do_sample=True``.
        min_new_tokens: The end-of-sequence token(s) get probability 0 until this many new tokens exist
            (``generate``'s ``min_new_tokens``). The paper's ablation blocks EOS until 250 tokens.
        suffix: Text appended to the (last) user instruction, e.g. :data:`LONG_ANSWER_SUFFIX`.
        batch_size: Prompts per ``generate`` call.
        seed: Seeds torch's RNG for sampling (the global RNG state is restored afterwards). Batched sampling
            depends on how prompts are grouped, so a sampled answer is reproducible for the same prompt set and
            batch size only. Greedy answers do not depend on it.
        template: Prompt template (``"auto"``, ``"alpaca"``, ``"vicuna"``, ``"chat"``), as in training.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    suffix: str = ""
    batch_size: int = 8
    seed: int = 0
    template: str = "auto"

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens ({self.max_new_tokens}): "
                "no answer could end; raise max_new_tokens"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError(
                f"temperature={self.temperature} / top_p={self.top_p} only apply when sampling; greedy decoding "
                "(do_sample=False) ignores them, so set do_sample=True or leave them at 1.0"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.suffix, str):
            raise ValueError(f"suffix must be a string, got {type(self.suffix).__name__}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.template not in templates.TEMPLATES:
            raise ValueError(
                f"unknown template {self.template!r}; choose one of {', '.join(templates.TEMPLATES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ prompts


def _conversation(instruction: Instruction, suffix: str = "") -> list[dict]:
    """The conversation up to the answer: a copy of ``instruction``'s turns (the last one the user's)."""
    if isinstance(instruction, str):
        return [{"role": "user", "content": instruction + suffix}]
    turns = [dict(t) for t in instruction]
    if not turns:
        raise ValueError("a conversation prompt needs at least one turn, got an empty list")
    for i, turn in enumerate(turns):
        if turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(
                f"turn {i} of the conversation prompt must be {{'role': 'system'|'user'|'assistant', "
                f"'content': str}}, got {turn!r}"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(
            f"the last turn of a conversation prompt must be the user's (the answer follows it), "
            f"got role {turns[-1]['role']!r}"
        )
    turns[-1]["content"] += suffix
    return turns


def _render(tokenizer: Any, instruction: Instruction, template: str, suffix: str = "") -> tuple[str, str]:
    """``(prompt_text, resolved_template)``."""
    conversation = _conversation(instruction, suffix)
    name = templates.resolve_template(
        template, tokenizer, alpaca=templates.is_alpaca_conversation(conversation)
    )
    # Render the conversation with a placeholder answer and keep what precedes that answer: the prompt
    # segments are exactly the training text before the response tokens.
    segments = templates.render_segments(
        [*conversation, {"role": "assistant", "content": "x"}], tokenizer, name
    )
    last_response = max(i for i, (_, is_response) in enumerate(segments) if is_response)
    prompt = "".join(text for text, _ in segments[:last_response])
    if name == "vicuna":
        # Training text is "ASSISTANT: reply"; the space belongs to the reply's first token for most
        # tokenizers, so the generation prompt stops before it (as FastChat does).
        prompt = prompt.rstrip(" ")
    return prompt, name


def format_prompt(tokenizer: Any, instruction: Instruction, template: str = "auto") -> str:
    """The prompt text up to where the assistant's answer starts, rendered as in training.

    ``instruction`` is a user message, or a list of ``{"role", "content"}`` messages (a multi-turn conversation
    whose last turn is the user's). ``"auto"`` uses the tokenizer's chat template (with the generation prompt)
    when it has one, else vicuna; alpaca is used for messages carrying an Alpaca ``"input"`` key or when asked.
    For vicuna the trailing space after ``"ASSISTANT:"`` is left to the answer.
    """
    return _render(tokenizer, instruction, template)[0]


# ---------------------------------------------------------------------------------------------- generation


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _generation_config(settings: GenerationSettings, eos_ids: list[int], pad_id: int, model: Any) -> Any:
    """A generation config that pins every decoding choice (nothing inherited from the checkpoint)."""
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "do_sample": settings.do_sample,
        "num_beams": 1,
        "use_cache": True,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "eos_token_id": eos_ids or None,
        "pad_token_id": pad_id,
        "bos_token_id": getattr(model.generation_config, "bos_token_id", None),
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    return GenerationConfig(**kwargs)


def _finish(row: list[int], eos_ids: set[int]) -> tuple[int, str]:
    """``(new_tokens, finish_reason)`` of one row of generated ids (padding after the end token ignored)."""
    for pos, token in enumerate(row):
        if token in eos_ids:
            return pos + 1, "eos"
    return len(row), "length"


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Instruction],
    settings: GenerationSettings | None = None,
    *,
    progress: bool = True,
) -> list[dict]:
    """Answer every prompt with ``model.generate`` in left-padded batches; records in input order.

    Each record: ``{"index", "prompt" (as given, without the suffix), "response" (new tokens decoded, special
    tokens skipped, stripped), "new_tokens" (up to and including the end token), "finish_reason"}``.
    The model runs in eval mode under ``torch.inference_mode()`` (its previous mode is restored). Padding uses
    the tokenizer's pad token, else its eos token; a tokenizer with neither is an error.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    from noisyft.models import pad_token_id

    pad_id = pad_token_id(tokenizer)
    if pad_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an eos token, so prompts cannot be batched (padded) and "
            "answers cannot end; set tokenizer.pad_token / tokenizer.eos_token"
        )
    eos_ids = _eos_ids(model, tokenizer)
    if not eos_ids:
        logger.warning("no eos token: every answer runs to max_new_tokens=%d", settings.max_new_tokens)
    if not prompts:
        return []

    encoded: list[list[int]] = []
    for i, instruction in enumerate(prompts):
        text, name = _render(tokenizer, instruction, settings.template, settings.suffix)
        # the chat template writes its own special tokens; alpaca/vicuna text gets the tokenizer's (BOS),
        # exactly as noisyft.data tokenizes training text
        ids = tokenizer(text, add_special_tokens=name != "chat")["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} renders to no tokens")
        encoded.append(list(ids))
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit:
        too_long = sum(len(ids) + settings.max_new_tokens > limit for ids in encoded)
        if too_long:
            logger.warning(
                "%d of %d prompts plus max_new_tokens=%d exceed the model's %d positions",
                too_long,
                len(encoded),
                settings.max_new_tokens,
                limit,
            )

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first, stable
    config = _generation_config(settings, eos_ids, pad_id, model)
    eos_set = set(eos_ids)
    device = next(model.parameters()).device
    records: list[dict | None] = [None] * len(encoded)
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    model.eval()
    try:
        with (
            torch.inference_mode(),
            torch.random.fork_rng(devices=rng_devices),
            tqdm(total=len(encoded), disable=not progress, desc="generating", unit="prompt") as bar,
        ):
            torch.manual_seed(settings.seed)
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
                for row, i in enumerate(batch):  # left padding: the prompt ends at the last column
                    input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    attention_mask[row, width - len(encoded[i]) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                )  # (B, T + N), N <= max_new_tokens
                new = output[:, width:].tolist()  # (B, N)
                for row, i in enumerate(batch):
                    n, reason = _finish(new[row], eos_set)
                    records[i] = {
                        "index": i,
                        "prompt": prompts[i]
                        if isinstance(prompts[i], str)
                        else [dict(t) for t in prompts[i]],
                        "response": tokenizer.decode(new[row][:n], skip_special_tokens=True).strip(),
                        "new_tokens": n,
                        "finish_reason": reason,
                    }
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return records  # type: ignore[return-value]


def length_ablations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Instruction],
    base: GenerationSettings | None = None,
    *,
    min_new_tokens: int = 250,
    progress: bool = True,
) -> dict[str, list[dict]]:
    """The NEFTune paper's length ablations (Table 5), as three generation runs over the same prompts.

    ``"default"``: ``base`` as is; ``"long_instruction"``: :data:`LONG_ANSWER_SUFFIX` appended to each
    instruction (after ``base.suffix``); ``"eos_blocked"``: the end token blocked until ``min_new_tokens`` new
    tokens (``base.max_new_tokens`` must allow that). The settings of each run are
    :func:`ablation_settings`.
    """
    runs = ablation_settings(base or GenerationSettings(), min_new_tokens=min_new_tokens)
    results = {}
    for name, settings in runs.items():
        logger.info("length ablation %r: %s", name, settings.to_dict())
        results[name] = generate_responses(model, tokenizer, prompts, settings, progress=progress)
    return results


def ablation_settings(
    base: GenerationSettings, *, min_new_tokens: int = 250
) -> dict[str, GenerationSettings]:
    """The decoding settings of the three :func:`length_ablations` runs (to record next to their outputs)."""
    if min_new_tokens > base.max_new_tokens:
        raise ValueError(
            f"the eos_blocked run needs max_new_tokens >= min_new_tokens, got max_new_tokens="
            f"{base.max_new_tokens} < min_new_tokens={min_new_tokens}"
        )
    return {
        "default": base,
        "long_instruction": dataclasses.replace(base, suffix=base.suffix + LONG_ANSWER_SUFFIX),
        "eos_blocked": dataclasses.replace(base, min_new_tokens=min_new_tokens),
    }


# ---------------------------------------------------------------------------------------------- JSONL files

_REQUIRED: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "prompt": (str, list),
    "response": (str,),
    "new_tokens": (int,),
    "finish_reason": (str,),
    "decoding": (dict,),
}


def write_generations(
    path: str | os.PathLike, records: Sequence[dict], settings: GenerationSettings, **meta: Any
) -> Path:
    """Write ``records`` as JSONL (atomically): each line is the record plus ``"decoding"`` (the settings)
    and ``"meta"`` (``meta``, e.g. the model path), so the file alone says how every answer was produced."""
    decoding = settings.to_dict()
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"write_generations: meta must be JSON-serializable ({exc})") from None
    lines = []
    for n, record in enumerate(records):
        clash = {"decoding", "meta"} & record.keys()
        if clash:
            raise ValueError(f"record {n} already has key(s) {sorted(clash)}, which write_generations adds")
        lines.append(json.dumps({**record, "decoding": decoding, "meta": meta}, ensure_ascii=False))
    path = Path(path)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_generations(path: str | os.PathLike) -> list[dict]:
    """Read a :func:`write_generations` file; a bad line raises ValueError naming the file, line and field."""
    records = []
    for _, where, record in iter_jsonl_objects(path):
        for key, types in _REQUIRED.items():
            if key not in record:
                raise ValueError(f"{where}: field {key!r} is missing")
            value = record[key]
            if not isinstance(value, types) or (types == (int,) and isinstance(value, bool)):
                names = " or ".join(t.__name__ for t in types)
                raise ValueError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
        if record["finish_reason"] not in FINISH_REASONS:
            raise ValueError(
                f"{where}: field 'finish_reason' must be one of {FINISH_REASONS}, "
                f"got {record['finish_reason']!r}"
            )
        records.append(record)
    return records
