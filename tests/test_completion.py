"""`asyncsync completion bash|zsh|fish`: each script comes from the real parser, holds every
command and option, parses in its shell, and completes in a real shell: bash always, zsh and
fish where they are installed (the tests skip without them). Help texts and choices full of
quotes, `$`, backticks and brackets reach each shell literally."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncsync import cli
from asyncsync.commands.completion import SHELLS, completion_script

BASH = shutil.which("bash")
ZSH = shutil.which("zsh")
FISH = shutil.which("fish")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")
needs_zsh = pytest.mark.skipif(ZSH is None, reason="zsh is not installed")
needs_fish = pytest.mark.skipif(FISH is None, reason="fish is not installed")

# Everything a shell could misread in a help text, a description or a choice.
NASTY = "it's \"quoted\" $HOME `id` $(id) (parens) [brackets] {braces} back\\slash 100%% a:b; & |"
NASTY_SHOWN = NASTY.replace("%%", "%")  # as --help prints it
NASTY_CHOICES = ("it's", "$HOME", "`id`", "a:b", "[x]", "a b")


def generated(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out


def nasty_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncsync")
    commands = parser.add_subparsers(dest="subcommand")
    odd = commands.add_parser("odd", help=NASTY)
    # The option table gives argparse its choices as a {a,b} metavar: both ways are read.
    odd.add_argument("--mode", metavar="{it's,$HOME,`id`,a:b}", help=NASTY)
    odd.add_argument("--flag", action="store_true", help=NASTY)
    odd.add_argument("thing", choices=NASTY_CHOICES, help=NASTY)
    return parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], list[argparse.Action]]]:
    """Each command path of ``parser`` and its actions, found independently of the module."""
    yield path, parser._actions
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from walk(subparser, (*path, name))


def choices_of(action: argparse.Action) -> list[str]:
    if action.choices is not None:
        return [str(choice) for choice in action.choices]
    listed = re.fullmatch(r"\{(.+)\}", str(action.metavar or ""))
    return listed.group(1).split(",") if listed else []


def section(shell: str, script: str, path: tuple[str, ...]) -> str:
    """The part of ``script`` that describes the command ``path``."""
    name = " ".join(path)
    if shell == "bash":  # its branch in each of _asyncsync_command, _value, _positional
        starts = [match.start() for match in
                  re.finditer(re.escape(f"\n    {shlex.quote(name)})\n"), script)]
        assert starts, name
        return "".join(script[start:script.index("\n        ;;", start)] for start in starts)
    if shell == "zsh":
        start = script.index("\n" + "_".join(["_asyncsync", *path]) + "() {\n")
        return script[start:script.index("\n}\n", start)]
    start = script.index("\n" + f"# asyncsync {name}".rstrip() + "\n")
    end = script.find("\n\n", start + 1)
    return script[start:end if end >= 0 else None]


def test_the_parser_has_the_completion_command() -> None:
    paths = {path for path, _ in walk(cli.build_parser())}
    assert {("completion",), ("metrics", "export"), ("config", "push")} <= paths


@pytest.mark.parametrize("shell", SHELLS)
def test_every_command_option_and_choice_is_in_the_script(
        shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    script = generated(shell, capsys)
    for path, actions in walk(cli.build_parser()):
        part = section(shell, script, path)
        for action in actions:
            if isinstance(action, argparse._SubParsersAction):
                for name in action.choices:
                    assert name in part, (shell, path, name)
                continue
            for spelling in action.option_strings:
                if shell == "fish":  # -l workers, -s q
                    word = f"-l {spelling[2:]}" if spelling[1] == "-" else f"-s {spelling[1:]}"
                else:
                    word = spelling
                assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", part), \
                    (shell, path, spelling)
            for choice in choices_of(action):
                assert choice in part, (shell, path, action.dest, choice)


def test_an_unknown_shell_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["completion", "tcsh"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid choice: 'tcsh'" in captured.err


def test_the_installed_command_prints_the_script() -> None:
    command = Path(sys.executable).parent / "asyncsync"
    if not command.exists():
        pytest.skip("asyncsync is not installed beside this Python")
    done = subprocess.run([str(command), "completion", "bash"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("complete -F _asyncsync asyncsync")


# -- each shell parses its script ---------------------------------------------------------

def check_syntax(shell: str, script: str, tmp_path: Path) -> None:
    file = tmp_path / f"completion.{shell}"
    file.write_text(script)
    done = subprocess.run([shell, "-n", str(file)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


@needs_bash
def test_bash_parses_the_scripts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    check_syntax("bash", generated("bash", capsys), tmp_path)
    check_syntax("bash", completion_script(nasty_parser(), "bash"), tmp_path)


@needs_zsh
def test_zsh_parses_the_scripts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    script = generated("zsh", capsys)
    assert script.startswith("#compdef asyncsync\n")
    check_syntax("zsh", script, tmp_path)
    check_syntax("zsh", completion_script(nasty_parser(), "zsh"), tmp_path)


@needs_fish
def test_fish_parses_the_scripts(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    check_syntax("fish", generated("fish", capsys), tmp_path)
    check_syntax("fish", completion_script(nasty_parser(), "fish"), tmp_path)


# -- bash completes -----------------------------------------------------------------------

def bash_complete(script: str, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY after the script's function ran on ``words``, the last being completed."""
    file = cwd / "completion.bash"
    file.write_text(script)
    program = (f"source {shlex.quote(str(file))}\n"
               f"COMP_WORDS=({' '.join(map(shlex.quote, words))})\n"
               "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
               "_asyncsync\n"
               "printf '%s\\0' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run([str(BASH), "--norc", "--noprofile", "-c", program],
                          capture_output=True, text=True, cwd=cwd, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [reply for reply in done.stdout.split("\0") if reply]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A working directory with a file, a directory and a directory with a space."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "my runs").mkdir()
    (tmp_path / "settings.toml").write_text("workers = 4\n")
    return tmp_path


@needs_bash
@pytest.mark.parametrize(("words", "expected"), [
    (["asyncsync", "pu"], ["push", "pull"]),
    (["asyncsync", ""], ["push", "watch", "run", "doctor", "pull", "verify", "runs",
                         "shards", "metrics", "status", "serve", "config", "completion"]),
    (["asyncsync", "--v"], ["--version"]),
    (["asyncsync", "push", "--addressing-style", ""], ["auto", "path", "virtual"]),
    (["asyncsync", "push", "--addressing-style", "v"], ["virtual"]),
    # readline splits --option=value at the "=" (it is in COMP_WORDBREAKS).
    (["asyncsync", "push", "--addressing-style", "=", ""], ["auto", "path", "virtual"]),
    (["asyncsync", "push", "--addressing-style", "=", "p"], ["path"]),
    (["asyncsync", "push", "--shard-by", ""], ["run", "file"]),
    (["asyncsync", "watch", "--log-format", ""], ["text", "json"]),
    (["asyncsync", "push", "--wor"], ["--workers"]),
    (["asyncsync", "push", "-q", "--json", "--wor"], ["--workers"]),
    (["asyncsync", "push", "--workers", ""], []),  # a number: nothing to offer
    (["asyncsync", "push", "--workers", "8", "runs", ""], []),  # s3://BUCKET: nothing
    (["asyncsync", "metrics", ""], ["export"]),
    (["asyncsync", "metrics", "export", "--ou"], ["--output"]),
    (["asyncsync", "metrics", "export", "-o", "set"], ["settings.toml"]),
    (["asyncsync", "config", ""], ["push", "watch", "run"]),
    (["asyncsync", "config", "--config", "settings.toml", ""], ["push", "watch", "run"]),
    (["asyncsync", "config", "--config", "set"], ["settings.toml"]),
    (["asyncsync", "config", "run", "--log-f"], ["--log-format"]),
    (["asyncsync", "config", "push", "--shard-by", ""], ["run", "file"]),
    (["asyncsync", "completion", ""], ["bash", "zsh", "fish"]),
    (["asyncsync", "push", ""], ["my runs", "runs"]),  # SRC: directories, spaces kept
    (["asyncsync", "push", "--state-dir", "m"], ["my runs"]),
    (["asyncsync", "push", "--config", "s"], ["settings.toml"]),
    (["asyncsync", "pull", "s3://bucket/prefix", ""], ["my runs", "runs"]),
    (["asyncsync", "doctor", ""], []),
    (["asyncsync", "run", "runs", "s3://b/p", "--", "./set"], []),  # no such command
    (["asyncsync", "run", "runs", "s3://b/p", "--", "python3", "set"], ["settings.toml"]),
    (["asyncsync", "run", "runs", "s3://b/p", "--", "python3", "--wor"], []),
])
def test_bash_completes(words: list[str], expected: list[str], tree: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    replies = bash_complete(generated("bash", capsys), words, tree)
    assert sorted(replies) == sorted(expected)


@needs_bash
def test_bash_completes_the_command_after_run_dashdash(
        tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    words = ["asyncsync", "run", "runs", "s3://b/p", "--", "bas"]
    assert "bash" in bash_complete(generated("bash", capsys), words, tree)


@needs_bash
@pytest.mark.parametrize(("words", "expected"), [
    (["asyncsync", "odd", "--mode", ""], ["it's", "$HOME", "`id`", "a:b"]),
    (["asyncsync", "odd", "--mode", "$"], ["$HOME"]),
    (["asyncsync", "odd", ""], list(NASTY_CHOICES)),
    (["asyncsync", "odd", "a"], ["a:b", "a b"]),
])
def test_bash_offers_odd_choices_literally(words: list[str], expected: list[str],
                                           tmp_path: Path) -> None:
    script = completion_script(nasty_parser(), "bash")
    assert bash_complete(script, words, tmp_path) == expected


# -- fish completes -----------------------------------------------------------------------

def fish_complete(script: str, line: str, cwd: Path) -> list[tuple[str, str]]:
    """(candidate, description) pairs for the command line ``line``."""
    file = cwd / "completion.fish"
    file.write_text(script)
    program = f"source {shlex.quote(str(file))}; complete -C {shlex.quote(line)}"
    env = {**os.environ, "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd / ".config"),
           "XDG_DATA_HOME": str(cwd / ".local")}
    done = subprocess.run([str(FISH), "--no-config", "-c", program], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    pairs = [line.partition("\t") for line in done.stdout.splitlines()]
    return [(candidate, description) for candidate, _, description in pairs]


@needs_fish
@pytest.mark.parametrize(("line", "expected"), [
    ("asyncsync pu", ["pull", "push"]),
    ("asyncsync push --addressing-style ", ["auto", "path", "virtual"]),
    ("asyncsync push --wor", ["--workers"]),
    ("asyncsync metrics ", ["export"]),
    ("asyncsync config ", ["push", "run", "watch"]),
    ("asyncsync completion ", ["bash", "fish", "zsh"]),
    ("asyncsync push --state-dir m", ["my runs/"]),
    ("asyncsync doctor ", []),
])
def test_fish_completes(line: str, expected: list[str], tree: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    candidates = fish_complete(generated("fish", capsys), line, tree)
    assert sorted(candidate for candidate, _ in candidates) == sorted(expected)


@needs_fish
def test_fish_describes_with_the_help_text(tree: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    candidates = dict(fish_complete(generated("fish", capsys), "asyncsync pu", tree))
    assert candidates["push"] == "upload a directory tree once (only what changed)"


@needs_fish
def test_fish_shows_odd_help_and_choices_literally(tmp_path: Path) -> None:
    script = completion_script(nasty_parser(), "fish")
    assert fish_complete(script, "asyncsync o", tmp_path) == [("odd", NASTY_SHOWN)]
    assert fish_complete(script, "asyncsync odd --f", tmp_path) == [("--flag", NASTY_SHOWN)]
    modes = [candidate for candidate, _ in fish_complete(script, "asyncsync odd --mode ",
                                                         tmp_path)]
    assert sorted(modes) == sorted(["it's", "$HOME", "`id`", "a:b"])
    things = [candidate for candidate, _ in fish_complete(script, "asyncsync odd ", tmp_path)]
    assert sorted(things) == sorted(NASTY_CHOICES)


# -- zsh completes ------------------------------------------------------------------------
# zsh completes only inside its line editor: a zsh under zpty loads the script from $fpath
# with compinit, gets a TAB, and prints what reaches compadd: the hits (-A) and their
# descriptions (-D keeps those of the hits), one a line. No comments in what is typed there:
# an interactive zsh -f reads "#" as a word.

ZSH_CAPTURE = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "PROMPT=; RPROMPT=; fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'COLUMNS=500; zstyle ":completion:*" list-grouped false; bindkey "^I" complete-word'
zpty -w z 'null-line() { echo -E - $'"'"'\0'"'"' }'
zpty -w z 'compprefuncs=(null-line); comppostfuncs=(null-line exit)'
zpty -w z 'compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a hits descriptions; local i
  if (( $@[(I)-d] )); then descriptions=( "${(@P)${@[$@[(i)-d]+1]}}" ); fi
  builtin compadd -A hits -D descriptions "$@"
  for i in {1..$#hits}; do print -r -- "HIT:$hits[i]"$'"'"'\t'"'"'"$descriptions[i]"; done
}'
zpty -w z "$2"$'\t'
integer nulls=0
local line
while zpty -r z line; do
  [[ $line == *$'\0'* ]] && { (( nulls++ )) && break || continue }
  (( nulls )) && print -r -- "$line"
done
zpty -d z
"""


def zsh_complete(script: str, line: str, cwd: Path) -> list[tuple[str, str]]:
    functions = cwd / "functions"
    functions.mkdir(exist_ok=True)
    (functions / "_asyncsync").write_text(script)
    capture = cwd / "capture.zsh"
    capture.write_text(ZSH_CAPTURE)
    env = {**os.environ, "HOME": str(cwd)}
    done = subprocess.run([str(ZSH), "-f", str(capture), str(functions), line],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60,
                          check=False)
    if done.returncode == 3:
        pytest.skip("zsh has no zsh/zpty module")
    hits = []
    for output in done.stdout.replace("\r", "").splitlines():
        if output.startswith("HIT:"):
            candidate, _, description = output[4:].partition("\t")
            # As it would be inserted in the line (it\'s, a\ b): unquoted.
            hits.append((re.sub(r"\\(.)", r"\1", candidate), description))
    return hits


@needs_zsh
@pytest.mark.parametrize(("line", "expected"), [
    ("asyncsync pu", ["pull", "push"]),
    ("asyncsync push --addressing-style ", ["auto", "path", "virtual"]),
    ("asyncsync push --addressing-style=", ["auto", "path", "virtual"]),
    ("asyncsync push --wor", ["--workers"]),
    ("asyncsync metrics ", ["export"]),
    ("asyncsync config push --shard-by ", ["file", "run"]),
    ("asyncsync completion ", ["bash", "fish", "zsh"]),
    ("asyncsync push runs --wor", ["--workers"]),  # options may follow a positional
    ("asyncsync push --state-dir m", ["my runs"]),
    ("asyncsync run runs s3://b/p -- python3 --wor", []),  # not asyncsync's options
])
def test_zsh_completes(line: str, expected: list[str], tree: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    hits = zsh_complete(generated("zsh", capsys), line, tree)
    assert sorted({candidate for candidate, _ in hits if candidate}) == expected


@needs_zsh
def test_zsh_shows_odd_help_and_choices_literally(tmp_path: Path) -> None:
    script = completion_script(nasty_parser(), "zsh")
    commands = zsh_complete(script, "asyncsync o", tmp_path)
    assert any(candidate == "odd" and NASTY_SHOWN in description
               for candidate, description in commands), commands
    flags = zsh_complete(script, "asyncsync odd --f", tmp_path)
    assert any(candidate == "--flag" and NASTY_SHOWN in description
               for candidate, description in flags), flags
    modes = {candidate for candidate, _ in zsh_complete(script, "asyncsync odd --mode ",
                                                       tmp_path)}
    assert modes == {"it's", "$HOME", "`id`", "a:b"}
    things = {candidate for candidate, _ in zsh_complete(script, "asyncsync odd ", tmp_path)}
    assert things == set(NASTY_CHOICES)
