"""llama.cpp's own tools, run from their own venv: `convert_hf_to_gguf.py` (HF folder -> f16/q8_0 GGUF) and the
quantizer (`llama_model_quantize` of the llama.cpp library, through llama-cpp-python) for the k-quants.

They live apart from daytune's venv because llama.cpp pins its converter's dependencies (transformers, numpy) and
compiles from source: `make llama-venv` builds llama-cpp-python from the package index's sources and keeps the
llama.cpp tree it vendors (`<venv>/llama.cpp`: the converter, its `gguf-py`), so the converter, the quantizer and
the library that loads the result are one llama.cpp version.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from daytune.errors import ModelError

VENV_ENV = "DAYTUNE_LLAMA_VENV"
VENV_NAME = ".venv-llama"
# --quant -> (what the converter writes, the llama.cpp file type the quantizer then makes of it, or None)
QUANTS = {"f16": ("f16", None), "q8_0": ("q8_0", None), "q4_k_m": ("f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M")}

_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp venv: its Python (with llama_cpp and the converter's dependencies) and llama.cpp's sources."""

    venv: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def converter(self) -> Path:
        return self.venv / "llama.cpp" / "convert_hf_to_gguf.py"

    def version(self) -> str:
        """llama-cpp-python's version, which names the llama.cpp it vendors."""
        src = sorted(p for p in (self.venv / "src").glob("llama_cpp_python-*") if p.is_dir())
        return src[-1].name.replace("_", "-") if src else "unknown"

    def _run(self, args: list[str], what: str) -> str:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)  # daytune's own path must not shadow the converter's packages
        proc = subprocess.run([str(self.python), *args], capture_output=True, text=True, env=env, check=False)
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise ModelError(f"{what} failed ({self.version()}): {_reason(output)}")
        return output

    def supported_architectures(self) -> set[str]:
        """The HF architectures (config.json `architectures`) this converter knows."""
        out = self._run([str(self.converter), "--print-supported-models"], "llama.cpp's converter")
        text = out.split("TEXT models:", 1)[-1].split("MMPROJ models:", 1)[0]
        return set(re.findall(r"^\s*- (\S+)$", text, flags=re.MULTILINE))

    def convert(self, hf_dir: Path, outfile: Path, outtype: str, metadata: Path, log=print) -> None:
        log(f"Converting with llama.cpp's convert_hf_to_gguf.py (--outtype {outtype})...")
        self._run(
            [str(self.converter), str(hf_dir), "--outtype", outtype, "--outfile", str(outfile),
             "--metadata", str(metadata)],
            "llama.cpp's convert_hf_to_gguf.py",
        )  # fmt: skip

    def quantize(self, infile: Path, outfile: Path, ftype: str, log=print) -> None:
        log(f"Quantizing with llama.cpp's quantizer ({ftype})...")
        self._run(["-c", _QUANTIZE, str(infile), str(outfile), ftype], "llama.cpp's quantizer")


def _reason(output: str) -> str:
    """The converter's own complaint, or the last lines of its output."""
    for pattern, text in (
        (r"Model (\S+) is not supported", "llama.cpp's converter does not know the architecture {0}"),
        (
            r"BPE pre-tokenizer was not recognized",
            "llama.cpp's converter does not recognize this model's tokenizer (its BPE pre-tokenizer is not in "
            "the converter's list), so llama.cpp could not tokenize like it",
        ),
    ):
        found = re.search(pattern, output)
        if found:
            return text.format(*found.groups())
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-600:] or "no output"


def _default_venvs() -> list[Path]:
    repo = Path(__file__).resolve().parents[3]  # src/daytune/train/ -> the checkout daytune runs from
    return [Path.cwd() / VENV_NAME] + ([repo / VENV_NAME] if (repo / "pyproject.toml").is_file() else [])


def find_llama_cpp() -> LlamaCpp:
    """The llama.cpp venv: $DAYTUNE_LLAMA_VENV, else .venv-llama here or in daytune's checkout."""
    given = os.environ.get(VENV_ENV)
    candidates = [Path(given).expanduser()] if given else _default_venvs()
    for venv in candidates:
        tools = LlamaCpp(venv.absolute())
        if tools.python.is_file() and tools.converter.is_file():
            return tools
    where = f"${VENV_ENV}={given}" if given else " or ".join(str(c) for c in candidates)
    raise ModelError(
        f"GGUF export needs llama.cpp's converter and quantizer, not found at {where}: run `make llama-venv` in "
        f"daytune's checkout (builds llama-cpp-python from source, several minutes), or set ${VENV_ENV} to "
        "such a venv"
    )
