"""Data formats: the one place to add a new one.

A format turns raw rows (from ``data.records``: ``.json``/``.jsonl``/``.csv``/``.parquet`` or a hub
dataset) into normalised records, and a normalised record into token ids and labels:

- ``detect(row)``: whether a row looks like this format (``--format auto``);
- ``validate(row, i, where)``: the normalised record, or the reason it is left out (``"empty"`` or
  ``"missing_field"``: counted and reported), or a :class:`UserError` for a malformed row;
- ``render(record, tokenizer)``: ``(input_ids, labels, prompt_len)``; labels are -100 where no loss is
  taken, and ``input_ids[:prompt_len]`` is the generation prompt of evaluation;
- ``reference(record)``: the text evaluation compares a generation with.

``alpaca`` is exactly the Stanford Alpaca prompt and tokenisation of earlier versions (byte-identical
ids and labels), ``prompt-completion`` maps two columns (optionally a ``{field}`` template for the
prompt), ``chat`` renders a ``messages`` list with the tokenizer's chat template, with the loss on
every assistant turn.
"""

from __future__ import annotations

import string
import sys

from oloraplus.data.records import (
    DataSource,
    check_unicode,
    format_prompt,
    local_data_file,
    read_source,
    records_sha256,
    resolve_data,
    validate_record,
)
from oloraplus.errors import UserError

FORMAT_CHOICES = ("auto", "alpaca", "prompt-completion", "chat")
DEFAULT_PROMPT_FIELD = "prompt"
DEFAULT_RESPONSE_FIELD = "completion"
ROLES = ("system", "user", "assistant")
SKIP_REASONS = ("empty", "missing_field")


class AlpacaFormat:
    name = "alpaca"

    def __init__(self, options: dict | None = None) -> None:
        self.options = options or {}

    @staticmethod
    def detect(row) -> bool:
        return isinstance(row, dict) and "instruction" in row and "output" in row

    def validate(self, row, i: int, where: str) -> dict:
        return validate_record(row, i, where)  # as always: a bad Alpaca record is an error

    @staticmethod
    def render(record: dict, tokenizer) -> tuple[list[int], list[int], int]:
        prompt_ids = tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        response_ids = response_ids + [tokenizer.eos_token_id]
        return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, len(prompt_ids)

    @staticmethod
    def reference(record: dict) -> str:
        return record["output"]


class PromptCompletionFormat:
    """``--prompt-field`` (or a ``--template`` with ``{field}`` slots) and ``--response-field``."""

    name = "prompt-completion"

    def __init__(self, options: dict | None = None) -> None:
        options = options or {}
        self.prompt_field = options.get("prompt_field") or DEFAULT_PROMPT_FIELD
        self.response_field = options.get("response_field") or DEFAULT_RESPONSE_FIELD
        self.template = options.get("template")
        self.slots = template_slots(self.template) if self.template is not None else [self.prompt_field]

    @staticmethod
    def detect(row) -> bool:
        return isinstance(row, dict) and DEFAULT_PROMPT_FIELD in row and DEFAULT_RESPONSE_FIELD in row

    def fields(self) -> list[str]:
        return [*self.slots, self.response_field]

    def validate(self, row, i: int, where: str):
        if not isinstance(row, dict):
            raise UserError(f"{where}: record {i} is a {type(row).__name__}, not an object")
        values = {}
        for key in self.fields():
            value = row.get(key)
            if value is None:
                return "missing_field"
            if not isinstance(value, str):
                value = str(value)  # numbers in a CSV/parquet column are text here
            check_unicode(value, where, i, key)
            values[key] = value
        prompt = self.template.format(**values) if self.template is not None else values[self.prompt_field]
        response = values[self.response_field]
        if not prompt.strip() or not response.strip():
            return "empty"
        return {"prompt": prompt, "response": response}

    @staticmethod
    def render(record: dict, tokenizer) -> tuple[list[int], list[int], int]:
        prompt_ids = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, len(prompt_ids)

    @staticmethod
    def reference(record: dict) -> str:
        return record["response"]


