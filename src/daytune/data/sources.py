"""The sources daytune knows: where each dataset comes from, under which licence, and who wrote it.

A data recipe may only mix a source whose provenance is known: a registered one below, or a local file the user
declares (licence, commercial use, human-written or LLM-generated, citation). The gate in `check_provenance`
refuses what the recipe's rules disallow, before any data is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from daytune.errors import ConfigError


@dataclass(frozen=True)
class Provenance:
    licence: str
    commercial: bool  # may a model trained on it be used commercially under this licence?
    llm_generated: bool  # were the responses written by a language model (rather than people)?
    citation: str
    url: str = ""


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    format: str  # the loader (see loaders.FORMATS)
    provenance: Provenance
    hub_id: str | None = None  # Hugging Face dataset id
    hub_files: tuple[str, ...] = ()  # file patterns fetched from the hub repo
    local_path: str | None = None  # where it sits inside a datasets folder (datasets_dir)
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="dolly",
            title="databricks-dolly-15k: 15k instruction/response pairs written by Databricks employees",
            format="dolly",
            provenance=Provenance(
                licence="CC BY-SA 3.0",
                commercial=True,
                llm_generated=False,
                citation="Conover et al. 2023, Free Dolly: Introducing the World's First Truly Open "
                "Instruction-Tuned LLM (Databricks blog)",
                url="https://huggingface.co/datasets/databricks/databricks-dolly-15k",
            ),
            hub_id="databricks/databricks-dolly-15k",
            hub_files=("databricks-dolly-15k.jsonl",),
            local_path="dolly/databricks-dolly-15k.jsonl",
            notes="Some responses copy Wikipedia passages given in `context` (CC BY-SA: share alike).",
        ),
        Source(
            name="oasst1",
            title="OpenAssistant Conversations (oasst1): crowd-written, human-ranked assistant conversations",
            format="oasst1",
            provenance=Provenance(
                licence="Apache-2.0",
                commercial=True,
                llm_generated=False,
                citation="Köpf et al. 2023, OpenAssistant Conversations -- Democratizing Large Language Model "
                "Alignment (arXiv:2304.07327)",
                url="https://huggingface.co/datasets/OpenAssistant/oasst1",
            ),
            hub_id="OpenAssistant/oasst1",
            hub_files=("2023-04-12_oasst_ready.messages.jsonl.gz",),
            local_path="oasst1/2023-04-12_oasst_ready.messages.jsonl.gz",
            notes="Message trees become their top-ranked conversation path; messages flagged synthetic or "
            "deleted, or that failed review, are dropped.",
        ),
        Source(
            name="lima",
            title="LIMA: 1,000 curated prompts and responses (Stack Exchange, wikiHow, Reddit, SNI, authors)",
            format="lima",
            provenance=Provenance(
                licence="CC BY-NC-SA 4.0",
                commercial=False,
                llm_generated=False,
                citation="Zhou et al. 2023, LIMA: Less Is More for Alignment (arXiv:2305.11206)",
                url="https://huggingface.co/datasets/GAIR/lima",
            ),
            hub_id="GAIR/lima",
            hub_files=("train.jsonl",),
            local_path="lima/lima.json",
            notes="Gated on the hub. Non-commercial: refused unless the recipe says allow_noncommercial: true.",
        ),
        Source(
            name="natural_instructions",
            title="Super-NaturalInstructions: task definitions with input/output instances",
            format="sni",
            provenance=Provenance(
                licence="Apache-2.0 (task files); instances keep their source dataset's licence",
                commercial=True,
                llm_generated=False,
                citation="Wang et al. 2022, Super-NaturalInstructions: Generalization via Declarative "
                "Instructions on 1600+ NLP Tasks (arXiv:2204.07705)",
                url="https://github.com/allenai/natural-instructions",
            ),
            local_path="natural_instructions",
            notes="Each task file's `Instance License` is checked: a non-commercial or unknown licence is refused "
            "unless allow_noncommercial: true. Several tasks are built on benchmarks: decontaminate.",
        ),
        Source(
            name="flan",
            title="FLAN-style collections: templated inputs/targets from many NLP datasets",
            format="flan",
            provenance=Provenance(
                licence="Apache-2.0 (templates); each task keeps its source dataset's licence, some "
                "non-commercial",
                commercial=False,
                llm_generated=False,
                citation="Longpre et al. 2023, The Flan Collection: Designing Data and Methods for Effective "
                "Instruction Tuning (arXiv:2301.13688)",
                url="https://github.com/google-research/FLAN",
            ),
            notes="Collections mix tasks under many licences, so daytune treats them as non-commercial; give "
            "`hub:` (e.g. a FLAN export with inputs/targets columns) or a local `path:`.",
        ),
        Source(
            name="gsm8k",
            title="GSM8K train: grade-school math word problems with worked solutions",
            format="gsm8k",
            provenance=Provenance(
                licence="MIT",
                commercial=True,
                llm_generated=False,
                citation="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems (arXiv:2110.14168)",
                url="https://github.com/openai/grade-school-math",
            ),
            hub_id="openai/gsm8k",
            hub_files=("main/train-*.parquet",),
            local_path="gsm8k/train.jsonl",
            notes="Train split only: the test split is an evaluation set. Calculator annotations <<a*b=c>> are "
            "removed from the answers.",
        ),
        Source(
            name="alpaca",
            title="Stanford Alpaca: 52k instructions and responses generated by text-davinci-003",
            format="alpaca",
            provenance=Provenance(
                licence="CC BY-NC 4.0",
                commercial=False,
                llm_generated=True,
                citation="Taori et al. 2023, Stanford Alpaca: An Instruction-following LLaMA model",
                url="https://huggingface.co/datasets/tatsu-lab/alpaca",
            ),
            hub_id="tatsu-lab/alpaca",
            hub_files=("data/train-*.parquet",),
            notes="Generated by a closed model whose terms forbid training competing models: refused unless "
            "allow_llm_generated: true.",
        ),
        Source(
            name="sharegpt",
            title="ShareGPT: ChatGPT conversations shared by users",
            format="messages",
            provenance=Provenance(
                licence="unclear (user-shared ChatGPT outputs, OpenAI terms of use)",
                commercial=False,
                llm_generated=True,
                citation="ShareGPT (sharegpt.com), as collected for Vicuna (Chiang et al. 2023)",
                url="https://huggingface.co/datasets/anon8231489123/ShareGPT_Vicuna_unfiltered",
            ),
            hub_id="anon8231489123/ShareGPT_Vicuna_unfiltered",
            hub_files=("ShareGPT_V3_unfiltered_cleaned_split.json",),
            notes="Assistant turns are ChatGPT outputs: refused unless allow_llm_generated: true.",
        ),
    ]
}

_NONCOMMERCIAL = re.compile(r"\b(NC|non-?commercial|research[- ]only)\b|unknown|unclear", re.IGNORECASE)


def licence_allows_commercial(licence: str) -> bool:
    """For licences read from the data itself (e.g. SNI's `Instance License`): NC, unknown or unclear say no."""
    return bool(licence.strip()) and not _NONCOMMERCIAL.search(licence)


def check_provenance(
    label: str, prov: Provenance, allow_llm_generated: bool, allow_noncommercial: bool
) -> None:
    """Refuse a source the recipe's rules disallow, naming the source and the rule."""
    if prov.llm_generated and not allow_llm_generated:
        raise ConfigError(
            f"{label}: refused: its responses are LLM-generated ({prov.licence}; {prov.citation}) and the "
            "recipe has allow_llm_generated: false. Remove the source, or set allow_llm_generated: true if "
            "its terms allow your use."
        )
    if not prov.commercial and not allow_noncommercial:
        raise ConfigError(
            f"{label}: refused: its licence ({prov.licence}) does not allow commercial use and the recipe has "
            "allow_noncommercial: false. Remove the source, or set allow_noncommercial: true for research use."
        )


def get_source(name: str, where: str = "source") -> Source:
    if name not in SOURCES:
        raise ConfigError(
            f"{where}: unknown source '{name}' (known: {', '.join(SOURCES)}). For your own file, leave out "
            "`source:`, give `format:` and declare `provenance:` (licence, commercial, llm_generated, citation)."
        )
    return SOURCES[name]
