"""A small renderer for the part of Go's text/template that Ollama Modelfile templates use here, to check what the
Modelfile's TEMPLATE renders: text, `{{ .Field }}`, `{{ range .Messages }}`, `{{ if eq .Field "x" }}`/`{{ if
.Field }}` with `{{ else }}`, `{{ end }}`, and the `{{-`/`-}}` whitespace trims. Anything else raises."""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip())
    parts.append(("text", template[pos:]))
    return [p for p in parts if p != ("text", "")]


def _parse(tokens: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int]:
    """Nodes until one of `stop` (an action), returning (nodes, index of the stopping action)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
        elif value in stop:
            return nodes, i
        elif value.startswith("range "):
            body, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", value[6:].strip(), body))
        elif value.startswith("if "):
            then, i = _parse(tokens, i + 1, ("else", "end"))
            other = []
            if tokens[i][1] == "else":
                other, i = _parse(tokens, i + 1, ("end",))
            nodes.append(("if", value[3:].strip(), then, other))
        elif value.startswith("."):
            nodes.append(("field", value[1:]))
        else:
            raise ValueError(f"unsupported template action {{{{ {value} }}}}")
        i += 1
    if stop:
        raise ValueError(f"template ends before {{{{ {stop[-1]} }}}}")
    return nodes, i


def _field(dot: dict, name: str):
    if name not in dot:
        raise KeyError(f".{name}")
    return dot[name]


def _cond(expr: str, dot: dict) -> bool:
    m = re.fullmatch(r'eq \.(\w+) "([^"]*)"', expr)
    if m:
        return _field(dot, m.group(1)) == m.group(2)
    m = re.fullmatch(r"\.(\w+)", expr)
    if m:
        return bool(_field(dot, m.group(1)))
    raise ValueError(f"unsupported condition {expr!r}")


def _run(nodes: list, dot: dict) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_field(dot, node[1])))
        elif node[0] == "range":
            for item in _field(dot, node[1].lstrip(".")):
                out.append(_run(node[2], item))
        elif node[0] == "if":
            out.append(_run(node[2] if _cond(node[1], dot) else node[3], dot))
    return "".join(out)


def render(template: str, dot: dict) -> str:
    nodes, _ = _parse(_lex(template), 0, ())
    return _run(nodes, dot)


def ollama_chat(template: str, system: str | None, messages: list[dict]) -> str:
    """What Ollama renders for a chat request: the Modelfile's SYSTEM goes first unless the request has a system
    message; messages expose .Role and .Content."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render(template, {"Messages": msgs, "System": system or ""})
