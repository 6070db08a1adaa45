"""protocol/paths.py: which names a receiver may create, how they are shown.

A manifest's paths come from the peer, so these tests are about refusal:
nothing that could leave the transfer's directory (absolute paths, `..`),
nothing the filesystem would silently merge (case and normalisation
collisions, a name used as both file and directory), and error messages a
terminal can print safely. Odd but legal evidence names must pass unchanged.
"""

from __future__ import annotations

import codecs
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dorothy.protocol.errors import RemoteProtocolError
from dorothy.protocol.paths import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_BYTES,
    MAX_PATH_COMPONENTS,
    PathError,
    check_collisions,
    escape,
    quoted,
    validate_path,
)

FAST = settings(max_examples=200, deadline=None)


def is_printable_ascii(text: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in text)


def refusal(path) -> PathError:
    with pytest.raises(PathError) as info:
        validate_path(path)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.code == "bad_path"
    return info.value


# --- validate_path: refusals -------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".",
        "..",
        "../etc/passwd",
        "a/../../b",
        "a/..",
        "./a",
        "a/./b",
        "a/.",
        "evidence/\n/../x",  # a newline must not hide the traversal in the message
    ],
)
def test_dot_components_are_refused_and_named(path):
    error = refusal(path)
    assert quoted(path) in str(error)
    assert "component" in str(error)


@pytest.mark.parametrize("path", ["/", "/etc/passwd", "/a", "//a"])
def test_absolute_paths_are_refused(path):
    error = refusal(path)
    assert quoted(path) in str(error)
    assert "absolute" in str(error)


@pytest.mark.parametrize("path", ["a/", "a//b", "a/b/", "a///"])
def test_empty_components_are_refused(path):
    error = refusal(path)
    assert quoted(path) in str(error)
    assert "empty component" in str(error)


def test_the_empty_path_is_refused():
    assert "empty" in str(refusal(""))


@pytest.mark.parametrize("path", ["\x00", "a\x00b", "dir/\x00", "a.txt\x00.jpg"])
def test_nul_is_refused(path):
    error = refusal(path)
    assert "NUL" in str(error)
    assert quoted(path) in str(error)
    assert "\x00" not in str(error)


def test_a_path_that_is_not_utf8_is_refused():
    # A sender's os.fsdecode() yields lone surrogates for undecodable bytes.
    error = refusal("bad\udcff.bin")
    assert "UTF-8" in str(error)
    assert quoted("bad\udcff.bin") in str(error)


@pytest.mark.parametrize("value", [b"a.txt", None, 1, ["a"], ("a",), 1.5])
def test_a_non_string_is_refused(value):
    assert "not a string" in str(refusal(value))


def test_a_str_subclass_is_refused():
    class Sneaky(str):
        pass

    refusal(Sneaky("a.txt"))


def _path_of_bytes(total: int) -> str:
    """A valid-looking path of exactly `total` UTF-8 bytes, components <= 255."""
    parts, remaining = [], total
    while remaining > 0:
        n = min(MAX_COMPONENT_BYTES, remaining)
        if remaining - n == 1:  # leave room for a non-empty last component
            n -= 1
        parts.append("a" * n)
        remaining -= n + 1
    path = "/".join(parts)
    assert len(path.encode()) == total
    return path


def test_path_length_limit_is_in_bytes_and_inclusive():
    assert validate_path(_path_of_bytes(MAX_PATH_BYTES)) == _path_of_bytes(MAX_PATH_BYTES)
    long_path = _path_of_bytes(MAX_PATH_BYTES + 1)
    error = refusal(long_path)
    assert "longer than" in str(error)
    assert quoted(long_path) in str(error)


def test_path_length_counts_utf8_bytes_not_characters():
    # 1457 characters, most of them 3 bytes: under the limit in characters,
    # over it in bytes (4337).
    path = "/".join(["\u20ac" * 80] * 18)
    assert len(path) < MAX_PATH_BYTES < len(path.encode())
    assert "longer than" in str(refusal(path))


def test_depth_limit_is_in_components_and_inclusive():
    # The receiver writes under these names as chunks arrive, and removes
    # the tree if the transfer ends for good: that must not exceed
    # recursion limits (shutil.rmtree on Python 3.11 fails near 1,000).
    deepest = "/".join(["d"] * MAX_PATH_COMPONENTS)
    assert validate_path(deepest) == deepest
    error = refusal(deepest + "/f")
    assert f"more than {MAX_PATH_COMPONENTS} components" in str(error)


