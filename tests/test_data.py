import json

import pytest

from daytune.data import encode_records, read_instructions, read_multiple_choice
from daytune.data.batching import BatchPlan, collate
from daytune.data.templates import render, render_segments
from daytune.data.tokenize import IGNORE_INDEX
from daytune.errors import ConfigError, DataError


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    p = write(
        tmp_path / "d.jsonl", ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", "output": ']
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_instructions(p)


def test_missing_field_and_wrong_type(tmp_path):
    p = write(tmp_path / "d.jsonl", ['{"instruction": "a"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'output'"):
        read_instructions(p)
    p = write(tmp_path / "e.jsonl", ['{"instruction": "a", "output": 3}'])
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'output' must be a string"):
        read_instructions(p)
    p = write(tmp_path / "f.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected a JSON object"):
        read_instructions(p)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_instructions(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no records"):
        read_instructions(write(tmp_path / "empty.jsonl", [""]))


def test_bad_utf8_names_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: not valid UTF-8"):
        read_instructions(p)


def test_bom_deep_nesting_and_null_fields(tmp_path):
    """A UTF-8 BOM is accepted (as `data prepare` accepts it); a deeply nested line and a null field are errors
    naming file:line, not a RecursionError or a "missing" field that is present."""
    from daytune.data.jsonl import read_records

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert [r["output"] for r in read_instructions(p)] == ["b", "d"]
    assert [r["output"] for r in read_records(p)] == ["b", "d"]
    deep = "[" * 100_000 + "]" * 100_000
    p = write(tmp_path / "deep.jsonl", ['{"instruction": "a", "output": "b"}', f'{{"instruction": {deep}}}'])
    with pytest.raises(DataError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        read_records(p)
    p = write(tmp_path / "null.jsonl", ['{"instruction": null, "output": "b"}'])
    with pytest.raises(DataError, match=r"null\.jsonl:1: field 'instruction' is null; expected a string"):
        read_instructions(p)
    with pytest.raises(DataError, match=r"null\.jsonl:1: field 'instruction' is null"):
        read_records(p)
    p = write(tmp_path / "input.jsonl", ['{"instruction": "a", "input": null, "output": "b"}'])
    assert read_records(p)[0]["input"] == ""  # an optional field may be null


def test_multiple_choice_validation(tmp_path):
    p = write(tmp_path / "m.jsonl", [json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2})])
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'answer' must be an index"):
        read_multiple_choice(p)
    p = write(tmp_path / "n.jsonl", [json.dumps({"question": "q", "choices": "ab", "answer": 0})])
    with pytest.raises(DataError, match="'choices' must be a list"):
        read_multiple_choice(p)


def test_loss_mask_covers_exactly_the_prompt(tiny_model):
    _, tok = tiny_model
    rec = {"instruction": "What is 2+2?", "input": "Be brief.", "output": "It is 4."}
    for template in ("chat", "alpaca", "plain"):
        prompt, response = render(rec, tok, template)
        (ex,), stats = encode_records([rec], tok, template, 1000)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert all(x == IGNORE_INDEX for x in ex.labels[:n_prompt])
        assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.n_trained > 0
        assert tok.decode(ex.input_ids[n_prompt:]) == response
        assert "It is 4." in response and "What is 2+2?" in prompt and "Be brief." in prompt


def test_plain_template_is_the_text_an_evaluation_prompt_sends(tiny_model):
    _, tok = tiny_model
    eos = tok.eos_token
    assert render(
        {"instruction": "Definition: Say yes.\n\nInput: x\nOutput:", "output": "yes"}, tok, "plain"
    ) == (
        "Definition: Say yes.\n\nInput: x\nOutput:",
        " yes" + eos,
    )
    assert render({"instruction": "What is 2+2?", "output": "4"}, tok, "plain") == (
        "What is 2+2?",
        "\n4" + eos,
    )
    convo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert render_segments(convo, tok, "plain") == [("hi\n\n", False), ("hello" + eos, True)]


def test_chat_template_renders_the_conversation(tiny_model):
    _, tok = tiny_model
    prompt, response = render({"instruction": "hi", "output": "hello"}, tok, "chat", system_prompt="Be nice.")
    assert (
        prompt
        == "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "hello<|im_end|>\n"


def test_truncation_and_dropping(tiny_model):
    _, tok = tiny_model
    long_answer = {"instruction": "q", "output": "word " * 200}
    long_prompt = {"instruction": "word " * 200, "output": "a"}
    examples, stats = encode_records([long_answer, long_prompt], tok, "alpaca", 150)
    assert stats.rows == 2 and stats.truncated == 2 and stats.dropped_no_response == 1 and stats.kept == 1
    assert len(examples[0].input_ids) == 150


def test_chat_template_missing_is_a_clear_error(tiny_model):
    _, tok = tiny_model

    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template; use template: alpaca"):
        render({"instruction": "a", "output": "b"}, NoTemplate(), "chat")
    assert tok.chat_template


def test_batch_order_is_deterministic_and_covers_each_epoch():
    plan = BatchPlan([5] * 10, micro_batch=4, seed=1, max_seq_len=64)
    first_epoch = [row[0] for k in range(3) for row in plan.get(k)]
    assert sorted(first_epoch) == list(range(10)) and plan.per_epoch() == 3
    again = BatchPlan([5] * 10, micro_batch=4, seed=1, max_seq_len=64)
    assert plan.get(5) == again.get(5)
    assert plan.get(3) != BatchPlan([5] * 10, micro_batch=4, seed=2, max_seq_len=64).get(3)


def test_collate_pads_and_masks():
    from daytune.data.tokenize import Example

    b = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
