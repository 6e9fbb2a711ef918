"""Data: read instruction records, render them with a prompt template, tokenize with the prompt masked."""

from daytune.data.jsonl import read_instructions, read_jsonl, read_multiple_choice
from daytune.data.templates import render
from daytune.data.tokenize import Example, encode_records

__all__ = ["Example", "encode_records", "read_instructions", "read_jsonl", "read_multiple_choice", "render"]