def test_component_length_limit_is_in_bytes_and_inclusive():
    assert validate_path("d/" + "a" * MAX_COMPONENT_BYTES) == "d/" + "a" * MAX_COMPONENT_BYTES
    error = refusal("d/" + "a" * (MAX_COMPONENT_BYTES + 1))
    assert "component longer than" in str(error)
    # 128 two-byte characters: 128 characters, 256 bytes.
    error = refusal("d/" + "\u00e9" * 128 + "/x")
    assert "component longer than" in str(error)
    assert quoted("d/" + "\u00e9" * 128 + "/x") in str(error)


@given(st.text(max_size=40))
@FAST
def test_every_refusal_is_a_path_error_with_a_printable_message(path):
    try:
        assert validate_path(path) == path
    except PathError as error:
        assert is_printable_ascii(str(error))
        if path:
            assert quoted(path) in str(error)


# --- validate_path: odd but legal names ---------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "line\nbreak.txt",
        "carriage\rreturn",
        "\x1b[31mred\x1b[0m.log",
        "rm -rf ~; echo pwned",
        "it's \"quoted\".txt",
        "\u0645\u0644\u0641/\u6587\u4ef6/\U0001f600.png",
        "C:\\Windows\\system32",
        "..\\..\\boot.ini",  # backslash is an ordinary character on the receiver
        " leading and trailing spaces ",
        "...",
        ".hidden/..x/x..",
        "tab\there",
        "\u202eexe.txt",  # right-to-left override
        "a/b/c/d/e/f/g/h/i/j/k",
    ],
)
def test_legal_odd_names_are_accepted_unchanged(path):
    assert validate_path(path) == path


# --- escape -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain name.txt", "plain name.txt"),
        ("line\nbreak", "line\\nbreak"),
        ("\x1b[2J", "\\x1b[2J"),
        ("caf\u00e9", "caf\\xe9"),
        ("back\\slash", "back\\\\slash"),
        ("it's", "it\\'s"),
        ("\x7f", "\\x7f"),
        ("\U0001f600", "\\U0001f600"),
    ],
)
def test_escape_known_answers(text, shown):
    assert escape(text) == shown


@given(st.text())
@FAST
@example("\n\r\x1b\x00\x7f\u0085\u2028\u2029\ud800")
def test_escape_is_one_line_of_printable_ascii(text):
    shown = escape(text)
    assert is_printable_ascii(shown)
    assert "\n" not in shown and "\r" not in shown


@given(st.text())
@FAST
@example("\\'")
@example("\\x41")
@example("'\\")
def test_escape_can_be_undone(text):
    # Invertible, hence injective: no two names look the same on screen.
    assert codecs.decode(escape(text), "unicode_escape") == text


@given(st.text(max_size=12), st.text(max_size=12))
@FAST
@example("\n", "\\n")
@example("'", "\\'")
@example("\u00e9", "\\xe9")
@example("\\", "\\\\")
@example("e\u0301", "\u00e9")
def test_distinct_names_are_shown_distinctly(a, b):
    if a != b:
        assert escape(a) != escape(b)
        assert quoted(a) != quoted(b)


def test_quoted_cannot_be_closed_early_by_a_quote_in_the_name():
    shown = quoted("x' and 'y")
    assert shown == "'x\\' and \\'y'"
    inner = shown[1:-1]
    unescaped_quotes = [i for i, c in enumerate(inner) if c == "'" and inner[i - 1] != "\\"]
    assert unescaped_quotes == []


# --- check_collisions ---------------------------------------------------------


def collision(paths) -> PathError:
    with pytest.raises(PathError) as info:
        check_collisions(paths)
    assert info.value.code == "bad_path"
    return info.value


def test_distinct_paths_pass():
    check_collisions(["a.txt", "b.txt", "dir/a.txt", "dir/sub/a.txt", "Dir2/x", "dir2x"])


def test_sibling_files_in_directories_differing_only_in_case_pass():
    # "A/x" and "a/y" land in one directory on a case-insensitive disk, but as
    # two different files: nothing is lost.
    check_collisions(["A/x", "a/y"])


def test_exact_duplicates_are_refused():
    error = collision(["a.txt", "b.txt", "a.txt"])
    assert "duplicate" in str(error)
    assert quoted("a.txt") in str(error)


def test_case_insensitive_collisions_are_refused_naming_both():
    error = collision(["A.txt", "a.txt"])
    assert quoted("A.txt") in str(error) and quoted("a.txt") in str(error)
    assert "case-insensitive" in str(error)


