"""The one record schema every loader produces and training reads.

    {"id", "source", "instruction", "input", "output"}                  single turn
    {"id", "source", "instruction", "input", "output", "messages": [...]} multi-turn or with a system message
    {"id", "source", "text"}                                             plain text (continued pre-training)

`messages` is a list of {"role": "system" | "user" | "assistant", "content": str} ending with an assistant turn;
when present it is what trains (loss on every assistant turn), and `instruction`/`output` repeat its last user and
assistant turns so that single-turn tools still read the row. `meta` (optional) keeps a loader's extras, such as
a task name.
"""

from __future__ import annotations

from typing import Any

from daytune.errors import DataError

ROLES = ("system", "user", "assistant")


def make_record(
    *,
    source: str,
    id: str,
    instruction: str = "",
    input: str = "",
    output: str = "",
    messages: list[dict[str, str]] | None = None,
    text: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a record; a plain [user, assistant] conversation collapses to the single-turn form."""
    rec: dict[str, Any] = {"id": id, "source": source}
    if text is not None:
        rec["text"] = text
    elif messages is not None:
        if [m["role"] for m in messages] == ["user", "assistant"]:
            rec.update(instruction=messages[0]["content"], input="", output=messages[1]["content"])
        else:
            last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            last_assistant = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
            rec.update(instruction=last_user, input="", output=last_assistant, messages=messages)
    else:
        rec.update(instruction=instruction, input=input, output=output)
    if meta:
        rec["meta"] = meta
    return rec


def kind(rec: dict[str, Any]) -> str:
    if "text" in rec:
        return "text"
    return "chat" if rec.get("messages") else "instruction"


def record_text(rec: dict[str, Any]) -> str:
    """All the words of a record, for duplicate and contamination checks."""
    if "text" in rec:
        return rec["text"]
    if rec.get("messages"):
        return "\n".join(m["content"] for m in rec["messages"])
    return "\n".join(
        x for x in (rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")) if x
    )


def responses(rec: dict[str, Any]) -> list[str]:
    """The texts that carry loss."""
    if "text" in rec:
        return [rec["text"]]
    if rec.get("messages"):
        return [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
    return [rec.get("output", "")]


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate a conversation: known roles, string contents, at least one assistant turn, ending on one."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant message (nothing to train on)")
    return out


def text_field(obj: dict, key: str, where: str, required: bool) -> str:
    """A string field of a row; `where` (file:line) starts every error."""
    value = obj.get(key)
    if value is None:
        if required and key in obj:
            raise DataError(f"{where}: field '{key}' is null; expected a string")
        if required:
            keys = ", ".join(sorted(obj)) or "none"
            raise DataError(f"{where}: missing field '{key}' (fields present: {keys})")
        return ""  # an optional field (input) may be absent or null
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_record(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """A training row in daytune's schema (what `data prepare` writes, or a hand-written JSONL)."""
    rec: dict[str, Any] = {}
    for key in ("id", "source"):
        if obj.get(key) is not None:
            rec[key] = str(obj[key])
    if "text" in obj and "instruction" not in obj and "messages" not in obj:
        rec["text"] = text_field(obj, "text", where, True)
        return rec
    if obj.get("messages") is not None:
        rec["messages"] = check_messages(obj["messages"], where)
        rec["instruction"] = text_field(obj, "instruction", where, False)
        rec["input"] = text_field(obj, "input", where, False)
        rec["output"] = text_field(obj, "output", where, False)
        return rec
    rec["instruction"] = text_field(obj, "instruction", where, True)
    rec["input"] = text_field(obj, "input", where, False)
    rec["output"] = text_field(obj, "output", where, True)
    return rec
