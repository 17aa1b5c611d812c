"""Every long flag is accepted with dashes and underscores; --help shows examples."""
import pytest

from passl.cli import ArgumentParser, other_spelling


@pytest.mark.parametrize("flag, other", [("--remove-prefix", "--remove_prefix"),
                                         ("--remove_prefix", "--remove-prefix"),
                                         ("--load", None)])
def test_other_spelling(flag, other):
    assert other_spelling(flag) == other


def test_both_spellings_parse_to_the_same_option():
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--remove_prefix", action="store_true")
    parser.add_argument("--pretrained-nonstrict", action="store_true")
    args = parser.parse_args(["--remove-prefix", "--pretrained_nonstrict"])
    assert args.remove_prefix and args.pretrained_nonstrict


def test_help_shows_the_docstring_examples_verbatim():
    parser = ArgumentParser(prog="tool", description="Do it.\n\n    python tool.py -c CFG\n")
    assert "\n    python tool.py -c CFG\n" in parser.format_help()
