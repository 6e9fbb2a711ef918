"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go template syntax, and its stop tokens.

Ollama cannot run a Jinja chat template, so the Modelfile needs the same prompt written as a Go template. Rather
than translate Jinja, daytune knows a few turn formats (a turn is an opener naming the role, the content, a closer)
and accepts one only when it renders exactly what the model's own template renders for probe conversations
(`match_chat_family`). A template that also inserts a default system prompt when there is none (SmolLM2, Qwen)
gets that prompt as the Modelfile's SYSTEM, which Ollama prepends the same way. A template that matches no format
gets no TEMPLATE line: Ollama then picks one from the GGUF's `tokenizer.chat_template`, if it recognizes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Probe conversations: contents that no template transforms (no surrounding whitespace, no markup).
PROBE_SYSTEM = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
]
PROBE_CHAT = PROBE_SYSTEM[1:]
PROBE_ONE = PROBE_SYSTEM[1:2]


@dataclass(frozen=True)
class ChatFamily:
    """A turn format: each message is `opener(role) + content + closer`; the prompt ends with the assistant's
    opener. `roles` renames roles as the format spells them (Gemma's assistant is `model`)."""

    name: str
    opener: str  # with {role}
    closer: str
    stops: tuple[str, ...]
    system: bool = True  # the format has a system turn
    roles: dict[str, str] = field(default_factory=dict)

    def turn_open(self, role: str) -> str:
        return self.opener.format(role=self.roles.get(role, role))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(self.turn_open(m["role"]) + m["content"] + self.closer for m in messages)
        return text + (self.turn_open("assistant") if add_generation_prompt else "")

    def go_template(self) -> str:
        """The same format as an Ollama TEMPLATE over `.Messages`, ending with the assistant's opener."""
        role = "{{ .Role }}"
        for hf_role, spelled in self.roles.items():
            role = f'{{{{ if eq .Role "{hf_role}" }}}}{spelled}{{{{ else }}}}{role}{{{{ end }}}}'
        turn = self.opener.format(role=role) + "{{ .Content }}" + self.closer
        return "{{- range .Messages }}" + turn + "{{ end }}" + self.turn_open("assistant")


FAMILIES = (
    ChatFamily("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>")),
    ChatFamily("phi-3", "<|{role}|>\n", "<|end|>\n", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")),
    ChatFamily(
        "gemma",
        "<start_of_turn>{role}\n",
        "<end_of_turn>\n",
        ("<start_of_turn>", "<end_of_turn>"),
        system=False,
        roles={"assistant": "model"},
    ),
)


@dataclass(frozen=True)
class ChatMatch:
    family: ChatFamily
    default_system: str | None  # what the template inserts when a conversation has no system message
    bos: str  # what the template writes first that the tokenizer adds by itself (a BOS token), or ""


def _render(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a role (Gemma: no system) or fails on the probe
        return None


def match_chat_family(tokenizer) -> ChatMatch | None:
    """The known turn format that renders exactly what `tokenizer`'s chat template renders, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    for family in FAMILIES:
        match = _match(tokenizer, family, bos if adds_bos else "")
        if match is not None:
            return match
    return None


def _match(tokenizer, family: ChatFamily, bos: str) -> ChatMatch | None:
    def hf(messages) -> str | None:
        text = _render(tokenizer, messages)
        if text is None or not text.startswith(bos):
            return None
        return text[len(bos) :]

    if family.system and hf(PROBE_SYSTEM) != family.render(PROBE_SYSTEM):
        return None
    default = _default_system(family, hf(PROBE_ONE))
    head = [{"role": "system", "content": default}] if default is not None else []
    for probe in (PROBE_ONE, PROBE_CHAT):
        if hf(probe) != family.render(head + probe):
            return None
    return ChatMatch(family, default, bos)


def _default_system(family: ChatFamily, one: str | None) -> str | None:
    """The system prompt a template inserts into a conversation without one (`one`: a single user turn)."""
    head, tail = family.turn_open("system"), family.closer + family.render(PROBE_ONE)
    if not family.system or one is None or not (one.startswith(head) and one.endswith(tail)):
        return None
    return one[len(head) : len(one) - len(tail)]


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError(f'cannot write {text!r} in a Modelfile: it contains """')
    return f'"""{text}"""'


def modelfile(gguf_name: str, match: ChatMatch | None, eos_tokens: list[str]) -> str:
    """The Modelfile beside the GGUF: FROM, TEMPLATE and SYSTEM when the format is known, and stop tokens."""
    lines = [f"FROM ./{gguf_name}"]
    stops = list(match.family.stops) if match else []
    if match is not None:
        lines.append(f"TEMPLATE {_quoted(match.family.go_template())}")
        if match.default_system is not None:
            lines.append(f"SYSTEM {_quoted(match.default_system)}")
    else:
        lines.append(
            "# No TEMPLATE: the model's chat template is none of the formats daytune writes as a Go template "
            f"({', '.join(f.name for f in FAMILIES)}); Ollama takes it from the GGUF's tokenizer.chat_template "
            "when it recognizes it, else add one by hand."
        )
    stops += [t for t in eos_tokens if t and t not in stops]
    lines += [f'PARAMETER stop "{s}"' for s in stops if '"' not in s and "\n" not in s]
    return "\n".join(lines) + "\n"
