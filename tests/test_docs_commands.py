"""Every `python train.py|predict.py|export.py ...` command in the docs (and in the config
files' comments) composes with the real config of its script (config.yaml, predict.yaml,
export.yaml): each `key=value` they name exists and has the right type (sweeps: each value), and
any error Hydra itself raises fails the test too."""

import re
import shlex

import pytest
from hydra.errors import HydraException

from conftest import REPO
from finetune.config import ConfigError, check_command_line, expand_home

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


# the primary config each script composes
SCRIPTS = {"train": "config", "predict": "predict", "export": "export"}


def train_commands(text: str, script: str = "train") -> list[tuple[int, list[str]]]:
    """(line number, arguments) of each `python <script>.py` command in markdown `text`.

    Placeholders: `...` (the rest of a command) is dropped; a whole value `key=<n>` becomes
    `key=???` (the key must exist, any type); inside a value `<run>` becomes `run`; an optional
    `[key=value]` loses its brackets. A `# comment` and anything after a shell operator or a
    closing backtick is not part of the command.
    """
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    commands = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in re.finditer(rf"python3? {script}\.py\b([^`\n]*)", line):
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


def documented() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in DOCS:
        for script, config_name in SCRIPTS.items():
            for number, args in train_commands(path.read_text(), script):
                found.append((f"{path.relative_to(REPO)}:{number}", config_name, args))
    return found


COMMANDS = documented()


def test_the_docs_have_commands_to_check():
    scripts = {config_name for _, config_name, _ in COMMANDS}
    assert len(COMMANDS) >= 5 and scripts == set(SCRIPTS.values()), [str(p) for p in DOCS]


@pytest.mark.parametrize(
    ("where", "config_name", "args"), COMMANDS, ids=[where for where, _, _ in COMMANDS]
)
def test_documented_command_composes(where, config_name, args):
    check_command_line(expand_home(args), config_name=config_name, strict=True)  # as train.py


@pytest.mark.parametrize(
    ("script", "line"),
    [
        ("train", "python train.py +trainer.max_epochs=2"),  # Hydra's own refusal
        ("train", "python train.py data=imagefolder"),  # a required key left unset
        ("predict", "python predict.py ckpt=<run> inputs=a.jpg format=onnx"),  # export's key
        ("export", "python export.py ckpt=<run> top_k=3"),  # predict's key
    ],
)
def test_a_documented_command_the_script_refuses_fails(script, line):
    [(_, args)] = train_commands(f"`{line}`", script)
    with pytest.raises((HydraException, ConfigError)):
        check_command_line(args, config_name=SCRIPTS[script], strict=True)


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
    check_command_line(commands[0], strict=True)
    check_command_line(commands[1], strict=True)
    for typo in commands[2:]:
        with pytest.raises(ConfigError):
            check_command_line(typo)


def test_the_groups_table_lists_every_option_of_every_group():
    """docs/configuration.md's Groups table names each file of each `conf/<group>/`
    (`efficientnet_lite0/1/2` stands for three)."""
    rows = {}
    for line in (REPO / "docs" / "configuration.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 3 and re.fullmatch(r"`\w+`", cells[1]):
            named = set()
            for option in re.findall(r"`([\w/]+)`", cells[2]):
                stem, *more = option.split("/")
                named |= {stem, *(stem[: -len(m)] + m for m in more)}
            rows.setdefault(cells[1].strip("`"), named)
    assert {"model", "strategy", "data", "augment", "optim", "trainer"} <= set(rows)
    for group, named in rows.items():
        options = {path.stem for path in (REPO / "conf" / group).glob("*.yaml")}
        assert options <= named, f"{group}: {sorted(options - named)} not in the table"
