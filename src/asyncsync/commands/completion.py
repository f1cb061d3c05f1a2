"""`completion`: a bash, zsh or fish completion script, written from the CLI's own parser.

The script is generated from `cli.build_parser()` each time it is asked for, never kept by
hand, so it cannot drift from the flags: every command (``metrics export`` and ``config push``
included), every option in each of its spellings, and what a value completes:

* the choices of an option that has them. The option table hands argparse its choices as a
  ``{a,b,c}`` metavar, not as ``choices=`` (`options.resolve` checks the value, whichever
  layer it came from), so such a metavar is read as the choices;
* file names for a PATH or FILE metavar, directory names for DIR;
* for a positional argument: its choices; nothing for an ``s3://`` URL (local names would
  only mislead); directory names when its help says directory; file names otherwise;
* after ``--``, for a command whose usage shows ``-- COMMAND`` (run): a command line of its
  own, which main() hands over untouched.

The three writers are plain string building. Help texts reach each shell through its own
quoting rules (quotes, ``$``, backticks, brackets, colons, ``%``), and the words offered are
never evaluated by the shell that offers them.
"""

from __future__ import annotations

import argparse
import enum
import re
import shlex
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..errors import EXIT_OK

SHELLS = ("bash", "zsh", "fish")


class Paths(enum.Enum):
    """Which local names a value completes."""

    NONE = "nothing"
    FILES = "files"
    DIRECTORIES = "directories"


@dataclass(frozen=True)
class Value:
    """An option's value or a positional argument: what the shell offers for it."""

    name: str  # the metavar: N, SRC, FILE
    help: str
    choices: tuple[str, ...] = ()
    paths: Paths = Paths.NONE


@dataclass(frozen=True)
class Flag:
    spellings: tuple[str, ...]  # -q, --quiet
    help: str
    value: Value | None  # None: the option takes no value
    repeatable: bool  # --include A --include B, -vv


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # () for the program itself, ("metrics", "export")
    help: str
    flags: tuple[Flag, ...]
    positionals: tuple[Value, ...]
    subcommands: tuple[Command, ...]
    takes_command: bool  # `run DIR DEST -- COMMAND [ARGS...]`

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def walk(self) -> Iterator[Command]:
        yield self
        for subcommand in self.subcommands:
            yield from subcommand.walk()


_CHOICES_METAVAR = re.compile(r"\{([^{}]+)\}")


def command_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
                 help: str = "") -> Command:
    """The commands, options and arguments of ``parser`` and of its subparsers, nested."""
    formatter = parser._get_formatter()
    flags: list[Flag] = []
    positionals: list[Value] = []
    subcommands: list[Command] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue  # hidden from --help: hidden from completion too
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: _text(formatter, choice) for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                subcommands.append(command_tree(subparser, (*path, name), helps.get(name, "")))
        elif action.option_strings:
            value = None if action.nargs == 0 else _value(action, _text(formatter, action))
            repeatable = isinstance(action, argparse._AppendAction | argparse._CountAction
                                    | argparse._AppendConstAction)
            flags.append(Flag(tuple(action.option_strings), _text(formatter, action), value,
                              repeatable))
        else:
            positionals.append(_value(action, _text(formatter, action), positional=True))
    # main() passes what follows "--" to `run` as the training command; only the usage line
    # tells the parser's readers so.
    takes_command = " -- " in (parser.usage or "")
    return Command(path, help, tuple(flags), tuple(positionals), tuple(subcommands),
                   takes_command)


