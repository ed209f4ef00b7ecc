"""Preference data: one reader per dataset schema, tokenization with prompt masking, skip counting, batching.

Every schema is normalized to the local JSONL schema, one prompt with K >= 1 scored responses::

    {"prompt": "text or [{role, content}, ...]", "responses": ["...", ...], "scores": [7.5, ...]}

then tokenized to ``prompt_ids`` / ``response_ids[K]`` / ``scores[K]``. Responses that cannot be trained on
(missing/NaN/"N/A" score, empty text, characters the tokenizer does not know, truncated to nothing or to
less than ``min_kept_fraction`` of their tokens, identical to another response of the prompt) are dropped
and counted by reason; rows left with too few responses (or with every score tied, for pair/list losses)
are dropped and counted too. A field of the wrong type (``"scores": 3.0``, ``"responses": "cba"``) and a
file that cannot be read stop with a ``DataError``, one line naming the file, row, field and problem.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
from collections import Counter

import torch

# The columns that identify each schema, in detection order.
SCHEMA_COLUMNS = {
    "ultrafeedback": ("instruction", "completions"),
    "armorm": ("all_generated_responses", "all_rm_scores"),
    "binarized": ("chosen", "rejected", "score_chosen", "score_rejected"),
    "responses": ("prompt", "responses", "scores"),
}
FORMATS = tuple(SCHEMA_COLUMNS)
DATA_FILE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
IGNORE_INDEX = -100  # label of every position that is not a response token


class DataError(ValueError):
    """A data problem, in one line naming the source, the row (counted from 0, as in ``dataset[i]``) or the
    line (counted from 1, as in an editor), the field and what is wrong."""


def _got(x) -> str:
    return "null" if x is None else f"{type(x).__name__} {reprlib.repr(x)}"


# ----------------------------------------------------------------------------------------------- loading
def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a filesystem path rather than a hub id ``owner/name``: a data-file extension,
    a leading ``.``, ``/`` or ``~``, a trailing separator, or more than one ``/``."""
    return (name.lower().endswith(DATA_FILE_EXTENSIONS) or name.startswith((".", "/", "~"))
            or name.endswith(("/", os.sep)) or name.count("/") > 1)


