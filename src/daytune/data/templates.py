"""Prompt templates: `chat` (the model's own), `alpaca`, and `plain` (the record's text as an evaluation prompt is
written, no roles: what HELM's scenarios and the unseen-task suite send). `render_segments` splits a record into the spans the model sees, each marked trained or
masked: for a single-turn record the prompt (masked) and the response (trained); for a conversation every
assistant turn is trained and everything else (system, user turns, the template's role markers) is masked; plain
text is trained whole."""

from __future__ import annotations

from daytune.errors import ConfigError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _sentence(text: str) -> str:
    """Tk-Instruct ends each field with a full stop when it has no punctuation of its own."""
    import string

    text = text.strip()
    return text if not text or text[-1] in string.punctuation else text + "."


def tk_instruct_prompt(definition: str, positives: list[dict], text: str, shots: int) -> str:
    """Super-NaturalInstructions' Tk-Instruct encoding (Wang et al. 2022): "Definition: ...", `shots` of the
    task's Positive Examples, then "Now complete the following example -\nInput: ...\nOutput:". The unseen-task
    suite prompts with it, and a data recipe can train with it (sni `prompt: tk-instruct`, template plain)."""
    parts = [f"Definition: {_sentence(definition)}\n\n"]
    for i, ex in enumerate(positives[:shots], start=1):
        ex_in, ex_out = _sentence(str(ex.get("input", ""))), _sentence(str(ex.get("output", "")))
        parts.append(f"Positive Example {i} -\nInput: {ex_in}\nOutput: {ex_out}\n\n")
    parts.append(f"Now complete the following example -\nInput: {_sentence(text)}\nOutput:")
    return "".join(parts)


def _plain_separator(prompt: str) -> str:
    """What joins a plain prompt to its answer: nothing after whitespace, a space after a colon ("Output: yes",
    as an evaluation prompt is continued), else a newline."""
    if not prompt or prompt[-1].isspace():
        return ""
    return " " if prompt.endswith(":") else "\n"


def user_message(record: dict[str, str]) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def render_prompt(record: dict[str, str], tokenizer, template: str, system_prompt: str | None = None) -> str:
    """The text the model sees before its answer (what a server prompt or an eval prompt looks like)."""
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        return fmt.format(instruction=record["instruction"], input=record.get("input", ""))
    if template == "plain":
        return user_message(record)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.template: this model's tokenizer has no chat template; use template: alpaca"
            )
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_message(record)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"data.template: unknown template {template!r} (use chat, alpaca or plain)")


def render(
    record: dict[str, str], tokenizer, template: str, system_prompt: str | None = None
) -> tuple[str, str]:
    """(prompt, response) strings; prompt + response is exactly the training text."""
    prompt = render_prompt(record, tokenizer, template, system_prompt)
    if template == "alpaca":
        return prompt, record["output"] + (tokenizer.eos_token or "")
    if template == "plain":
        return prompt, _plain_separator(prompt) + record["output"] + (tokenizer.eos_token or "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [
        {"role": "user", "content": user_message(record)},
        {"role": "assistant", "content": record["output"]},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            "data.template: the chat template renders the prompt differently with and without the answer"
        )
    return prompt, full[len(prompt) :]


def _chat_messages(record: dict, system_prompt: str | None) -> list[dict[str, str]]:
    messages = list(record["messages"])
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Render the conversation one assistant turn at a time; each turn is what the longer rendering adds."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.template: this model's tokenizer has no chat template; use template: alpaca")
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(
                "data.template: the chat template renders earlier turns differently once later turns are added "
                "(for example it drops or rewrites past turns), so the loss mask cannot be placed; train "
                "multi-turn data with a prefix-consistent template or template: alpaca"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]


def _alpaca_chat_segments(messages: list[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    """Alpaca for conversations: the system message (or Alpaca's header) once, then Instruction/Response pairs."""
    header = ALPACA_NO_INPUT.split("\n\n### Instruction:")[0]
    if messages[0]["role"] == "system":
        header, messages = messages[0]["content"], messages[1:]
    segments: list[tuple[str, bool]] = []
    pending = header + "\n\n"
    for m in messages:
        if m["role"] == "user":
            pending += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            segments += [(pending, False), (m["content"] + eos, True)]
            pending = "\n\n"
    return [(text, trained) for text, trained in segments if text]


def _plain_chat_segments(messages: list[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    """Plain for conversations: no roles, turns one after another separated by a blank line, assistant turns
    trained (each ending with EOS)."""
    segments: list[tuple[str, bool]] = []
    pending = ""
    for m in messages:
        if m["role"] == "assistant":
            segments += [(pending, False), (m["content"] + eos, True)]
            pending = "\n\n"
        else:
            pending += m["content"] + "\n\n"
    return [(text, trained) for text, trained in segments if text]


def render_segments(
    record: dict, tokenizer, template: str, system_prompt: str | None = None
) -> list[tuple[str, bool]]:
    """[(text, trained)] whose concatenation is exactly the training text of `record`."""
    if "text" in record:
        return [(record["text"] + (tokenizer.eos_token or ""), True)]
    if record.get("messages"):
        messages = _chat_messages(record, system_prompt)
        if template == "chat":
            return _chat_segments(messages, tokenizer)
        if template == "alpaca":
            return _alpaca_chat_segments(messages, tokenizer.eos_token or "")
        if template == "plain":
            return _plain_chat_segments(messages, tokenizer.eos_token or "")
        raise ConfigError(f"data.template: unknown template {template!r} (use chat, alpaca or plain)")
    prompt, response = render(record, tokenizer, template, system_prompt)
    return [(prompt, False), (response, True)]