def _text(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """The help as --help prints it (%(default)s expanded, %% undone), on one line."""
    if not action.help:
        return ""
    return " ".join(formatter._expand_help(action).split())


def _value(action: argparse.Action, help: str, positional: bool = False) -> Value:
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    if action.choices is not None:
        return Value(metavar, help, tuple(str(choice) for choice in action.choices))
    listed = _CHOICES_METAVAR.fullmatch(metavar)
    if listed:
        return Value(metavar, help, tuple(listed.group(1).split(",")))
    if metavar.endswith("DIR"):
        return Value(metavar, help, paths=Paths.DIRECTORIES)
    if metavar.endswith(("FILE", "PATH")):
        return Value(metavar, help, paths=Paths.FILES)
    if not positional:  # N, SECONDS, URL, GLOB: nothing the shell could know
        return Value(metavar, help)
    if help.startswith("s3://") and "local" not in help:
        return Value(metavar, help)
    if "directory" in help:
        return Value(metavar, help, paths=Paths.DIRECTORIES)
    return Value(metavar, help, paths=Paths.FILES)


def _identifier(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _wrapped(first: str, words: Iterable[str], indent: str, width: int = 96) -> list[str]:
    """``first`` (which opens a list) and then ``words``, on as many lines as ``width`` needs."""
    lines = [first]
    for word in words:
        if lines[-1] == first:
            lines[-1] += word
        elif len(lines[-1]) + 1 + len(word) > width:
            lines.append(indent + word)
        else:
            lines[-1] += " " + word
    return lines


# -- bash ---------------------------------------------------------------------------------
# bash has no descriptions: the script holds names and choices only, each a single-quoted
# word where it needs quoting (shlex.quote's quoting is bash's too).

_BASH_HELPERS = r"""
# Put in COMPREPLY those of "$@" that start with the word being completed. Not compgen -W:
# it would expand a $ or a backtick in the words.
_{fn}_words() {{
    local word
    for word in "$@"; do
        [[ $word == "$cur"* ]] && COMPREPLY+=("$word")
    done
}}

# Put in COMPREPLY what `compgen $1` finds (-f files, -d directories, -c commands), one a
# line, so that names with spaces stay whole.
_{fn}_compgen() {{
    local name
    [[ $1 != -c ]] && compopt -o filenames 2>/dev/null  # quote names, mark directories
    while IFS= read -r name; do
        COMPREPLY+=("$name")
    done < <(compgen "$1" -- "$cur")
}}

# Whether $1 is one of the other arguments.
_{fn}_in() {{
    local word=$1 other
    shift
    for other in "$@"; do
        [[ $other == "$word" ]] && return 0
    done
    return 1
}}

_{fn}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}}
    local command_path='' position=0 option='' dashdash=0 word i
    local commands=() options=() valued=() takes_command=''
    COMPREPLY=()
    _{fn}_command ''
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ $word == = && -n $option ]]; then
            continue  # readline splits --option=value at the "=": the value comes next
        elif [[ -n $option ]]; then
            option=''  # this word was the option's value
        elif ((dashdash)); then
            position=$((position + 1))
        elif [[ $word == -- ]]; then
            dashdash=$i
        elif [[ $word == -* ]]; then
            _{fn}_in "$word" "${{valued[@]}}" && option=$word
        elif ((position == 0)) && _{fn}_in "$word" "${{commands[@]}}"; then
            command_path=${{command_path:+$command_path }}$word  # its own options from here
            _{fn}_command "$command_path"
        else
            position=$((position + 1))
        fi
    done
    [[ $cur == = && -n $option ]] && cur=''  # completing right after "--option="
    if [[ -n $option ]]; then
        _{fn}_value "$command_path" "$option"
    elif ((dashdash)) && [[ -n $takes_command ]]; then
        # main() hands all that follows "--" over as a command line of its own: its
        # command, then file names.
        if ((COMP_CWORD == dashdash + 1)); then
            _{fn}_compgen -c
        else
            _{fn}_compgen -f
        fi
    elif [[ $cur == -* ]] && ((!dashdash)); then
        _{fn}_words "${{options[@]}}"
    elif ((position == 0 && ${{#commands[@]}} > 0)); then
        _{fn}_words "${{commands[@]}}"
    else
        _{fn}_positional "$command_path" "$position"
    fi
    return 0
}}

complete -F _{fn} {prog}
"""


def _bash_completes(value: Value, fn: str) -> str | None:
    if value.choices:
        return " ".join([f"_{fn}_words", *map(shlex.quote, value.choices)])
    if value.paths is Paths.FILES:
        return f"_{fn}_compgen -f"
    if value.paths is Paths.DIRECTORIES:
        return f"_{fn}_compgen -d"
    return None


def _bash_case(function: str, comment: str, branches: list[tuple[str, list[str]]]) -> list[str]:
    """``function() { case $1 in NAME) case $2 in ...`` with the branches that do something."""
    lines = [f"# {comment}", f"{function}() {{", "    case $1 in"]
    for name, inner in branches:
        if inner:
            lines += [f"    {shlex.quote(name)})", "        case $2 in", *inner,
                      "        esac", "        ;;"]
    return [*lines, "    esac", "}"]


def bash_script(root: Command, prog: str) -> str:
    fn = _identifier(prog)
    lines = [
        f"# bash completion for {prog}, generated by `{prog} completion bash` from its own",
        "# parser: regenerate it after an upgrade.",
        f"#   source <({prog} completion bash)    # or save it in /etc/bash_completion.d/{prog}",
        "",
        "# Set the subcommands, options and options that take a value of command $1",
        f"# (\"\" for {prog} itself, \"metrics export\"), and whether a command line of its own",
        "# follows its \"--\".",
        f"_{fn}_command() {{",
        "    case $1 in",
    ]
    indent = " " * 12
    for command in root.walk():
        lines.append(f"    {shlex.quote(command.name)})")
        names = [shlex.quote(sub.path[-1]) for sub in command.subcommands]
        spellings = [shlex.quote(s) for flag in command.flags for s in flag.spellings]
        valued = [shlex.quote(s) for flag in command.flags if flag.value
                  for s in flag.spellings]
        for variable, words in (("commands", names), ("options", spellings),
                                ("valued", valued)):
            wrapped = _wrapped(f"        {variable}=(", words, indent)
            lines += wrapped[:-1] + [wrapped[-1] + ")"]
        lines.append(f"        takes_command={'1' if command.takes_command else ''}")
        lines.append("        ;;")
    lines += ["    esac", "}", ""]

    values = []
    positionals = []
    for command in root.walk():
        inner = []
        for flag in command.flags:
            if flag.value and (completes := _bash_completes(flag.value, fn)):
                pattern = "|".join(map(shlex.quote, flag.spellings))
                inner.append(f"        {pattern}) {completes} ;;")
        values.append((command.name, inner))
        inner = []
        for index, value in enumerate(command.positionals):
            if completes := _bash_completes(value, fn):
                inner.append(f"        {index}) {completes} ;;")
        positionals.append((command.name, inner))
    lines += _bash_case(f"_{fn}_value", "Complete the value of option $2 of command $1.",
                        values)
    lines.append("")
    lines += _bash_case(f"_{fn}_positional",
                        "Complete positional argument $2 (0: the first) of command $1.",
                        positionals)
    return "\n".join(lines) + "\n" + _BASH_HELPERS.format(fn=fn, prog=shlex.quote(prog))


# -- zsh ----------------------------------------------------------------------------------
# An _arguments spec is read three times: by zsh (the single quotes around it), by
# _arguments ("[help]" ends at an unescaped "]", a ":message:" at an unescaped ":"), and an
# action "(a b c)" is eval'ed by _arguments as a list of words. Messages are shown through
# zformat, where "%" starts an escape.


def _zsh_quote(text: str) -> str:
    """``text`` as one single-quoted zsh word."""
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_escape(text: str, special: str) -> str:
    """``text`` with a backslash before each backslash and each of ``special``."""
    return "".join("\\" + char if char == "\\" or char in special else char for char in text)


def _zsh_help(text: str) -> str:
    """For inside an option's ``[...]``."""
    return _zsh_escape(text, "[]")


def _zsh_message(text: str) -> str:
    """For a ``:message:`` part."""
    return _zsh_escape(text, ":").replace("%", "%%")


def _zsh_action(value: Value, positional: bool = False) -> str:
    if value.choices:
        # Each choice a word for the eval, every character but letters and digits
        # backslashed; that also hides a ":" from _arguments' parsing.
        words = (re.sub(r"([^A-Za-z0-9])", r"\\\1", choice) for choice in value.choices)
        return "(" + " ".join(words) + ")"
    if value.paths is Paths.FILES:
        return "_files"
    if value.paths is Paths.DIRECTORIES:
        return "_files -/"
    if positional:  # not " ": it would hide the options that may come instead
        return "_nothing"
    return " "  # _arguments: a value is expected, but nothing can be offered


def _zsh_flag_specs(flag: Flag) -> list[str]:
    if flag.repeatable:
        prefix = "*"
    elif len(flag.spellings) > 1:  # -q or --quiet: once either is given, neither again
        prefix = "(" + " ".join(flag.spellings) + ")"
    else:
        prefix = ""
    # A {a,b,c} metavar says less than the option's name: "addressing style".
    message = flag.value.name if flag.value and not flag.value.choices else (
        flag.spellings[-1].lstrip("-").replace("-", " "))
    specs = []
    for spelling in flag.spellings:
        spec = f"{prefix}{spelling}"
        if flag.value is not None:
            # --name=VALUE or --name VALUE; -oVALUE or -o VALUE.
            spec += "=" if spelling.startswith("--") else "+"
        spec += f"[{_zsh_help(flag.help)}]"
        if flag.value is not None:
            spec += f":{_zsh_message(message)}:{_zsh_action(flag.value)}"
        specs.append(spec)
    return specs


_ZSH_COMMAND_LINE = [
    "    # main() hands all that follows the first \"--\" over as a command line of its own.",
    "    local dashdash=${words[(i)--]}",
    "    if (( dashdash < CURRENT )); then",
    "        words=(\"${(@)words[dashdash+1,-1]}\")",
    "        (( CURRENT -= dashdash ))",
    "        _normal",
    "        return",
    "    fi",
]


def _zsh_function(command: Command, fn: str) -> list[str]:
    name = "_" + "_".join([fn, *map(_identifier, command.path)])
    specs = [spec for flag in command.flags for spec in _zsh_flag_specs(flag)]
    for value in command.positionals:
        specs.append(f":{_zsh_message(value.help or value.name)}:{_zsh_action(value, True)}")
    if command.subcommands:
        specs += [":command:->command", "*::argument:->argument"]
    head = f"    _arguments -s -S{' -C' if command.subcommands else ''}"
    call = [head + " \\", *(f"        {_zsh_quote(spec)} \\" for spec in specs)]
    if not command.subcommands:
        return [f"{name}() {{", *(_ZSH_COMMAND_LINE if command.takes_command else []),
                *call[:-1], call[-1][:-2], "}"]
    # _describe splits "name:description" at an unescaped ":" and drops backslashes.
    described = [_zsh_quote(_zsh_escape(sub.path[-1], ":") + ":" + _zsh_escape(sub.help, ""))
                 for sub in command.subcommands]
    context = "-".join([fn, *command.path])
    lines = [
        f"{name}() {{",
        "    local curcontext=$curcontext state state_descr line ret=1",
        "    typeset -A opt_args",
        *call[:-1], call[-1][:-2] + " && ret=0",
        "    case $state in",
        "    command)",
        "        local -a commands=(",
        *(f"            {item}" for item in described),
        "        )",
        f"        _describe -t commands {_zsh_quote(context + ' command')} commands && ret=0",
        "        ;;",
        "    argument)",
        f"        curcontext=${{curcontext%:*:*}}:{context}-$words[1]:",
        "        case $words[1] in",
    ]
    for sub in command.subcommands:
        function = "_" + "_".join([fn, *map(_identifier, sub.path)])
        lines.append(f"        {_zsh_quote(sub.path[-1])}) {function} && ret=0 ;;")
    return [*lines, "        esac", "        ;;", "    esac", "    return ret", "}"]


def zsh_script(root: Command, prog: str) -> str:
    fn = _identifier(prog)
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}, generated by `{prog} completion zsh` from its own parser:",
        f"# regenerate it after an upgrade. Save it as _{fn} in a directory of $fpath.",
    ]
    for command in root.walk():
        lines += ["", *_zsh_function(command, fn)]
    lines += [
        "",
        "# Autoloaded from $fpath, this file is the function's body; sourced, it registers it.",
        f'if [[ $funcstack[1] == _{fn} ]]; then',
        f'    _{fn} "$@"',
        "else",
        f"    compdef _{fn} {prog}",
        "fi",
    ]
    return "\n".join(lines) + "\n"


