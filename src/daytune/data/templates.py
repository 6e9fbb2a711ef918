"""Prompt templates. `render` splits a record into the prompt (masked from the loss) and the response (trained)."""

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


def user_message(record: dict[str, str]) -> str:
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


def render_prompt(record: dict[str, str], tokenizer, template: str, system_prompt: str | None = None) -> str:
    """The text the model sees before its answer (what a server prompt or an eval prompt looks like)."""
    if template == "alpaca":
        fmt = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        return fmt.format(instruction=record["instruction"], input=record.get("input", ""))
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "data.template: this model's tokenizer has no chat template; use template: alpaca"
            )
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_message(record)})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"data.template: unknown template {template!r} (use chat or alpaca)")


def render(
    record: dict[str, str], tokenizer, template: str, system_prompt: str | None = None
) -> tuple[str, str]:
    """(prompt, response) strings; prompt + response is exactly the training text."""
    prompt = render_prompt(record, tokenizer, template, system_prompt)
    if template == "alpaca":
        return prompt, record["output"] + (tokenizer.eos_token or "")
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
