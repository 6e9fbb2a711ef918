"""Data recipes: which sources to mix, how much of each, and how to clean them (see examples/data-mix.yaml).

Typed like run recipes (config.py): unknown keys and wrong types are errors naming the field, and relative paths
are resolved against the recipe's folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daytune.config import TEMPLATES, apply_overrides, from_dict, model_beside_recipe, read_yaml_mapping
from daytune.data.loaders import FORMATS, LoadOptions
from daytune.data.sources import Provenance, get_source
from daytune.errors import ConfigError


@dataclass
class ProvenanceConfig:
    """What a user declares about their own data before it can be mixed in."""

    licence: str | None = None
    commercial: bool | None = None
    llm_generated: bool | None = None
    citation: str | None = None
    url: str = ""


SNI_PROMPTS = ("definition", "tk-instruct")


@dataclass
class SourceConfig:
    source: str | None = None  # a registered source (`daytune data sources`); leave out for your own data
    name: str | None = None  # label in the card and in each row's `source` (default: source or file name)
    format: str | None = None  # loader; default: the registered source's format
    path: str | None = None  # a local file or folder (relative to the recipe)
    hub: str | None = None  # a Hugging Face dataset id
    revision: str | None = None  # hub revision (branch, tag or commit)
    files: list[str] = field(default_factory=list)  # file patterns inside the folder or hub repo
    # sampling rate of the cleaned rows: 0.5 keeps half, 2 repeats each training row twice
    weight: float = 1.0
    max_rows: int | None = None  # at most N cleaned rows (seeded sample), before the weight
    max_per_task: int | None = None  # sni, flan: at most N rows per task
    tasks: list[str] = field(default_factory=list)  # sni, flan: task-name patterns to keep
    exclude_tasks: list[str] = field(default_factory=list)  # sni, flan: task-name patterns to drop
    few_shot: int = 0  # sni: positive examples appended to the definition
    # sni: "definition" (the definition as the instruction, the instance as its input) or "tk-instruct" (the whole
    # Tk-Instruct prompt the unseen-task suite sends, as the instruction: train it with template plain)
    prompt: str = "definition"
    languages: list[str] = field(default_factory=lambda: ["en"])  # oasst1: languages to keep ([] = all)
    text_split: str = "paragraph"  # text: paragraph | line | file
    chunk_words: int = 200  # text: join paragraphs into chunks of up to N words
    provenance: ProvenanceConfig | None = None  # required for data that is not a registered source
    on_error: str | None = None  # fail | skip; default: the recipe's on_error


@dataclass
class FilterConfig:
    min_tokens: int = 1  # whole rendered example, in the model's tokens
    max_tokens: int | None = None
    drop_empty: bool = True  # rows whose response (any assistant turn) is empty or whitespace
    drop_truncated: bool = True  # rows longer than max_seq_len: their response would be cut in training


@dataclass
class DedupConfig:
    exact: bool = True  # identical after normalizing case, punctuation and spacing
    near: bool = True  # MinHash + LSH
    threshold: float = 0.8  # estimated Jaccard similarity of word shingles
    num_perm: int = 128
    shingle: int = 3  # words per shingle


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13  # words
    min_ngram: int = 8  # eval items shorter than `ngram` but at least this long are matched whole
    eval_dir: str | None = None  # default: datasets_dir (see evalsets.py)
    eval_sets: list[str] = field(default_factory=lambda: ["all"])  # names from evalsets.EVAL_SETS, or all
    eval_files: list[str] = field(default_factory=list)  # more files (relative to the recipe)
    require: bool = False  # fail when a known eval set is missing instead of noting it in the card


@dataclass
class DataRecipe:
    name: str = "data"
    model: str = "smollm2-135m"  # whose tokenizer counts tokens and renders the chat template
    template: str = "chat"  # chat | alpaca, as in a run recipe's data.template
    system_prompt: str | None = None
    max_seq_len: int = 2048
    datasets_dir: str | None = None  # where registered sources and eval sets are looked up
    sources: list[SourceConfig] = field(default_factory=list)
    # Super-NaturalInstructions tasks never to train on (and every task sharing their `Source`); `unseen` is the
    # evaluation suite's default set. See data/heldout.py.
    heldout_tasks: list[str] = field(default_factory=list)
    # held out the same way, for tuning (a sweep's objective), and never scored by the unseen suite
    validation_tasks: list[str] = field(default_factory=list)
    allow_llm_generated: bool = False
    allow_noncommercial: bool = False
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    val_fraction: float = 0.05  # per source, after cleaning
    val_max_rows: int | None = 500
    seed: int = 42
    on_error: str = "fail"  # fail | skip: what a malformed row does
    examples_per_reason: int = 3  # removed rows shown in the card for each reason

    def validate(self) -> DataRecipe:
        if not self.sources:
            raise ConfigError("sources: list at least one source")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        if self.on_error not in ("fail", "skip"):
            raise ConfigError(f"on_error: {self.on_error!r} is not one of fail, skip")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be within [0, 1), got {self.val_fraction}")
        if self.max_seq_len < 8:
            raise ConfigError(f"max_seq_len: must be at least 8, got {self.max_seq_len}")
        if not 0 < self.dedup.threshold <= 1:
            raise ConfigError(f"dedup.threshold: must be within (0, 1], got {self.dedup.threshold}")
        if self.decontaminate.ngram < 1 or self.decontaminate.min_ngram < 1:
            raise ConfigError("decontaminate.ngram and min_ngram: must be at least 1")
        from daytune.data.evalsets import EVAL_SETS

        for s in self.decontaminate.eval_sets:
            if s != "all" and s not in EVAL_SETS:
                raise ConfigError(
                    f"decontaminate.eval_sets: unknown set '{s}' (known: all, {', '.join(EVAL_SETS)})"
                )
        for name, tasks in (
            ("heldout_tasks", self.heldout_tasks),
            ("validation_tasks", self.validation_tasks),
        ):
            for i, t in enumerate(tasks):
                if not t.strip() or any(ch in t for ch in "*?["):
                    raise ConfigError(f"{name}[{i}]: give a task name (no patterns), got {t!r}")
        labels = set()
        for i, s in enumerate(self.sources):
            where = f"sources[{i}]"
            if s.source is not None:
                get_source(s.source, f"{where}.source")
            elif s.format is None:
                raise ConfigError(
                    f"{where}: give `source:` (a registered source) or `format:` for your own data"
                )
            if s.format is not None and s.format not in FORMATS:
                raise ConfigError(f"{where}.format: {s.format!r} is not one of {', '.join(FORMATS)}")
            if s.path and s.hub:
                raise ConfigError(f"{where}: give `path:` or `hub:`, not both")
            if s.source is None and not (s.path or s.hub):
                raise ConfigError(f"{where}: give `path:` (a local file or folder) or `hub:` (a dataset id)")
            if s.weight < 0:
                raise ConfigError(f"{where}.weight: must not be negative, got {s.weight}")
            if s.prompt not in SNI_PROMPTS:
                raise ConfigError(f"{where}.prompt: {s.prompt!r} is not one of {', '.join(SNI_PROMPTS)}")
            if s.max_rows is not None and s.max_rows < 0:
                raise ConfigError(f"{where}.max_rows: must not be negative")
            if s.on_error not in (None, "fail", "skip"):
                raise ConfigError(f"{where}.on_error: {s.on_error!r} is not one of fail, skip")
            label = label_of(s)
            if label in labels:
                raise ConfigError(
                    f"{where}: another source is also named '{label}'; set `name:` to tell them apart"
                )
            labels.add(label)
            provenance_of(s, where)  # unknown data must be declared
        return self


def label_of(s: SourceConfig) -> str:
    if s.name:
        return s.name
    if s.source:
        return s.source
    if s.path:
        p = Path(s.path)
        return p.name.split(".")[0] if p.name else str(p)
    return str(s.hub).split("/")[-1]


def format_of(s: SourceConfig) -> str:
    return s.format or get_source(s.source).format


def provenance_of(s: SourceConfig, where: str) -> Provenance:
    """A registered source's provenance, or the user's declaration (every field required) for their own data."""
    if s.source is not None:
        registered = get_source(s.source).provenance
        if s.provenance is None:
            return registered
        d = s.provenance
        return Provenance(  # a declaration may tighten a registered source's terms, never loosen them
            licence=d.licence or registered.licence,
            commercial=registered.commercial and (d.commercial if d.commercial is not None else True),
            llm_generated=registered.llm_generated or bool(d.llm_generated),
            citation=d.citation or registered.citation,
            url=d.url or registered.url,
        )
    d = s.provenance
    missing = (
        ["licence", "commercial", "llm_generated", "citation"]
        if d is None
        else [k for k in ("licence", "commercial", "llm_generated", "citation") if getattr(d, k) is None]
    )
    if missing:
        what = s.path or s.hub
        raise ConfigError(
            f"{where} ({what}): not a registered source, so its provenance must be declared before it can be mixed "
            f"in; missing provenance.{', provenance.'.join(missing)} (licence: e.g. CC-BY-4.0; commercial: "
            "true|false; llm_generated: true|false; citation: who made it)"
        )
    return Provenance(d.licence, d.commercial, d.llm_generated, d.citation, d.url)


def load_options(s: SourceConfig, seed: int, refused: dict[str, str] | None = None) -> LoadOptions:
    return LoadOptions(
        refused=dict(refused or {}),
        few_shot=s.few_shot,
        prompt=s.prompt,
        max_per_task=s.max_per_task,
        tasks=list(s.tasks),
        exclude_tasks=list(s.exclude_tasks),
        languages=list(s.languages),
        text_split=s.text_split,
        chunk_words=s.chunk_words,
        seed=seed,
    )


def load_data_recipe(path: str | Path, overrides: Iterable[str] = ()) -> DataRecipe:
    """Read a data recipe YAML, apply `--set` overrides, resolve paths against its folder, validate."""
    path = Path(path)
    data = read_yaml_mapping(path, "data recipe", "(name, sources, filters, ...)")
    apply_overrides(data, overrides)
    try:
        recipe = from_dict(DataRecipe, data)
        resolve_paths(recipe, path.resolve().parent)
        recipe.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return recipe


def _resolve(p: str | None, base: Path) -> str | None:
    if not p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def resolve_paths(recipe: DataRecipe, base: Path) -> None:
    recipe.datasets_dir = _resolve(recipe.datasets_dir, base)
    recipe.decontaminate.eval_dir = _resolve(recipe.decontaminate.eval_dir, base)
    recipe.decontaminate.eval_files = [_resolve(p, base) for p in recipe.decontaminate.eval_files]
    for s in recipe.sources:
        s.path = _resolve(s.path, base)
    recipe.model = model_beside_recipe(recipe.model, base)


def recipe_dict(recipe: DataRecipe) -> dict[str, Any]:
    return asdict(recipe)
