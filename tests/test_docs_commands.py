"""Every `python train.py ...` command in the docs (and in the config files' comments) composes
with the real config: each `key=value` they name exists and has the right type (sweeps: each
value)."""

import re
import shlex

import pytest

from conftest import REPO
from finetune.config import ConfigError, check_command_line

# The README, docs/, each folder's README and the examples in the config files' comments.
DOCS = sorted(
    {
        REPO / "README.md",
        *REPO.glob("docs/**/*.md"),
        *REPO.glob("*/README.md"),
        *REPO.glob("conf/**/*.yaml"),
    }
)
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def train_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, arguments) of each `python train.py` command in markdown `text`.

    Placeholders: `...` (the rest of a command) is dropped; a whole value `key=<n>` becomes
    `key=???` (the key must exist, any type); inside a value `<run>` becomes `run`; an optional
    `[key=value]` loses its brackets. A `# comment` and anything after a shell operator or a
    closing backtick is not part of the command.
    """
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    commands = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in re.finditer(r"python3? train\.py\b([^`\n]*)", line):
            rest = re.sub(r"=<[^<>]*>(?=\s|$)", "=???", match[1])
            rest = re.sub(r"<([^<>]*)>", lambda m: re.sub(r"\W+", "_", m[1]), rest)
            try:
                words = shlex.split(rest, comments=True)
            except ValueError:  # an unbalanced quote: prose, not a command
                continue
            args = []
            for word in words:
                if word in SHELL_OPERATORS:
                    break
                if word == "...":
                    continue
                if word.startswith("[") and "=" in word.split("[", 1)[1].split("]", 1)[0]:
                    word = word.removeprefix("[").removesuffix("]")  # an optional override
                args.append(word)
            commands.append((number, args))
    return commands


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for number, args in train_commands(path.read_text()):
            found.append((f"{path.relative_to(REPO)}:{number}", args))
    return found


COMMANDS = documented()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 5, [str(p) for p in DOCS]


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_composes(where, args):
    check_command_line(args)


def test_the_extraction_finds_keys_behind_placeholders_and_catches_a_typo():
    text = (
        "```bash\n"
        "python train.py -m hparams_search=optuna [hydra.sweeper.n_trials=30]  # a search\n"
        "python train.py ... hydra.run.dir=outputs/runs/<run> ckpt_path=last trainer.devices=<n>\n"
        "python train.py model=resnet18 \\\n    strategy=top_k strategy.kk=1\n"
        "```\n"
        "Run `python train.py trainer.max_epoch=3` for a short run.\n"
    )
    commands = [args for _, args in train_commands(text)]
    assert commands == [
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=30"],
        ["hydra.run.dir=outputs/runs/run", "ckpt_path=last", "trainer.devices=???"],
        ["model=resnet18", "strategy=top_k", "strategy.kk=1"],
        ["trainer.max_epoch=3"],
    ]
    check_command_line(commands[0])
    check_command_line(commands[1])
    for typo in commands[2:]:
        with pytest.raises(ConfigError):
            check_command_line(typo)
