"""Run by the llama.cpp venv's Python (make llama-venv), not by pytest: load a GGUF with llama-cpp-python and report
what llama.cpp makes of it, as JSON on stdout.

argv[1]: a JSON file {"gguf": path, "texts": [str], "n": int, "messages": [[{role, content}]], "score": [[ids]],
"logits_dir": path}. Answers: load seconds, whether ggml repacked the weights, the metadata, llama.cpp's tokens for each text, its greedy continuation
of each (n tokens, end-of-text not special-cased), each conversation rendered by the file's chat template through
llama-cpp-python's Jinja formatter and through llama.cpp's own C++ template engine; and for each `score` sequence
the logits at every position, saved as logits_dir/<i>.npy.
"""

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter


def native_chat(model, messages) -> str | None:
    """llama.cpp's built-in renderer (llama_chat_apply_template) with the model's template."""
    template = llama_cpp.llama_model_chat_template(model, None)
    if template is None:
        return None
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
    return buf.raw[:n].decode("utf-8") if n >= 0 else None


def amx_cpu() -> bool:
    try:
        return " amx_int8" in open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False


def without_repacking() -> None:
    """Load the weights as the file stores them (llama-cli's --no-repack): on a CPU with AMX, ggml moves quantized
    weights into its AMX layout, and its AMX matmul crashes there on q8_0 and q4_k_m files, ours and others'
    (ggml_backend_amx_mul_mat; llama.cpp issue 20824, open). What is checked here is the file, not that kernel."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


def main() -> None:
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    repack = not amx_cpu()
    if not repack:
        without_repacking()
    t0 = time.monotonic()
    llm = llama_cpp.Llama(job["gguf"], n_ctx=512, n_threads=2, seed=0, logits_all=True, verbose=False)
    load_seconds = time.monotonic() - t0
    for i, seq in enumerate(job.get("score", [])):
        llm.reset()
        llm.eval(seq)
        np.save(f"{job['logits_dir']}/{i}.npy", np.array(llm.scores[: len(seq)], dtype=np.float32))
    meta = dict(llm.metadata)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
    tokens, greedy = [], []
    for text in job["texts"]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        tokens.append(ids)
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) >= job["n"]:
                break
        greedy.append(out)
    vocab = llm._model.vocab
    bos = llama_cpp.llama_token_get_text(vocab, llm.token_bos()).decode() if llm.token_bos() >= 0 else ""
    eos = llama_cpp.llama_token_get_text(vocab, llm.token_eos()).decode() if llm.token_eos() >= 0 else ""
    template = meta.get("tokenizer.chat_template")
    jinja = [
        Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=m).prompt if template else None
        for m in job["messages"]
    ]
    native = [native_chat(llm._model.model, m) for m in job["messages"]]
    print(
        json.dumps(
            {
                "load_seconds": load_seconds,
                "repacked": repack,
                "metadata": meta,
                "tokens": tokens,
                "greedy": greedy,
                "chat_jinja": jinja,
                "chat_native": native,
            }
        )
    )


if __name__ == "__main__":
    main()
