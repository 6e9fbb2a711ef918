"""`daytune export --format gguf`: a trained model as one GGUF file for llama.cpp, Ollama and LM Studio.

The adapter is merged into an fp32 copy of the base, saved as an HF folder, converted by llama.cpp's own
`convert_hf_to_gguf.py` (f16, q8_0) and, for k-quants, quantized by llama.cpp's own quantizer (see llama_cpp.py).
The converter writes the tokenizer and chat template; daytune then adds what the file should say about where it
came from (`general.license`, `daytune.*`) by copying it once with the `gguf` package's metadata writer (as
llama.cpp's gguf-new-metadata does), checks the keys, and writes an Ollama Modelfile and a README beside it. All of
it is built in a hidden folder and renamed into place: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from daytune.errors import ModelError
from daytune.fileio import replace_dir_atomic, sha256_file, temp_dir_beside
from daytune.models import ModelSource, load_for_inference, load_tokenizer, resolve_model
from daytune.models.registry import loadable_model
from daytune.train.llama_cpp import QUANTS, LlamaCpp, find_llama_cpp
from daytune.train.ollama import match_chat_family, modelfile


def export_gguf(source: ModelSource, out: Path, quant: str, *, log=print) -> Path:
    """Merge, convert, quantize, label and check; then write the Modelfile, README and export.json."""
    if quant not in QUANTS:
        raise ModelError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    tools = find_llama_cpp()
    t0 = time.monotonic()
    tmp = temp_dir_beside(out)
    try:
        _check_architecture(tools, source, log)
        hf_dir = tmp / "hf"
        tokenizer = _merged_folder(source, hf_dir, log)
        base = base_facts(source.model)
        if not base["licence"]:
            log(f"warning: no licence known for {source.model}: the GGUF will have no general.license")
        stem = _stem(source)
        name = f"{stem}-{quant}.gguf"
        outtype, ftype = QUANTS[quant]
        converted = tmp / f"converted-{outtype}.gguf"
        meta = tmp / "metadata.json"
        meta.write_text(json.dumps(_general(stem, source, base)), encoding="utf-8")
        tools.convert(hf_dir, converted, outtype, meta, log=log)
        if ftype is not None:
            quantized = tmp / f"quantized-{quant}.gguf"
            tools.quantize(converted, quantized, ftype, log=log)
            converted.unlink()
            converted = quantized
        labels = _daytune_keys(source, base, quant, tools)
        log("Writing the base model, licence and run into the GGUF's metadata...")
        _relabel(converted, tmp / name, labels, tokenizer.chat_template)
        converted.unlink()
        check_gguf(tmp / name, labels, tokenizer.chat_template)
        shutil.rmtree(hf_dir)
        meta.unlink()
        match = match_chat_family(tokenizer)
        eos = [tokenizer.eos_token] if tokenizer.eos_token else []
        (tmp / "Modelfile").write_text(modelfile(name, match, eos), encoding="utf-8")
        record = {
            "format": "gguf",
            "file": name,
            "quant": quant,
            "bytes": (tmp / name).stat().st_size,
            "sha256": sha256_file(tmp / name),
            "base_model": source.model,
            "base_hub_id": base["hub_id"],
            "licence": base["licence"],
            "run_id": source.run_id,
            "trained": str(source.trained) if source.trained else None,
            "chat_format": match.family.name if match else None,
            "llama_cpp": tools.version(),
            "seconds": round(time.monotonic() - t0, 1),
        }
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_readme(record, stem), encoding="utf-8")
        replace_dir_atomic(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / name


def _merged_folder(source: ModelSource, hf_dir: Path, log):
    """The model with its adapter merged, as an fp32 HF folder with the tokenizer the run trained with."""
    import torch

    log(f"Loading {source.model}{' and merging ' + str(source.trained) if source.trained else ''} (fp32)...")
    model, tokenizer, _ = load_for_inference(source, merge=True, dtype=torch.float32, log=log)
    if source.trained and (source.trained / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(source.trained)
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    del model
    # transformers 5 saves its tokenizers as class TokenizersBackend, which the converter's transformers 4 does not
    # know; PreTrainedTokenizerFast reads the same tokenizer.json.
    config_file = hf_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return tokenizer


def _check_architecture(tools: LlamaCpp, source: ModelSource, log) -> None:
    """Refuse before merging (minutes for a 7B) what the converter would refuse after."""
    folder = source.trained if source.trained and (source.trained / "config.json").is_file() else None
    folder = folder or resolve_model(source.model, log=log)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    known = tools.supported_architectures()
    unknown = [a for a in archs if a not in known]
    if not archs or unknown:
        raise ModelError(
            f"llama.cpp's converter ({tools.version()}) does not know the architecture "
            f"{', '.join(unknown or ['(none in config.json)'])}; it cannot become a GGUF"
        )


def _stem(source: ModelSource) -> str:
    """The file's name: the run id, else the base model's (and the adapter folder's) name."""
    path = Path(source.model)
    raw = source.model if loadable_model(source.model) else path.stem if path.suffix == ".gguf" else path.name
    if source.trained and not source.run_id:
        raw = f"{raw}-{source.trained.name}"
    raw = source.run_id or raw
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip("-.") or "model"


def _spdx(licence: str | None) -> str | None:
    """HF model cards and GGUF files spell licence ids in lower case (apache-2.0); longer names stay as they are."""
    return licence.lower() if licence and " " not in licence else licence


def base_facts(model: str) -> dict:
    """The base model's name, hub id and licence, from the registry, a GGUF's metadata or a folder's model card."""
    known = loadable_model(model)
    if known is not None:
        return {"name": known.name, "hub_id": known.hub_id, "licence": _spdx(known.licence)}
    path = Path(model).expanduser()
    name = path.stem if path.suffix == ".gguf" else path.name or model
    facts = {"name": name, "hub_id": None, "licence": None}
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        for key, what in (("general.license", "licence"), ("daytune.base_hub_id", "hub_id")):
            if key in fields:
                facts[what] = fields[key].contents()
    elif (path / "README.md").is_file():
        card = _model_card(path / "README.md")
        facts["licence"] = _spdx(card.get("license"))
        base = card.get("base_model")
        facts["hub_id"] = base[0] if isinstance(base, list) and base else base
    elif not path.exists() and "/" in model:
        facts["hub_id"] = model
    return facts


def _model_card(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        card = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return card if isinstance(card, dict) else {}


def _general(stem: str, source: ModelSource, base: dict) -> dict:
    """The converter's metadata override (its `--metadata` file): name, description and the base model."""
    entry = {"name": base["hub_id"].split("/")[-1] if base["hub_id"] else base["name"]}
    if base["hub_id"]:
        entry["organization"] = base["hub_id"].split("/")[0]
        entry["repo_url"] = f"https://huggingface.co/{base['hub_id']}"
    if source.run_id or source.trained:
        tuned = f"run {source.run_id}" if source.run_id else f"adapter {source.trained}"
        description = f"{entry['name']} fine-tuned with daytune ({tuned})"
    else:
        description = entry["name"]
    return {"general.name": stem, "general.description": description, "general.base_models": [entry]}


def _daytune_keys(source: ModelSource, base: dict, quant: str, tools: LlamaCpp) -> dict[str, str]:
    keys = {
        "daytune.base_model": source.model,
        "daytune.quant": quant,
        "daytune.converter": tools.version(),
    }
    if base["hub_id"]:
        keys["daytune.base_hub_id"] = base["hub_id"]
    if base["licence"]:
        keys["general.license"] = base["licence"]
    if source.run_id:
        keys["daytune.run_id"] = source.run_id
    if source.trained:
        keys["daytune.adapter"] = source.trained.name
    return keys


def _relabel(src: Path, dst: Path, keys: dict[str, str], chat_template: str | None) -> None:
    """Copy `src` to `dst` with `keys` set (and the chat template, if the converter left it out): the copy
    llama.cpp's gguf-new-metadata makes, key by key and tensor by tensor."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader = GGUFReader(src, "r")
    new = dict(keys)
    if chat_template and Keys.Tokenizer.CHAT_TEMPLATE not in reader.fields:
        new[Keys.Tokenizer.CHAT_TEMPLATE] = chat_template
    arch = reader.fields[Keys.General.ARCHITECTURE].contents()
    writer = GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    if (
        Keys.General.ALIGNMENT in reader.fields
    ):  # the writer pads tensors by its own alignment: keep the file's
        writer.add_custom_alignment(int(reader.fields[Keys.General.ALIGNMENT].contents()))
    skip = {Keys.General.ARCHITECTURE, Keys.General.ALIGNMENT, *new}
    for field in reader.fields.values():
        if field.name in skip or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, value in new.items():
        writer.add_string(key, value)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def check_gguf(path: Path, keys: dict[str, str], chat_template: str | None) -> dict:
    """Read the file back: it must carry the labels, the tokenizer and the model's chat template."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    meta = {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.")}
    wanted = {**keys, "general.base_model.0.name": None, "tokenizer.ggml.model": None}
    missing = [k for k in wanted if k not in fields]
    wrong = [k for k, v in keys.items() if k in meta and meta[k] != v]
    if "tokenizer.ggml.tokens" not in fields:
        missing.append("tokenizer.ggml.tokens")
    if chat_template and meta.get("tokenizer.chat_template") != chat_template:
        wrong.append("tokenizer.chat_template")
    if missing or wrong:
        raise ModelError(f"{path}: the written GGUF lacks {missing} or has other values for {wrong}")
    return meta


def _readme(record: dict, stem: str) -> str:
    file, tag = record["file"], Path(record["file"]).stem.lower()
    origin = f"run `{record['run_id']}`" if record["run_id"] else f"`{record['trained'] or 'the base model'}`"
    return f"""# {file}

Exported by daytune from {origin} on `{record["base_model"]}` (licence: {record["licence"] or "unknown"}):
the adapter merged into the weights, converted and quantized ({record["quant"]}) by llama.cpp's own tools
({record["llama_cpp"]}). {record["bytes"] / 2**20:.1f} MiB, sha256 `{record["sha256"]}`.

The file carries the tokenizer and the chat template (`tokenizer.chat_template`), the base model
(`general.base_model.*`), the licence (`general.license`) and where it came from (`daytune.*`).

- **Ollama**: `ollama create {tag} -f Modelfile && ollama run {tag}` (the Modelfile has the chat template as a Go
  template{" (" + record["chat_format"] + ")" if record["chat_format"] else ""} and the stop tokens)
- **llama.cpp**: `llama-cli -m {file} -cnv` or `llama-server -m {file} --jinja` (OpenAI-style API on port 8080).
  On a CPU with AMX (Xeon Sapphire Rapids and later) llama.cpp builds with AMX can crash on quantized files in
  `ggml_backend_amx_mul_mat` (llama.cpp issue 20824): add `--no-repack`
- **LM Studio**: `lms import {file}`, or drop the file into its models folder
- **Python**: `from llama_cpp import Llama; Llama("{file}").create_chat_completion(messages=[...])`
- **daytune**: `daytune serve --model {file}` (the competition API)
"""
