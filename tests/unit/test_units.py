import click
import pytest

from mlxmoe.commands.options import parse_size as size_option
from mlxmoe.units import parse_size


@pytest.mark.parametrize("text,want", [("123456", 123456), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("2 g", 2 * 10**9),
                                       ("1.5GiB", int(1.5 * 2**30)), ("512mib", 512 * 2**20), ("1TB", 10**12)])
def test_sizes_decimal_and_binary(text, want):
    assert parse_size(text, "--x") == want


def test_bad_size_names_the_option():
    assert parse_size(None, "--x") is None
    with pytest.raises(ValueError, match="--kv-budget: 'lots': give a size"):
        parse_size("lots", "--kv-budget")
    with pytest.raises(click.BadParameter) as e:  # the commands' wrapper: click names the option
        size_option("lots", "--kv-budget")
    assert "give a size" in str(e.value) and e.value.param_hint == "--kv-budget"
