"""HELM's adaptation: which training instances become the in-context examples, and how a prompt is laid out.

A port of crfm-helm 0.5.16's `AdapterSpec` defaults, `common_adapter_specs`, `InContextLearningAdapter` and
`MultipleChoiceJointAdapter` (Apache-2.0). Byte-identical prompts need HELM's exact choices, so they are kept
as HELM makes them, down to the order of its calls into Python's `random`:
- the examples are drawn once per run (train trial 0, seed 0), balancing labels: labels sorted by how many
  training instances carry them, ties shuffled, then one instance per label in turn;
- blocks are joined by `instance_prefix`, the instructions carry their own trailing newline;
- a prompt that does not fit the model's window (with room for `max_tokens`) loses its last examples first, and
  is cut from the right only when no example is left.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import cycle

TRAIN, VALID, TEST = "train", "valid", "test"
EVAL_SPLITS = (VALID, TEST)
JOINT, GENERATION = "multiple_choice_joint", "generation"
NEURIPS_LOCAL_WINDOW = (
    2048  # max_sequence_length of HELM's `neurips/local` deployment (model_deployments.yaml)
)


@dataclass(frozen=True)
class Reference:
    text: str
    correct: bool = False


@dataclass(frozen=True)
class HelmInstance:
    """One HELM instance: an input, its references, its split; `id` is HELM's (`id{n}` in scenario order) and
    `perturbation` names the perturbation that made this copy (None for the original)."""

    input: str
    references: tuple[Reference, ...]
    split: str
    id: str | None = None
    perturbation: str | None = None
    robustness: bool = False
    fairness: bool = False
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def first_correct(self) -> Reference | None:
        return next((r for r in self.references if r.correct), None)


@dataclass(frozen=True)
class AdapterSpec:
    """The fields of HELM's AdapterSpec that shape a prompt or a request, with HELM's defaults."""

    method: str = GENERATION
    instructions: str = ""
    input_prefix: str = "Input: "
    input_suffix: str = "\n"
    reference_prefix: str = "A. "
    reference_suffix: str = "\n"
    output_prefix: str = "Output: "
    output_suffix: str = "\n"
    instance_prefix: str = "\n"
    max_train_instances: int = 5
    num_outputs: int = 5
    temperature: float = 1.0
    max_tokens: int = 100
    stop_sequences: tuple[str, ...] = ()
    sample_train: bool = True
    multi_label: bool = False


def _instructions(text: str) -> str:
    return text + "\n" if text else text


def multiple_choice_joint_spec(
    instructions: str, input_noun: str | None, output_noun: str, max_tokens: int = 1, num_outputs: int = 5
) -> AdapterSpec:
    """`get_multiple_choice_adapter_spec(method=multiple_choice_joint)`: the request itself sends no stop
    sequence (the joint adapter's Request sets `stop_sequences=[]`)."""
    return AdapterSpec(
        method=JOINT,
        instructions=_instructions(instructions),
        input_prefix=f"{input_noun}: " if input_noun is not None else "",
        input_suffix="\n" if input_noun is not None else "",
        output_prefix=f"{output_noun}: ",
        output_suffix="\n",
        max_train_instances=5,
        num_outputs=num_outputs,
        max_tokens=max_tokens,
        temperature=0.0,
        stop_sequences=(),
    )


def generation_spec(
    instructions: str = "",
    input_noun: str | None = None,
    output_noun: str | None = None,
    max_train_instances: int = 5,
    max_tokens: int = 5,
    stop_sequences: tuple[str, ...] | None = None,
    temperature: float = 0.0,
) -> AdapterSpec:
    """`get_generation_adapter_spec` (no newline after the nouns; stop sequence a newline unless given)."""

    def prefix(noun: str | None) -> str:
        return f"{noun}: " if noun is not None else ""

    return AdapterSpec(
        method=GENERATION,
        instructions=_instructions(instructions),
        input_prefix=prefix(input_noun),
        input_suffix="\n",
        output_prefix=prefix(output_noun),
        output_suffix="\n",
        max_train_instances=max_train_instances,
        num_outputs=1,
        max_tokens=max_tokens,
        stop_sequences=tuple(["\n"] if stop_sequences is None else stop_sequences),
        temperature=temperature,
    )


def sample_examples(train: list[HelmInstance], spec: AdapterSpec, seed: int = 0) -> list[HelmInstance]:
    """HELM's label-balanced draw of the in-context examples (InContextLearningAdapter.sample_examples)."""
    rng = random.Random(seed)  # HELM seeds the module-level generator; a Random(seed) draws the same numbers
    k = min(len(train), spec.max_train_instances)
    if not spec.sample_train:
        return train[k * seed : k * (seed + 1)]
    unlabeled: list[HelmInstance] = []
    by_label: dict[str, list[HelmInstance]] = defaultdict(list)
    for inst in train:
        ref = inst.first_correct
        if ref:  # HELM tests the Reference's truth, which is always true for a Reference
            by_label[ref.text].append(inst)
        else:
            unlabeled.append(inst)
    counts: dict[int, list[str]] = defaultdict(list)
    for label, insts in sorted(by_label.items()):
        counts[len(insts)].append(label)
    labels: list[str] = []
    for count in sorted(counts, reverse=True):
        tied = counts[count]
        rng.shuffle(tied)
        labels.extend(tied)
    examples: list[HelmInstance] = []
    it = cycle(labels)
    while k > 0:
        label = next(it, None)
        if not label:
            break
        insts = by_label[label]
        if not insts:
            if not any(by_label.values()):  # HELM would cycle forever here; the rest comes from the unlabeled
                break
            continue
        examples.append(insts.pop(rng.randrange(len(insts))))
        k -= 1
    return examples + rng.sample(unlabeled, k)


def _prefix_char(prefix: str) -> str:
    return [c for c in prefix if c.isalnum()][0]


def reference_prefix(prefix: str, i: int) -> str:
    """ "A. " -> "C. " for i = 2 (every occurrence of the prefix's first letter or digit moves by i)."""
    old = _prefix_char(prefix)
    return prefix.replace(old, chr(ord(old) + i))


def output_mapping(spec: AdapterSpec, inst: HelmInstance) -> dict[str, str]:
    """Letter -> option text: how a joint multiple-choice completion is read back."""
    char = _prefix_char(spec.reference_prefix)
    return {reference_prefix(char, i): r.text for i, r in enumerate(inst.references)}


def example_block(spec: AdapterSpec, inst: HelmInstance, include_output: bool) -> str:
    text = spec.input_prefix + inst.input + spec.input_suffix
    if spec.method == JOINT:
        char = _prefix_char(spec.reference_prefix)
        output = "n/a"
        for i, ref in enumerate(inst.references):
            text += reference_prefix(spec.reference_prefix, i) + ref.text + spec.reference_suffix
            if ref.correct:
                if output == "n/a":
                    output = reference_prefix(char, i)
                elif spec.multi_label:
                    output += ", " + reference_prefix(char, i)
    elif spec.multi_label:
        output = ", ".join(r.text for r in inst.references if r.correct) or "n/a"
    else:
        ref = inst.first_correct
        output = ref.text if ref else "n/a"
    if include_output:
        return text + spec.output_prefix + output + spec.output_suffix
    return text + spec.output_prefix.rstrip()


@dataclass(frozen=True)
class Prompt:
    text: str
    num_train_instances: int
    truncated: bool = False


def join_blocks(spec: AdapterSpec, train_blocks: list[str], eval_block: str) -> str:
    blocks = ([spec.instructions] if spec.instructions else []) + train_blocks + [eval_block]
    return spec.instance_prefix.join(blocks)


def build_prompt(
    spec: AdapterSpec,
    examples: list[HelmInstance],
    inst: HelmInstance,
    count_tokens: Callable[[str], int] | None = None,
    truncate_right: Callable[[str, int], str] | None = None,
    window: int = NEURIPS_LOCAL_WINDOW,
) -> Prompt:
    """The prompt for one evaluation instance, fitted to `window` tokens as HELM fits it."""
    train_blocks = [example_block(spec, ex, True) for ex in examples]
    eval_block = example_block(spec, inst, False)
    if count_tokens is None:
        return Prompt(join_blocks(spec, train_blocks, eval_block), len(train_blocks))

    def fits(text: str) -> bool:
        # a token is at least one byte, and a tokenizer adds at most two special tokens: short prompts fit
        # without asking the tokenizer (through a server, one request each)
        if len(text.encode()) + 2 + spec.max_tokens <= window:
            return True
        return count_tokens(text) + spec.max_tokens <= window

    while train_blocks:
        text = join_blocks(spec, train_blocks, eval_block)
        if fits(text):
            return Prompt(text, len(train_blocks))
        train_blocks = train_blocks[:-1]
    text = join_blocks(spec, [], eval_block)
    if fits(text) or truncate_right is None:
        return Prompt(text, 0)
    cut = truncate_right(text, window - spec.max_tokens)
    return Prompt(cut, 0, truncated=len(cut) < len(text))


def with_ids(instances: list[HelmInstance]) -> list[HelmInstance]:
    """HELM numbers a scenario's instances in the order the scenario returns them, train split included."""
    return [replace(inst, id=f"id{i}") for i, inst in enumerate(instances)]


def downsample(instances: list[HelmInstance], max_eval: int | None) -> list[HelmInstance]:
    """Every training instance, and at most `max_eval` evaluation instances drawn as HELM's runner draws them
    (numpy's legacy generator seeded 0, choice without replacement: a permutation's first `max_eval`)."""
    import numpy as np

    train = [i for i in instances if i.split == TRAIN]
    evals = [i for i in instances if i.split in EVAL_SPLITS]
    if max_eval is not None and len(evals) > max_eval:
        order = np.random.RandomState(0).permutation(len(evals))[:max_eval]
        evals = [evals[int(j)] for j in order]
    return train + evals
