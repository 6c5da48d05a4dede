"""The name a dataset gets when `syncbit pull` is not given --name."""

import pytest

from syncbit.agent.agent import check_dataset_name, default_name


@pytest.mark.parametrize("uri,name", [
    ("https://files.example.com/models/llama-3-8b/", "llama-3-8b"),
    ("/mnt/nfs/sets/c4 en", "c4-en"),
    ("s3://models/mistral-7b/", "mistral-7b"),
    ("s3://bucket/one.bin", "one.bin"),
    ("hf://meta-llama/Llama-3.1-8B@main", "Llama-3.1-8B"),
    ("hf://meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    ("hf://datasets/HuggingFaceFW/fineweb@v1/sample/10BT", "10BT"),
    ("https://host/", "host"),
])
def test_default_names_are_valid_and_readable(uri, name):
    assert default_name(uri) == name
    assert check_dataset_name(default_name(uri)) == name