def resolve_source(source: str) -> tuple[str, str]:
    """``("local", path)`` for an existing file or directory (``~`` expanded), else ``("hub", source)``.
    A missing path that ``looks_like_path`` raises DataError at once instead of being looked up on the Hub."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return "local", path
    if looks_like_path(source):
        raise DataError(f"--dataset {source!r}: no such file or directory")
    return "hub", source


def _reason(e: BaseException) -> str:
    """The first line of the most specific message in an exception chain (datasets wraps the cause)."""
    while type(e).__name__ == "DatasetGenerationError" and e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s} is outside the float64 range")
    return v


_JSON_KINDS = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "list"}


def _json_kind(v) -> str | None:
    if v is None:
        return None
    inner = sorted({_JSON_KINDS[type(x)] for x in v if x is not None}) if isinstance(v, list) else []
    return f"list of {'/'.join(inner)}" if inner else _JSON_KINDS[type(v)]


def _json_file_problem(path: str) -> tuple[str, str] | None:
    """``(where, what)`` of the first problem in a JSON / JSON Lines file that a reader chokes on (not UTF-8,
    invalid JSON, a number out of range, a line that is not an object, a field of different types in
    different rows), or None when none is found. Only called once ``datasets`` has failed on the file."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        return "", "empty file, no rows"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f" line {line}", f"not UTF-8 text (byte {data[e.start]:#04x})"
    lines = text.split("\n")
    first = next((line.strip() for line in lines if line.strip()), "")
    rows = []
    if first in ("[", "{"):  # one JSON document spread over lines, not JSON Lines
        try:
            doc = json.loads(text, parse_float=_finite_float)
        except json.JSONDecodeError as e:
            return f" line {e.lineno}", f"invalid JSON: {e.msg} (column {e.colno})"
        except ValueError as e:
            return "", str(e)
        rows = [(f" row {i}", r) for i, r in enumerate(doc)] if isinstance(doc, list) else [(" line 1", doc)]
    for n, line in enumerate(lines if not rows else [], 1):
        if line.strip():
            try:
                rows.append((f" line {n}", json.loads(line, parse_float=_finite_float)))
            except json.JSONDecodeError as e:
                return f" line {n}", f"invalid JSON: {e.msg} (column {e.colno})"
            except ValueError as e:
                return f" line {n}", str(e)
    seen = {}
    for where, row in rows:
        if not isinstance(row, dict):
            return where, f"expected a JSON object (one row), got {_json_kind(row) or 'null'}"
        for field, value in row.items():
            kind = _json_kind(value)
            if kind is None:
                continue
            if "/" in kind:
                return where, f"field {field!r} is a {kind} (mixed types in one list)"
            first_kind, first_where = seen.setdefault(field, (kind, where))
            if kind != first_kind:
                return where, f"field {field!r} is {kind} here but {first_kind} at{first_where} (mixed types)"
    return None


def load_raw_dataset(source: str, split: str | None = None):
    """``datasets.Dataset`` of one split from a local .json/.jsonl/.parquet file, a local directory of data
    files or a hub id; raises DataError (one line) when it cannot be found, cannot be read or has no rows."""
    import datasets

    kind, path = resolve_source(source)
    builder = None
    if kind == "local" and os.path.isfile(path):
        ext = path.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise DataError(f"local dataset {source!r}: expected a .json, .jsonl or .parquet file")
    try:
        if builder:
            ds = datasets.load_dataset(builder, data_files=path, split="train")
        else:
            ds = datasets.load_dataset(path, split=split or "train")
        if kind == "local":  # pyarrow's JSON reader lets invalid UTF-8 into string columns
            ds.data.validate(full=True)
    except Exception as e:
        problem = _json_file_problem(path) if builder == "json" else None
        if problem:
            raise DataError(f"{source}{problem[0]}: {problem[1]}") from e
        where = f"hub dataset {source!r}" if kind == "hub" else source
        raise DataError(f"{where}: cannot load it: {_reason(e)}") from e
    if len(ds) == 0:
        raise DataError(f"{source}: no rows" + (f" in split {split!r}" if split else ""))
    return ds


def load_splits(source: str, split: str | None = None, eval_split: str | None = None):
    """``(train_raw, eval_raw)`` ``datasets.Dataset``s for ``--dataset source``.

    A local file (its rows) or directory (its split ``split``, default "train") gives ``eval_raw`` None: the
    caller carves held-out rows from the training split. A hub dataset gives ``split`` (default: train_prefs,
    else train, else its first split) and ``eval_split`` (default: test_prefs, else test, else None). Raises
    DataError (one line) for a missing path, an unknown split or a hub failure (offline, not found).
    """
    kind, _ = resolve_source(source)
    if kind == "local":
        return load_raw_dataset(source, split), None
    import datasets

    try:
        splits = datasets.get_dataset_split_names(source)
    except Exception as e:
        raise DataError(f"hub dataset {source!r}: cannot load it: {_reason(e)}") from e
    for name in (split, eval_split):
        if name is not None and name not in splits:
            raise DataError(f"hub dataset {source!r} has no split {name!r}; its splits: {', '.join(splits)}")
    split = split or next((s for s in ("train_prefs", "train") if s in splits), splits[0])
    eval_split = eval_split or next((s for s in ("test_prefs", "test") if s in splits), None)
    return load_raw_dataset(source, split), load_raw_dataset(source, eval_split) if eval_split else None


def detect_format(columns) -> str:
    """The schema of a dataset from its column names (override with ``--dataset-format``)."""
    cols = set(columns)
    for fmt, needed in SCHEMA_COLUMNS.items():
        if set(needed) <= cols:
            return fmt
    raise DataError(
        f"cannot tell the dataset schema from its columns {sorted(cols)}; expected one of: "
        "UltraFeedback (instruction, completions), ArmoRM (prompt, all_generated_responses, all_rm_scores), "
        "binarized (prompt, chosen, rejected, score_chosen, score_rejected) or the local schema "
        "(prompt, responses, scores); or pass --dataset-format"
    )


# ------------------------------------------------------------------------------------------ normalizing
def to_score(x) -> float | None:
    """A finite float, or None for missing, NaN, inf, out of float range, "N/A" and other non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def _score(x, field: str) -> float | None:
    if isinstance(x, (list, tuple, dict)):
        raise DataError(f"field {field!r}: expected a number, got {_got(x)}")
    return to_score(x)


def _list(x, field: str, what: str, ok) -> list:
    """``x`` as a list (None: empty) whose items all pass ``ok``; DataError naming the field otherwise."""
    if x is None:
        return []
    if not isinstance(x, (list, tuple)):
        raise DataError(f"field {field!r}: expected a list of {what}, got {_got(x)}")
    for i, item in enumerate(x):
        if not ok(item):
            raise DataError(f"field {field!r}: expected a list of {what}, got {_got(item)} at position {i}")
    return list(x)


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, type(None)))


def _messages(x, field: str) -> list:
    return _list(x, field, "{role, content} messages", _is_message)


def _prompt(x, field: str):
    if x is None or isinstance(x, str):
        return x or ""
    if isinstance(x, (list, tuple)):
        return _messages(x, field)
    raise DataError(f"field {field!r}: expected a string or a list of {{role, content}} messages, got {_got(x)}")


def _text(x, field: str) -> str:
    if x is None or isinstance(x, str):
        return x or ""
    raise DataError(f"field {field!r}: expected a string, got {_got(x)}")


def _ultrafeedback_score(completion: dict, field: str, i: int) -> float | None:
    score = _score(completion.get(field), f"completions[{i}].{field}")
    if score is None and field == "fine-grained_score":
        # Recompute from the aspect ratings, leaving out the "N/A" ones.
        annotations = completion.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise DataError(f"field 'completions[{i}].annotations': expected an object of aspect ratings, "
                            f"got {_got(annotations)}")
        ratings = [to_score(a.get("Rating")) for a in annotations.values() if isinstance(a, dict)]
        ratings = [r for r in ratings if r is not None]
        score = to_score(sum(ratings) / len(ratings)) if ratings else None  # None if the sum overflows
    return score


def _last_content(messages: list) -> str:
    return (messages[-1].get("content") or "") if messages else ""


def normalize_row(row: dict, fmt: str, *, score_field: str = "overall_score"):
    """``(prompt, responses, scores)`` of one row of schema ``fmt``.

    ``prompt`` is a string or a list of ``{role, content}`` messages, ``responses`` strings ("" when
    missing) and ``scores`` one finite float or None (unusable) per response, or ``scores`` is None when
    the row has a different number of scores than responses (which score belongs to which is unknown).
    Raises DataError naming the field when a field has the wrong type.
    """
    if fmt == "ultrafeedback":
        completions = _list(row.get("completions"), "completions", "objects", lambda c: isinstance(c, dict))
        return (_prompt(row.get("instruction"), "instruction"),
                [_text(c.get("response"), f"completions[{i}].response") for i, c in enumerate(completions)],
                [_ultrafeedback_score(c, score_field, i) for i, c in enumerate(completions)])
    if fmt in ("armorm", "responses"):
        rkey, skey = ("all_generated_responses", "all_rm_scores") if fmt == "armorm" else ("responses", "scores")
        responses = [r or "" for r in _list(row.get(rkey), rkey, "strings", lambda r: r is None or isinstance(r, str))]
        scores = _list(row.get(skey), skey, "numbers", lambda s: not isinstance(s, (list, tuple, dict)))
        scores = [to_score(s) for s in scores] if len(scores) == len(responses) else None
        return _prompt(row.get("prompt"), "prompt"), responses, scores
    if fmt == "binarized":
        chosen, rejected = _messages(row.get("chosen"), "chosen"), _messages(row.get("rejected"), "rejected")
        prompt = chosen[:-1] if len(chosen) > 2 else _prompt(row.get("prompt"), "prompt")  # multi-turn: the history
        return (prompt, [_last_content(chosen), _last_content(rejected)],
                [_score(row.get("score_chosen"), "score_chosen"), _score(row.get("score_rejected"), "score_rejected")])
    raise ValueError(f"unknown dataset format {fmt!r}; choose from {FORMATS}")


# ------------------------------------------------------------------------------------------- tokenizing
def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """Prompt ids through the chat template when the tokenizer has one, else the plain text after BOS."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateSyntaxError:  # the template's own fault, not the row's
            raise
        except TemplateError as e:  # e.g. a template that insists on alternating user/assistant turns
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"the tokenizer's chat template rejects the prompt: {reason}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m.get("content") or "" for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def unknown_token_id(tokenizer) -> int | None:
    """The id a tokenizer gives characters it cannot represent, or None. Byte-level tokenizers that reuse
    their unk token as BOS/EOS/padding (GPT-2) never produce it for text, so it says nothing there."""
    unk = tokenizer.unk_token_id
    return None if unk in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) else unk


def tokenize_row(row: dict, tokenizer, *, fmt: str, max_length: int, max_prompt_length: int,
                 min_responses: int = 2, skip_ties: bool = True, score_field: str = "overall_score",
                 min_kept_fraction: float = 0.5) -> dict:
    """Tokenize one row. Returns ``prompt_ids``, and ``response_ids`` / ``scores`` of the responses kept;
    ``dropped`` (a reason per dropped response), ``skip`` (the row's reason, "" when kept) and
    ``truncated`` (how many kept responses were cut to fit ``max_length``). Raises DataError (naming the
    field) when a field has the wrong type.
    """
    prompt, responses, scores = normalize_row(row, fmt, score_field=score_field)
    out = {"prompt_ids": [], "response_ids": [], "scores": [], "dropped": [], "skip": "", "truncated": 0}
    unk = unknown_token_id(tokenizer)
    empty = not prompt.strip() if isinstance(prompt, str) else not any(m.get("content") for m in prompt)
    full_prompt = [] if empty or scores is None else prompt_token_ids(tokenizer, prompt)
    if scores is None:
        out["skip"] = "scores_responses_length_mismatch"
    elif not full_prompt:
        # The first response token is predicted from the last prompt position: there must be one.
        out["skip"] = "empty_prompt"
    elif unk is not None and unk in full_prompt:
        out["skip"] = "prompt_unknown_tokens"
    if out["skip"]:
        return out
    prompt_ids = full_prompt[-max_prompt_length:]  # keep the end
    room = max(0, max_length - len(prompt_ids))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    copies = {}  # kept ids -> [(score, was cut)], in order of first appearance
    for text, score in zip(responses, scores):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        full = ids + eos
        kept = full[:room]
        reason = ("nan_or_missing_score" if score is None else "empty_response" if not ids
                  else "unknown_tokens" if unk is not None and unk in ids
                  else "truncated_to_nothing" if not kept
                  else "mostly_truncated" if len(kept) < min_kept_fraction * len(full) else "")
        if reason:
            out["dropped"].append(reason)
        else:
            copies.setdefault(tuple(kept), []).append((score, len(kept) < len(full)))
    for ids, same in copies.items():
        if len({s for s, _ in same}) > 1:
            # One token sequence with two scores: a preference between equal texts cannot be learnt.
            out["dropped"] += ["identical_texts_different_scores"] * len(same)
            continue
        out["dropped"] += ["duplicate"] * (len(same) - 1)
        out["response_ids"].append(list(ids))
        out["scores"].append(same[0][0])
        out["truncated"] += same[0][1]
    out["prompt_ids"] = prompt_ids
    if len(out["response_ids"]) < min_responses:
        out["skip"] = f"fewer_than_{min_responses}_responses"
    elif skip_ties and min_responses >= 2 and len(set(out["scores"])) == 1:
        out["skip"] = "all_scores_tied"
    return out


class _RowError(Exception):
    """A DataError of one row inside ``datasets.map``, with the row's position (picklable across processes)."""


def _source_row(ds, i: int) -> int:
    # A select / shuffle / train_test_split view maps positions to rows of the table it was loaded as (the
    # file): name that row, which the user can find.
    indices = getattr(ds, "_indices", None)
    return i if indices is None else indices.column(0)[i].as_py()


def prepare_dataset(raw, tokenizer, *, fmt: str | None = None, max_length: int = 1024,
                    max_prompt_length: int = 512, min_responses: int = 2, skip_ties: bool = True,
                    score_field: str = "overall_score", min_kept_fraction: float = 0.5,
                    num_proc: int | None = None, source: str = "dataset", log=print):
    """Tokenize a raw ``datasets.Dataset``; returns ``(dataset, counts)`` and logs the counts.

    ``counts`` maps ``"rows"``, ``"kept"``, ``"truncated_responses"`` (kept responses cut to fit
    ``max_length``), ``"response:<reason>"`` and ``"row:<reason>"`` to numbers. A field of the wrong type
    raises DataError naming ``source``, the row and the field.
    """
    import datasets

    fmt = fmt or detect_format(raw.column_names)
    missing = [c for c in SCHEMA_COLUMNS.get(fmt, ()) if c not in raw.column_names]
    if missing:
        raise DataError(f"{source}: the {fmt} schema needs the column(s) {', '.join(missing)}; "
                        f"the dataset has {', '.join(raw.column_names)}")
    if max_prompt_length > max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} exceeds max_length {max_length}")
    if not 0 <= min_kept_fraction <= 1:
        raise ValueError(f"min_kept_fraction must be in [0, 1], got {min_kept_fraction}")
    kwargs = dict(fmt=fmt, max_length=max_length, max_prompt_length=max_prompt_length, min_responses=min_responses,
                  skip_ties=skip_ties, score_field=score_field, min_kept_fraction=min_kept_fraction)

    def tokenize(row, i):
        try:
            return tokenize_row(row, tokenizer, **kwargs)
        except DataError as e:
            raise _RowError(i, str(e)) from None

    seq, value = datasets.Sequence, datasets.Value
    # Declared, not inferred: a first writer batch of skipped rows (empty lists) would fix the wrong types.
    features = datasets.Features({
        "prompt_ids": seq(value("int64")), "response_ids": seq(seq(value("int64"))), "scores": seq(value("float64")),
        "dropped": seq(value("string")), "skip": value("string"), "truncated": value("int64")})
    try:
        tok = raw.map(tokenize, with_indices=True, remove_columns=raw.column_names, features=features,
                      num_proc=num_proc, desc=f"tokenizing ({fmt})")
    except _RowError as e:
        raise DataError(f"{source} row {_source_row(raw, e.args[0])}, {e.args[1]}") from None
    counts = Counter({"rows": len(tok)})
    for reasons in tok["dropped"]:
        counts.update(f"response:{r}" for r in reasons)
    counts.update(f"row:{s}" for s in tok["skip"] if s)
    kept = tok.filter(lambda s: s == "", input_columns="skip")
    counts["kept"] = len(kept)
    counts["truncated_responses"] = sum(kept["truncated"])
    kept = kept.remove_columns(["dropped", "skip", "truncated"])
    if log is not None:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if ":" in k) or "none"
        log(f"data ({fmt}): {counts['rows']} rows, {counts['kept']} kept; skipped: {detail}; "
            f"truncated_responses={counts['truncated_responses']}")
    return kept, dict(counts)