# -- fish ---------------------------------------------------------------------------------
# fish's single quotes escape only \ and '. The words of -a are expanded by fish (they may
# be command substitutions), so each choice is quoted once for that, then all of them again
# as the one argument of -a; -d is shown as it is.


def _fish_quote(text: str) -> str:
    if re.fullmatch(r"[\w./,:=@+-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_arguments(words: Iterable[str]) -> str:
    return _fish_quote(" ".join(map(_fish_quote, words)))


def _fish_condition(command: Command) -> str:
    """fish true while completing ``command``'s own words (not one of its subcommands')."""
    if not command.path:
        return "__fish_use_subcommand"
    tests = [f"__fish_seen_subcommand_from {_fish_quote(name)}" for name in command.path]
    if command.subcommands:
        names = " ".join(_fish_quote(sub.path[-1]) for sub in command.subcommands)
        tests.append(f"not __fish_seen_subcommand_from {names}")
    return "; and ".join(tests)


def _fish_value(value: Value) -> list[str]:
    if value.choices:
        return ["-f", "-a", _fish_arguments(value.choices)]
    if value.paths is Paths.FILES:
        return ["-F"]
    if value.paths is Paths.DIRECTORIES:
        return ["-f", "-a", "'(__fish_complete_directories)'"]
    return ["-f"]


def fish_script(root: Command, prog: str) -> str:
    lines = [
        f"# fish completion for {prog}, generated by `{prog} completion fish` from its own",
        "# parser: regenerate it after an upgrade. Save it in ~/.config/fish/completions/",
        f"# as {prog}.fish.",
    ]
    for command in root.walk():
        start = f"complete -c {_fish_quote(prog)} -n {_fish_quote(_fish_condition(command))}"
        lines += ["", f"# {prog} {command.name}".rstrip()]
        for sub in command.subcommands:
            lines.append(f"{start} -f -a {_fish_quote(sub.path[-1])} -d {_fish_quote(sub.help)}")
        for flag in command.flags:
            parts = [start]
            for spelling in flag.spellings:
                if spelling.startswith("--"):
                    parts += ["-l", _fish_quote(spelling[2:])]
                elif len(spelling) == 2:
                    parts += ["-s", _fish_quote(spelling[1:])]
                else:  # -name: an old-style long option
                    parts += ["-o", _fish_quote(spelling[1:])]
            if flag.value is not None:
                parts += ["-r", *_fish_value(flag.value)]
            parts += ["-d", _fish_quote(flag.help)]
            lines.append(" ".join(parts))
        # What the positional arguments take: fish cannot tell one from the next, so their
        # choices are offered and files only if one of them is a local name.
        choices = [choice for value in command.positionals for choice in value.choices]
        if choices:
            lines.append(f"{start} -f -a {_fish_arguments(choices)}")
        elif not command.takes_command and not any(
                value.paths is not Paths.NONE for value in command.positionals):
            lines.append(f"{start} -f")
    return "\n".join(lines) + "\n"


WRITERS: dict[str, Callable[[Command, str], str]] = {
    "bash": bash_script, "zsh": zsh_script, "fish": fish_script,
}


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    return WRITERS[shell](command_tree(parser), parser.prog)


def run_completion(parser: argparse.ArgumentParser, shell: str) -> int:
    print(completion_script(parser, shell), end="")
    return EXIT_OK
