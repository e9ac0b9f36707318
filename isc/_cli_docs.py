"""``isc completion`` and ``isc man``: shell completion and a man page, made from the parser.

Both read the ``isc`` parser (:func:`isc.cli.build_parser`) when they run, so
they name every verb and option the installed ``isc`` has, and nothing else:

==========================  ===================================================
``isc completion bash``     a bash completion script: verbs, each verb's
                            options, the choices of an option that has them,
                            file names elsewhere (``eval "$(isc completion
                            bash)"``, or save it in
                            ``~/.local/share/bash-completion/completions/isc``)
``isc completion zsh``      the same for zsh, through its ``bashcompinit``
``isc man``                 the isc(1) man page in roff (``isc man > isc.1;
                            man ./isc.1``)
==========================  ===================================================
"""

from __future__ import annotations

import argparse
import re
import sys

from isc import __version__

SHELLS = ("bash", "zsh")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``completion`` and ``man`` to the ``isc`` parser's ``commands``."""
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description='Print a completion script for SHELL: eval "$(isc completion bash)" '
        "in ~/.bashrc, or save it as ~/.local/share/bash-completion/completions/isc.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    completion.set_defaults(docs=lambda parser, args: completion_script(parser, args.shell))
    man = commands.add_parser(
        "man",
        help="print the isc(1) man page (roff)",
        description="Print the isc(1) man page: isc man > isc.1; man ./isc.1",
    )
    man.set_defaults(docs=lambda parser, args: man_page(parser))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    sys.stdout.write(args.docs(parser, args))
    return 0


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    from isc.cli import verbs

    return verbs(parser)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


# -- shell completion ---------------------------------------------------------------------


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`)."""
    verbs = _verbs(parser)
    words = {"": sorted({name.split()[0] for name in verbs} | _flags(parser))}
    choices: dict[str, list[str]] = {}
    for name, sub in verbs.items():
        first, _, rest = name.partition(" ")
        words.setdefault(first, [])
        words[first] += ([rest] if rest else []) + sorted(_flags(sub))
        for action in _options(sub):
            if action.choices:
                for flag in action.option_strings:
                    choices[f"{first}:{flag}"] = [str(c) for c in action.choices]
        positional_choices = [a for a in sub._actions if not a.option_strings and a.choices]
        for action in positional_choices:
            if not isinstance(action, argparse._SubParsersAction):
                words[first] += [str(c) for c in action.choices]
    cases = "\n".join(
        f'        "{verb}") words="{" ".join(dict.fromkeys(found))}" ;;'
        for verb, found in words.items()
    )
    values = "\n".join(
        f'        "{key}") COMPREPLY=($(compgen -W "{" ".join(found)}" -- "$cur")); return ;;'
        for key, found in sorted(choices.items())
    )
    script = f"""# {shell} completion for isc {__version__}, made by `isc completion {shell}`
_isc() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local verb="" words i
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ ${{COMP_WORDS[i]}} != -* ]]; then verb="${{COMP_WORDS[i]}}"; break; fi
    done
    case "$verb:$prev" in
{values}
    esac
    case "$verb" in
{cases}
        *) words="" ;;
    esac
    if [[ -z $verb || $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _isc isc
"""
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    return script


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in _options(parser) for flag in action.option_strings}


# -- the man page -------------------------------------------------------------------------


def man_page(parser: argparse.ArgumentParser) -> str:
    """isc(1) in roff (the man macros): every verb with its usage, description and options."""
    lines = [
        f'.TH ISC 1 "" "isc {__version__}" "User Commands"',
        ".SH NAME",
        rf"isc \- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        r".B isc",
        r"[\fB\-\-version\fR] [\fB\-v\fR|\fB\-q\fR] [\fB\-\-json\fR] \fIVERB\fR [\fIARGS\fR]",
        ".SH DESCRIPTION",
        "Each verb below does one thing. The options below go before or after the verb "
        "(\\fB\\-\\-json\\fR where the verb has a report to print).",
        ".SH OPTIONS",
        *_option_items(parser, ()),
        ".SH VERBS",
    ]
    for name, sub in _verbs(parser).items():
        usage = " ".join(sub.format_usage().split()[1:])  # without "usage:"
        lines += [f".SS {_roff(name)}", _roff(usage)]
        if sub.description:
            lines += [".PP", _roff(sub.description)]
        positionals = [a for a in sub._actions if not a.option_strings and a.help]
        for action in positionals:
            lines += [".TP", rf"\fI{_roff(action.metavar or action.dest)}\fR", _roff(action.help)]
        lines += _option_items(sub, ("verbose", "quiet"))
    lines += [
        ".SH EXIT STATUS",
        "0 on success; 1 when the verb failed (one line on stderr says why and what to do); "
        "2 for a usage error; 130 when interrupted.",
        ".SH SEE ALSO",
        r"\fBqemu\-img\fR(1), \fBqemu\-nbd\fR(8), \fBnbdkit\fR(1), \fBnbdcopy\fR(1); "
        "README.md of isc.",
    ]
    return "\n".join(lines) + "\n"


def _option_items(parser: argparse.ArgumentParser, told: tuple[str, ...]) -> list[str]:
    """``.TP`` items for the options of ``parser``, but help and those ``told`` already."""
    items = []
    for action in _options(parser):
        if isinstance(action, argparse._HelpAction) or action.dest in told:
            continue
        takes = action.nargs != 0
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}"
            if action.choices
            else action.dest.upper()
        )
        flags = ", ".join(
            rf"\fB{_roff(flag)}\fR" + (rf" \fI{_roff(str(metavar))}\fR" if takes else "")
            for flag in action.option_strings
        )
        items += [".TP", flags, _roff(action.help or "")]
    return items


def _roff(text: str) -> str:
    """``text`` as roff prose: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", r"\e").replace("-", r"\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)
