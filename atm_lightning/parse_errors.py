"""jsonargparse's parse errors, with what would fix them where jsonargparse cannot know it."""

from __future__ import annotations

import re
from dataclasses import fields

from .merge import MERGERS

MERGER_KEY = "model.merger"


def explain_parse_error(message: str, argv: list[str] | None = None) -> str:
    """jsonargparse's ``message`` plus a hint: the merger names when ``--model.merger`` named no
    class, the merger an option belongs to, how to give a list. ``argv`` supplies the value the
    user gave, for the hint's example."""
    if message.startswith(f'Parser key "{MERGER_KEY}"') and "Expected a dot import path" in message:
        names = ", ".join(MERGERS[key].__name__ for key in ("atm", "tome", "evit", "none"))
        message += (
            f"\n--{MERGER_KEY} takes one of {names} (case matters), e.g. --{MERGER_KEY} ToMe "
            f"--{MERGER_KEY}.r 8, or a class path such as atm_lightning.merge.ATM"
        )
    option = re.search(r"class_path '[\w.]*?(\w+)'.*?Option '(\w+)' is not accepted", message, re.DOTALL)
    if message.startswith(f'Parser key "{MERGER_KEY}"') and option:
        message += "\n" + other_mergers_option(option.group(1), option.group(2), argv or [])
    key = re.match(r'Parser key "([^"]+)"', message)
    if key and "Expected a <class 'list'>" in message:
        name = "--" + key.group(1)
        message += f"\n{name} takes a list in brackets, e.g. {name} '[10, 11]', or one value at a time: {name}+ 10"
    return message


def other_mergers_option(merger: str, option: str, argv: list[str]) -> str:
    """Which merger classes take ``option`` that ``merger`` does not, and the switch to one."""
    owners = [cls.__name__ for cls in MERGERS.values() if option in {f.name for f in fields(cls) if f.init}]
    owners = list(dict.fromkeys(owners))
    if not owners:
        return f"no merger takes {option}; see `atm validate --help` for each merger's options"
    value = given_value(argv, option) or "VALUE"
    return (
        f"{option} is an option of {' and '.join(owners)}, not of {merger} (the merger this command "
        f"line runs); to switch, pass --{MERGER_KEY} {owners[0]} --{MERGER_KEY}.{option} {value}"
    )


def given_value(argv: list[str], option: str) -> str | None:
    """The value given to ``--model.merger.OPTION`` (or ``.init_args.OPTION``) in ``argv``."""
    names = {f"--{MERGER_KEY}.{option}", f"--{MERGER_KEY}.init_args.{option}"}
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name in names:
            return value if equals else (argv[i + 1] if i + 1 < len(argv) else None)
    return None