# --------------------------------------------------------------------------------------------- batching
def collate(rows: list[dict], *, pad_id: int, ignore_index: int = IGNORE_INDEX) -> dict:
    """Pad a list of tokenized rows to ``[B, K, T]`` (K = most responses in the batch).

    ``labels[b, k, t]`` is the token predicted from position t, i.e. ``input_ids[b, k, t + 1]`` where that
    token is a response token, else ``ignore_index`` (prompt, padding, last position). ``scores`` is
    float64: any finite score a file holds fits (1e300 overflows float32); the losses rank scores in their
    own dtype.
    """
    B = len(rows)
    K = max(len(r["response_ids"]) for r in rows)
    T = max(len(r["prompt_ids"]) + len(resp) for r in rows for resp in r["response_ids"])
    input_ids = torch.full((B, K, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, K, T), dtype=torch.long)
    labels = torch.full((B, K, T), ignore_index, dtype=torch.long)
    scores = torch.zeros((B, K), dtype=torch.float64)
    response_mask = torch.zeros((B, K), dtype=torch.bool)
    has_ref = all("ref_logps" in r for r in rows)
    ref_logps = torch.zeros((B, K), dtype=torch.float32) if has_ref else None
    for b, r in enumerate(rows):
        p = list(r["prompt_ids"])
        for k, resp in enumerate(r["response_ids"]):
            ids = torch.tensor(p + list(resp), dtype=torch.long)
            n = ids.numel()
            input_ids[b, k, :n] = ids
            attention_mask[b, k, :n] = 1
            labels[b, k, len(p) - 1 : n - 1] = ids[len(p):]  # hidden[t] predicts token t + 1
            scores[b, k] = r["scores"][k]
            response_mask[b, k] = True
            if has_ref:
                ref_logps[b, k] = r["ref_logps"][k]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "scores": scores,
             "response_mask": response_mask}
    if has_ref:
        batch["ref_logps"] = ref_logps
    return batch


