"""Tests of CommandTemplate: parsing, replacement strings and shell quoting.

The expected values marked "GNU parallel" were produced by GNU parallel
20221122 (Debian 12), for example with
``parallel -k -q printf '{}|{.}|{/}|{//}|{/.}\\n' ::: a/b/c.tar.gz``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from batchtools._exceptions import TemplateError
from batchtools.backends._command import CommandTemplate, quote_for_shell

HOSTILE_ITEMS: list[bytes] = [
    b"it's",
    b'say "hi"',
    b"two  spaces ",
    b"line one\nline two",
    b"$(touch pwned)",
    b"`touch pwned`",
    b"a; touch pwned",
    b"a && b || c",
    b"*",
    b"?.txt [ab]",
    b"-n",
    b"--help",
    b"\xb2\x97",
    b"tab\there",
    b"back\\slash",
    b"",
    b" ",
    b"'",
    b"~",
    b"X=1",
    b"{}",
    b"$HOME ${PATH}",
    b"\\'\"",
]


def render_one(template: str | list[str], item: Any, **options: Any) -> list[bytes]:
    return CommandTemplate.parse(template).render([item], seq=0, slot=1, **options)


# GNU parallel's results for {} {.} {/} {//} {/.} on ordinary paths.
GNU_PARALLEL_PATHS = [
    ("a/b/c.tar.gz", "a/b/c.tar.gz|a/b/c.tar|c.tar.gz|a/b|c.tar"),
    ("/x/y.txt", "/x/y.txt|/x/y|y.txt|/x|y"),
    ("file.txt", "file.txt|file|file.txt|.|file"),
    ("noext", "noext|noext|noext|.|noext"),
    ("a.b/c", "a.b/c|a.b/c|c|a.b|c"),
    ("foo bar/baz.qux", "foo bar/baz.qux|foo bar/baz|baz.qux|foo bar|baz"),
    ("./x.y", "./x.y|./x|x.y|.|x"),
    ("../x", "../x|../x|x|..|x"),
    ("a//b.c", "a//b.c|a//b|b.c|a|b"),
    ("a.", "a.|a|a.|.|a"),
    ("", "|||.|"),
]


@pytest.mark.parametrize(("path", "expected"), GNU_PARALLEL_PATHS)
def test_path_replacements_match_gnu_parallel(path: str, expected: str) -> None:
    argv = render_one(["printf", "{}|{.}|{/}|{//}|{/.}"], path)
    assert argv == [b"printf", expected.encode()]


# Where the rules differ from GNU parallel on purpose (documented in
# _command.py); GNU parallel's result is in the comment.
DOCUMENTED_DEVIATIONS = [
    (".bashrc", ".bashrc|.bashrc|.bashrc|.|.bashrc"),  # .bashrc||.bashrc|.|
    ("dir/.bashrc", "dir/.bashrc|dir/.bashrc|.bashrc|dir|.bashrc"),  # dir/ for {.}
    ("dir/", "dir/|dir/|dir|.|dir"),  # dir/|dir/||.|
    ("/a/b/", "/a/b/|/a/b/|b|/a|b"),  # /a/b/|/a/b/||/a|
    ("/", "/|/|/|/|/"),  # /|/||/|
    (".config.json", ".config.json|.config|.config.json|.|.config"),
    ("..", "..|..|..|.|.."),  # {.} of .. is . in GNU parallel
    ("a/b.d/", "a/b.d/|a/b.d/|b.d|a|b"),
]


@pytest.mark.parametrize(("path", "expected"), DOCUMENTED_DEVIATIONS)
def test_path_replacements_documented_rules(path: str, expected: str) -> None:
    argv = render_one(["printf", "{}|{.}|{/}|{//}|{/.}"], path)
    assert argv == [b"printf", expected.encode()]


def test_sequence_and_slot() -> None:
    template = CommandTemplate.parse("echo {#} {%} job{#}-{%}")
    argv = template.render(["x"], seq=41, slot=3)
    assert argv == [b"echo", b"42", b"3", b"job42-3"]
    assert template.uses_seq
    assert template.uses_slot


def test_uses_flags_false_without_them() -> None:
    template = CommandTemplate.parse("echo {}")
    assert not template.uses_seq
    assert not template.uses_slot
    assert template.has_replacements


def test_columns_match_gnu_parallel() -> None:
    # parallel -q printf '[%s]' {-1} {1/} {2//} {1/.} ::: /p/q.r ::: s/t.u
    argv = render_one("printf {-1} {1/} {2//} {1/.} {2.} {1}", ("/p/q.r", "s/t.u"))
    assert argv == [b"printf", b"s/t.u", b"q.r", b"s", b"q", b"s/t", b"/p/q.r"]


def test_positional_leading_zero() -> None:
    assert render_one("echo {01}", ("a", "b")) == [b"echo", b"a"]


def test_whole_item_joins_columns() -> None:
    argv = render_one("echo {} {.} x{/}y", ("d/a.b", "e.f"))
    assert argv == [b"echo", b"d/a.b e.f", b"d/a e", b"xa.b e.fy"]


def test_no_replacement_appends_columns() -> None:
    assert render_one("echo -n", ("a b", 3, 2.5)) == [
        b"echo",
        b"-n",
        b"a b",
        b"3",
        b"2.5",
    ]


def test_no_replacement_appends_batch() -> None:
    template = CommandTemplate.parse(["echo"])
    argv = template.render(["a", ("b", "c"), "d"], seq=0, slot=1)
    assert argv == [b"echo", b"a", b"b", b"c", b"d"]


def test_empty_tuple_appends_nothing() -> None:
    assert render_one("echo", ()) == [b"echo"]
    assert render_one("echo {}", ()) == [b"echo", b""]


def test_batch_matches_gnu_parallel() -> None:
    # parallel -n2 -q printf '[%s]' {} {.} {#} {1} {2.} ::: a.x b.y c.z
    template = CommandTemplate.parse("printf {} {.} {#} {1} {2.}")
    first = template.render(["a.x", "b.y"], seq=0, slot=1)
    assert first == [b"printf", b"a.x", b"b.y", b"a", b"b", b"1", b"a.x", b"b"]
    last = template.render(["c.z"], seq=1, slot=2, batch=True)
    assert last == [b"printf", b"c.z", b"c", b"2", b"c.z", b""]


def test_batch_inside_word_joins_items() -> None:
    template = CommandTemplate.parse("echo x{}y --files={/}")
    argv = template.render(["d/a.x", "b.y"], seq=0, slot=1)
    assert argv == [b"echo", b"xd/a.x b.yy", b"--files=a.x b.y"]


def test_batch_positional_picks_items() -> None:
    template = CommandTemplate.parse("echo {2} {-1}")
    argv = template.render([("a", "b"), ("c", "d"), "e"], seq=0, slot=1)
    assert argv == [b"echo", b"c d", b"e"]


def test_single_item_with_batch_false_and_many_items() -> None:
    template = CommandTemplate.parse("echo {}")
    with pytest.raises(ValueError, match="exactly one item"):
        template.render(["a", "b"], seq=0, slot=1, batch=False)


@pytest.mark.parametrize("text", ["{foo}", "{+/}", "{= $_ =}", "{ }", "{1x}", "{#1}"])
def test_unknown_replacement_left_literal(text: str) -> None:
    template = CommandTemplate.parse(["echo", text, "{}"])
    assert template.render(["v"], seq=0, slot=1) == [b"echo", text.encode(), b"v"]


def test_unknown_replacement_alone_appends_item() -> None:
    assert render_one("awk '{print $1}'", "f") == [b"awk", b"{print $1}", b"f"]


def test_column_types() -> None:
    item = (b"\xb2", "\u00e9", PurePosixPath("p/q"), 7, 1.5, bytearray(b"ba"))
    argv = render_one("echo {1} {2} {3} {4} {5} {6}", item)
    assert argv == [b"echo", b"\xb2", "\u00e9".encode(), b"p/q", b"7", b"1.5", b"ba"]


def test_surrogateescape_str_round_trips() -> None:
    item = b"\xb2\x97".decode("utf-8", "surrogateescape")
    assert render_one("echo {}", item) == [b"echo", b"\xb2\x97"]


def test_hostile_items_stay_one_argument() -> None:
    template = CommandTemplate.parse("printf %s {}")
    for item in HOSTILE_ITEMS:
        assert template.render([item], seq=0, slot=1) == [b"printf", b"%s", item]


def test_sequence_template_kept_verbatim() -> None:
    template = CommandTemplate.parse([b"prog\xff", "a b", "'{}'"])
    argv = template.render(["v"], seq=0, slot=1)
    assert argv == [b"prog\xff", b"a b", b"'v'"]


def test_shlex_split_quotes() -> None:
    argv = render_one("""grep -e 'a b' "{}" x\\ y""", "it's")
    assert argv == [b"grep", b"-e", b"a b", b"it's", b"x y"]


@pytest.mark.parametrize("template", ["", "   ", "\n"])
def test_empty_template_rejected(template: str) -> None:
    with pytest.raises(TemplateError, match="is empty"):
        CommandTemplate.parse(template)


def test_empty_sequence_rejected() -> None:
    with pytest.raises(TemplateError, match="is empty"):
        CommandTemplate.parse([])


def test_empty_script_rejected() -> None:
    with pytest.raises(TemplateError, match="empty script"):
        CommandTemplate.parse("  ", shell=True)


def test_empty_program_rejected() -> None:
    with pytest.raises(TemplateError, match="empty program name"):
        CommandTemplate.parse("'' {}")


@pytest.mark.parametrize("template", ["echo 'abc", 'echo "abc', "echo abc\\"])
def test_unbalanced_quote_rejected(template: str) -> None:
    with pytest.raises(TemplateError) as caught:
        CommandTemplate.parse(template)
    assert repr(template) in str(caught.value)
    assert "cannot be split" in str(caught.value)


@pytest.mark.parametrize("field", ["{0}", "{0.}", "{-0}", "{00/}"])
def test_column_zero_rejected(field: str) -> None:
    with pytest.raises(TemplateError) as caught:
        CommandTemplate.parse(f"echo {field}")
    assert field in str(caught.value)
    assert "numbered from 1" in str(caught.value)


def test_column_beyond_item_rejected() -> None:
    template = CommandTemplate.parse("echo {3}")
    with pytest.raises(TemplateError) as caught:
        template.render([("a", "b")], seq=0, slot=1)
    message = str(caught.value)
    assert "'echo {3}'" in message
    assert "2 column(s)" in message


def test_negative_column_beyond_item_rejected() -> None:
    with pytest.raises(TemplateError, match="1 column"):
        render_one("echo {-2}", "a")


def test_invalid_element_type_rejected() -> None:
    with pytest.raises(TemplateError, match="must be str or bytes"):
        CommandTemplate.parse(["echo", 3])  # type: ignore[list-item]


@pytest.mark.parametrize("column", [None, [1, 2], {"a": 1}, object()])
def test_invalid_column_type_rejected(column: Any) -> None:
    with pytest.raises(TemplateError, match="a column must be"):
        render_one("echo {}", column)


def test_nul_byte_rejected() -> None:
    with pytest.raises(TemplateError, match="NUL byte"):
        render_one("echo {}", b"a\0b")
    with pytest.raises(TemplateError, match="NUL byte"):
        render_one("echo", b"a\0b")
    with pytest.raises(TemplateError, match="NUL byte"):
        CommandTemplate.parse("echo {}", shell=True).render([b"a\0b"], seq=0, slot=1)


def test_unencodable_str_rejected() -> None:
    with pytest.raises(TemplateError, match="cannot be encoded"):
        render_one("echo {}", "\ud800")


def test_text_is_stable_json() -> None:
    split = CommandTemplate.parse("echo 'a b' {}")
    listed = CommandTemplate.parse(["echo", "a b", "{}"])
    assert split.text == listed.text
    assert json.loads(split.text) == {"argv": ["echo", "a b", "{}"], "shell": False}


def test_text_distinguishes_shell() -> None:
    plain = CommandTemplate.parse("echo {}")
    script = CommandTemplate.parse("echo {}", shell=True)
    assert plain.text != script.text
    assert json.loads(script.text) == {"script": "echo {}", "shell": True}


def test_text_keeps_invalid_utf8_distinct() -> None:
    first = CommandTemplate.parse([b"echo", b"\xb2"])
    second = CommandTemplate.parse([b"echo", b"\xb3"])
    assert first.text != second.text
    assert first.text.isascii()


# Shell templates ----------------------------------------------------------


def run_script(argv: list[bytes], cwd: Path | None = None) -> list[bytes]:
    """Run a rendered shell template whose script prints NUL-terminated words."""
    assert argv[:2] == [b"/bin/sh", b"-c"]
    completed = subprocess.run(argv, capture_output=True, check=True, cwd=cwd)
    assert completed.stdout.endswith(b"\0") or completed.stdout == b""
    return completed.stdout.split(b"\0")[:-1]


def test_shell_render_form() -> None:
    template = CommandTemplate.parse(["echo", "{}", "|", "wc -c"], shell=True)
    argv = template.render(["a b"], seq=0, slot=1)
    assert argv == [b"/bin/sh", b"-c", b"echo 'a b' | wc -c"]


def test_shell_hostile_items_quoted(tmp_path: Path) -> None:
    # Files for an unquoted glob to expand to.
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    template = CommandTemplate.parse("printf '%s\\0' {} x{}y", shell=True)
    for item in HOSTILE_ITEMS:
        words = run_script(template.render([item], seq=0, slot=1), cwd=tmp_path)
        assert words == [item, b"x" + item + b"y"], item
    assert not (tmp_path / "pwned").exists()


def test_shell_hostile_items_appended() -> None:
    template = CommandTemplate.parse("printf '%s\\0'", shell=True)
    for item in HOSTILE_ITEMS:
        words = run_script(template.render([(item, b"second")], seq=0, slot=1))
        assert words == [item, b"second"], item


def test_shell_batch_whole_word_expands() -> None:
    template = CommandTemplate.parse("printf '%s\\0' {} x{}y {2}", shell=True)
    items = [b"a b", b"it's", b"$(x)"]
    words = run_script(template.render(items, seq=0, slot=1))
    assert words == [b"a b", b"it's", b"$(x)", b"xa b it's $(x)y", b"it's"]


def test_shell_whole_word_next_to_operators() -> None:
    template = CommandTemplate.parse(
        "(printf '%s\\0' {};printf '%s\\0' {})", shell=True
    )
    words = run_script(template.render([b"p q", b"r"], seq=0, slot=1))
    assert words == [b"p q", b"r", b"p q", b"r"]


def test_shell_seq_and_slot() -> None:
    template = CommandTemplate.parse("printf '%s\\0' {#}-{%}", shell=True)
    assert run_script(template.render(["x"], seq=9, slot=2)) == [b"10-2"]


def test_shell_value_first_is_not_assignment() -> None:
    template = CommandTemplate.parse("{} 2>/dev/null; printf '%s\\0' $?", shell=True)
    assert run_script(template.render([b"X=1"], seq=0, slot=1)) == [b"127"]


def test_quote_for_shell_forms() -> None:
    assert quote_for_shell(b"plain-word_1.txt") == b"plain-word_1.txt"
    assert quote_for_shell(b"") == b"''"
    assert quote_for_shell(b"a b") == b"'a b'"
    assert quote_for_shell(b"it's") == b"'it'\\''s'"
    assert quote_for_shell(b"X=1") == b"'X=1'"
