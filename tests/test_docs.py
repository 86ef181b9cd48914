"""The README and docs/ against the code: short front door, every command runnable as written, tables from data."""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from resnet.config import EvalConfig, PredictConfig, TrainConfig, build_parser

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"train.py": TrainConfig, "evaluate.py": EvalConfig, "predict.py": PredictConfig}


def commands(text: str) -> list[str]:
    """Shell commands in a Markdown text: code-block lines and inline `code` that run a script of ours."""
    blocks = re.findall(r"```\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`\n]+)`", text)
    ours = re.compile(r"^\s*(\w+=\S+ )*(accelerate launch|python )")  # a command, after any VAR=value
    return [line.split("#")[0].strip() for line in lines if ours.match(line)]


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    for section in ("## Install", "## Quick start", "## Hand in a predictions file", "## Compare runs", "## Results",
                    "## Tests"):
        assert section in text, section
    assert "python -m pytest" in text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_names_files_and_flags_that_exist(doc):
    checked = 0
    for line in commands(doc.read_text()):
        words = shlex.split(line.replace("<", "").replace(">", ""))
        for flag, value in zip(words, words[1:]):
            if flag in ("--config_file", "--config") and not value.startswith(("RECIPE", "recipe", "runs/")):
                assert (ROOT / value).is_file() or value.endswith("config.yaml"), f"{doc.name}: {line}"
        script = next((w for w in words if w in SCRIPTS or w.startswith("bench/")), None)
        if script is None:
            continue
        assert (ROOT / script).is_file(), f"{doc.name}: {line}"
        if script in SCRIPTS and "[" not in line:  # a usage line ([--flag ...]) names flags, not values
            args = [w for w in words[words.index(script) + 1:] if w not in ("...", "--help")]
            args = [a for a in args if not a.startswith("N")]  # placeholders such as --machine_rank N
            parser = build_parser(SCRIPTS[script], "")
            parser.error = _raise  # type: ignore[method-assign]
            parser.parse_args([a if not a.startswith("configs/") else str(ROOT / a) for a in args])
            checked += 1
    if doc.name == "README.md":
        assert checked >= 6


def _raise(message: str):
    raise AssertionError(message)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_link_points_at_a_file_that_exists(doc):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
        if not target.startswith("http"):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}"


def test_every_table_is_built_from_results():
    proc = subprocess.run([sys.executable, "bench/tables.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr



# Our own machines' paths and words: a reader has a checkout and the official CIFAR-10 files, nothing else.
OUR_SET_UP = re.compile(r"\.\./|(?<![\w.])/tmp\b|~/(?!\.cache/cifar10)|\bworkplace\b|\blent\b|\bour machines?\b|"
                        r"\bsessions?\b", re.I)


@pytest.mark.parametrize("doc", [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_docs_speak_of_the_readers_set_up_not_ours(doc):
    found = [f"{doc.name}:{n}: {m.group(0)!r} in ...{line[max(m.start() - 50, 0):m.end() + 30]!r}..."
             for n, line in enumerate(doc.read_text().splitlines(), 1) for m in OUR_SET_UP.finditer(line)]
    assert not found, ("paths outside the repository or words of our own set-up (write for a user with the "
                       "official CIFAR-10 files):\n" + "\n".join(found))