def make_batch(ds, indices, tokenizer, device) -> dict:
    """Rows ``indices`` of a tokenized dataset, collated and on ``device``."""
    cols = ds[list(indices)]  # one column read per field, not one row read per index
    batch = collate([dict(zip(cols, vals)) for vals in zip(*cols.values())], pad_id=tokenizer.pad_token_id)
    return {k: v.to(device) for k, v in batch.items()}


def batch_rows(ds, indices) -> list[dict]:
    """Rows ``indices`` of a tokenized dataset as a list of dicts, read one column at a time."""
    cols = ds[list(indices)]
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def steps_per_epoch(n_rows: int, global_batch_size: int) -> int:
    if n_rows < global_batch_size:
        raise DataError(f"{n_rows} training rows (after the skips counted above) are fewer than one global batch "
                        f"({global_batch_size})")
    return n_rows // global_batch_size


def global_batch_indices(n_rows: int, step: int, global_batch_size: int, seed: int) -> list[int]:
    """Row indices of optimizer step ``step`` (0-based): epoch-wise seeded shuffles, incomplete batch dropped.

    A pure function of its arguments, so the data order of a resumed run is that of an uninterrupted one.
    """
    spe = steps_per_epoch(n_rows, global_batch_size)
    epoch, pos = divmod(step, spe)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * global_batch_size : (pos + 1) * global_batch_size].tolist()


def micro_batch_indices(global_indices: list[int], micro_step: int, rank: int, world_size: int,
                        per_device_batch_size: int) -> list[int]:
    """This rank's share of micro-step ``micro_step``: the global batch is cut into (micro, rank) pieces."""
    start = (micro_step * world_size + rank) * per_device_batch_size
    return global_indices[start : start + per_device_batch_size]