@pytest.mark.parametrize(
    "first, second",
    [
        ("dir/R\u00e9sum\u00e9.pdf", "dir/Re\u0301sume\u0301.pdf"),  # NFC vs NFD
        ("\u00e9", "e\u0301"),
        ("\u00c9", "e\u0301"),  # and case at the same time
        ("STRASSE", "stra\u00dfe"),  # full case folding
        ("\u212a", "k"),  # KELVIN SIGN folds to k
        ("x/\u00e9/1", "x/E\u0301/1"),  # in a directory component
        ("s\u0301\u0307", "\u1e65"),  # two marks, composed
        ("\u017f", "s"),  # long s folds to s
    ],
)
def test_normalisation_and_case_collisions_are_refused(first, second):
    for order in ([first, second], [second, first]):
        error = collision(order)
        assert quoted(order[1]) in str(error)
        assert quoted(order[0]) in str(error)
        assert is_printable_ascii(str(error))


@pytest.mark.parametrize(
    "first, second",
    [
        # Unicode's canonical caseless match (D145) is NFD(casefold(NFD(x))).
        # Long s + acute has no precomposed form, so NFC leaves it alone, and
        # casefold then turns it into s + acute, which is not NFC: it is
        # never compared with "ś" (U+015B), which case-insensitive,
        # normalising filesystems treat as the same name.
        ("\u017f\u0301", "\u015b"),
        ("\u03f5\u0301", "\u03ad"),  # lunate epsilon + acute vs epsilon with tonos
    ],
)
def test_canonically_caseless_equal_names_collide(first, second):
    def canonical_caseless(s):
        return unicodedata.normalize("NFD", unicodedata.normalize("NFD", s).casefold())

    assert canonical_caseless(first) == canonical_caseless(second)
    collision([first, second])
    collision([second, first])


@pytest.mark.parametrize("order", [["a", "a/b"], ["a/b", "a"], ["x/a", "x/a/b/c"], ["x/a/b/c", "x/a"]])
def test_a_name_used_as_file_and_directory_is_refused(order):
    error = collision(order)
    assert quoted(order[1]) in str(error)
    # Say what is wrong: a file-versus-directory conflict, not a duplicate.
    assert "directory" in str(error)
    assert "duplicate" not in str(error)


@pytest.mark.parametrize("order", [["A", "a/b"], ["a/b", "A"]])
def test_file_and_directory_conflicts_are_found_across_case(order):
    error = collision(order)
    assert quoted(order[1]) in str(error)
    assert "directory" in str(error)


def test_collision_messages_escape_hostile_names():
    error = collision(["\x1b]0;owned\x07", "\x1b]0;owned\x07"])
    assert is_printable_ascii(str(error))
    assert "\x1b" not in str(error)


# An alphabet dense in case and normalisation traps, so random lists collide often.
_tricky = st.sampled_from(list("aAbB") + ["\u00e9", "\u00c9", "e\u0301", "E\u0301", "\u00df", "ss", "SS", "\u212a", "k"])
_component = st.lists(_tricky, min_size=1, max_size=3).map("".join)
_path = st.lists(_component, min_size=1, max_size=3).map("/".join)


def _oracle_ok(paths: list[str]) -> bool:
    """Independent statement of the rule: no two paths fold to one name, and
    no path's folded form is a proper directory prefix of another's."""

    def fold(p):
        return unicodedata.normalize("NFC", p).casefold()

    folded = [fold(p) for p in paths]
    if len(set(folded)) != len(folded):
        return False
    dirs = {"/".join(f.split("/")[:i]) for f in folded for i in range(1, f.count("/") + 1)}
    return not dirs & set(folded)


@given(st.lists(_path, max_size=8, unique=True))
@settings(max_examples=300, deadline=None)
def test_check_collisions_matches_the_rule(paths):
    for p in paths:
        validate_path(p)
    try:
        check_collisions(paths)
    except PathError as error:
        assert not _oracle_ok(paths), f"refused a safe list: {error}"
        assert any(quoted(p) in str(error) for p in paths)
    else:
        assert _oracle_ok(paths)
        folded = [unicodedata.normalize("NFC", p).casefold() for p in paths]
        assert len(set(folded)) == len(folded)


@given(st.lists(st.text(min_size=1, max_size=20), max_size=10, unique=True))
@settings(max_examples=200, deadline=None)
def test_check_collisions_on_arbitrary_valid_paths_raises_only_path_error(paths):
    valid = []
    for p in paths:
        try:
            valid.append(validate_path(p))
        except PathError:
            pass
    try:
        check_collisions(valid)
    except PathError:
        assert not _oracle_ok(valid)
    else:
        assert _oracle_ok(valid)
