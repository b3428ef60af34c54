"""The "Run in Docker" command of docs/deploy.md, read from that page, so the image test runs what
users are told to run and the static tests keep the script and the example workflow in step."""

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join("docs", "deploy.md")


def section(title: str, page: str = PAGE) -> str:
    """The text of `## title` in `page` (a path under the repository), up to the next `## `."""
    text = open(os.path.join(ROOT, page)).read()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no '## {title}' section"
    return match.group(1)


def docker_run_flags(text: str) -> tuple[list[str], str]:
    """The options of the first `docker run` command in `text` (continuation lines joined), less
    its -e/--env settings, and the image it runs."""
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next((ln.strip() for ln in joined.splitlines() if ln.strip().startswith("docker run ")), None)
    assert line, "no `docker run` command found"
    words = shlex.split(line, comments=True)[2:]
    flags, image = [], None
    takes_value = {"--tmpfs", "--shm-size", "--stop-timeout", "--network", "--gpus", "--user", "--name"}
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-e", "--env"):
            i += 2
            continue
        if word.startswith("-"):
            flags.append(word)
            if word in takes_value:
                flags.append(words[i + 1])
                i += 1
        else:
            image = word
            break
        i += 1
    return flags, image


def documented_run_flags() -> list[str]:
    """The documented `docker run` options: what every container in the image test runs with."""
    flags, _ = docker_run_flags(section("Run in Docker"))
    return flags


def option(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None