class ChatFormat:
    """A ``messages`` list of ``{role, content}`` (roles system, user, assistant), rendered with the
    tokenizer's chat template; the loss covers every assistant turn, system prompts are kept."""

    name = "chat"

    def __init__(self, options: dict | None = None) -> None:
        self.options = options or {}

    @staticmethod
    def detect(row) -> bool:
        return isinstance(row, dict) and "messages" in row

    def validate(self, row, i: int, where: str):
        if not isinstance(row, dict):
            raise UserError(f"{where}: record {i} is a {type(row).__name__}, not an object")
        messages = row.get("messages")
        if messages is None:
            return "missing_field"
        if not isinstance(messages, list):
            raise UserError(f"{where}: record {i} 'messages' is a {type(messages).__name__}, not a list of "
                            "{role, content} objects")
        clean = []
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise UserError(f"{where}: record {i} message {j} is malformed: each message must be an object "
                                "with a 'role' and a string 'content'")
            if message["role"] not in ROLES:
                raise UserError(f"{where}: record {i} message {j} has unknown role '{message['role']}' (roles: "
                                f"{', '.join(ROLES)})")
            check_unicode(message["content"], where, i, f"messages[{j}].content")
            clean.append({"role": message["role"], "content": message["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
            return "empty"  # nothing to learn
        return {"messages": clean}

    @staticmethod
    def render(record: dict, tokenizer) -> tuple[list[int], list[int], int]:
        messages = record["messages"]
        full = chat_ids(tokenizer, messages, False)
        labels = [-100] * len(full)
        prompt_len = 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(chat_ids(tokenizer, messages[:k], True, full))
            end = len(chat_ids(tokenizer, messages[: k + 1], False, full))
            labels[start:end] = full[start:end]
            prompt_len = start  # the last assistant turn's prompt: everything before it
        return full, labels, prompt_len

    @staticmethod
    def reference(record: dict) -> str:
        return [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool, full: list[int] | None = None) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (a prefix of ``full`` when given)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--format chat needs a tokenizer with a chat template; this model's tokenizer has none "
                        "(use --format prompt-completion, or a chat/instruct model)")
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if full is not None and full[: len(ids)] != ids:
        raise UserError("the tokenizer's chat template renders a conversation's first turns differently alone "
                        "than inside the whole conversation, so the assistant turns cannot be masked; use "
                        "--format prompt-completion")
    return ids


FORMATS = {f.name: f for f in (AlpacaFormat, PromptCompletionFormat, ChatFormat)}


def template_slots(template: str) -> list[str]:
    """The ``{field}`` slots of a ``--template`` (``str.format`` syntax; ``{{``/``}}`` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(f"--template {template!r} is not a valid template ({exc}); write {{field}} slots and "
                        "{{{{ }}}} for literal braces") from None
    slots = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise UserError(f"--template slot {{{name}}} must be a column name such as {{question}}")
        if name not in slots:
            slots.append(name)
    return slots


def get_format(name: str, options: dict | None = None):
    if name not in FORMATS:
        raise UserError(f"unknown --format '{name}': choose one of {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name](options)


def detect_format(rows, options: dict) -> str:
    """``--format auto``: chat for a ``messages`` column, prompt-completion when a column is mapped or
    ``prompt``/``completion`` are there, else alpaca (whose checks then name what is missing)."""
    first = rows[0] if isinstance(rows, list) and rows else None
    if ChatFormat.detect(first):
        return ChatFormat.name
    if any(options.get(k) for k in ("prompt_field", "response_field", "template")):
        return PromptCompletionFormat.name
    if PromptCompletionFormat.detect(first) and not AlpacaFormat.detect(first):
        return PromptCompletionFormat.name
    return AlpacaFormat.name


def load_data(data: str, format: str = "auto", prompt_field: str | None = None, response_field: str | None = None,
              template: str | None = None, split: str = "train") -> DataSource:
    """Read ``data`` (file or hub id), detect or check its format and validate every record.

    Records that are empty or lack a mapped field are left out and counted (``DataSource.skipped``);
    a file without one usable record is a :class:`UserError`. Alpaca data gives exactly the records
    of ``records.load_records``.
    """
    options = {"prompt_field": prompt_field, "response_field": response_field, "template": template}
    rows, source, sha = read_source(data, split)
    path = local_data_file(data)
    where = str(path) if path is not None else resolve_data(data)
    if not isinstance(rows, list):
        raise UserError(f"{where}: expected a JSON list of records, got {type(rows).__name__}")
    if not rows:
        raise UserError(f"{where}: holds no records")
    name = detect_format(rows, options) if format == "auto" else format
    fmt = get_format(name, options)
    records, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for i, row in enumerate(rows):
        record = fmt.validate(row, i, where)
        if isinstance(record, str):
            skipped[record] += 1
        else:
            records.append(record)
    if not records:
        raise UserError(no_usable_record(where, name, fmt, rows, skipped))
    if format == "auto" and name != AlpacaFormat.name:  # Alpaca runs log as they always did
        print(f"data: {where}: {name} format (detected; --format sets it)", file=sys.stderr, flush=True)
    return DataSource(records, source, sha, format=name, skipped=skipped, records_sha256=records_sha256(records))


def no_usable_record(where: str, name: str, fmt, rows: list, skipped: dict) -> str:
    columns = sorted({key for row in rows if isinstance(row, dict) for key in row})
    if skipped["missing_field"] and name == PromptCompletionFormat.name:
        missing = [f for f in fmt.fields() if not any(isinstance(r, dict) and r.get(f) is not None for r in rows)]
        if fmt.template is not None and any(m in fmt.slots for m in missing):
            return (f"{where}: --template slot {{{[m for m in missing if m in fmt.slots][0]}}} is not a column "
                    f"(columns: {', '.join(columns)})")
        return (f"{where}: no record has the column '{missing[0] if missing else fmt.fields()[0]}' (columns: "
                f"{', '.join(columns)}); set --prompt-field / --response-field")
    if skipped["missing_field"]:
        return f"{where}: no record has a 'messages' list (columns: {', '.join(columns)}); set --format"
    return f"{where}: no usable record: all {len(rows)} are empty ({name} format)"
