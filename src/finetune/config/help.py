"""What `--help` shows, and where predict.py and export.py write their logs.

Hydra's `--help` lists every option of every config group, the schema's internal `base_*`
nodes included (they are what each option extends, never chosen on a command line). The
`finetune_groups` resolver gives the options a user can choose instead: the YAML files of each
group in conf/, for conf/hydra/default.yaml's help template.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import OmegaConf

from finetune.config.messages import CONF_DIR

# Hydra's own config groups (run dirs, launchers): `--hydra-help` lists them.
NOT_APP_GROUPS = ("hydra",)


def config_groups_help() -> str:
    """`group: option, option` lines, one per config group of conf/ (its YAML files, sorted)."""
    lines = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in group.glob("*.yaml") if not f.stem.startswith("base_"))
        if options and group.name not in NOT_APP_GROUPS:
            lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def register_help_resolver() -> None:
    """Make `${finetune_groups:}` available to the config's help template."""
    if not OmegaConf.has_resolver("finetune_groups"):
        OmegaConf.register_new_resolver("finetune_groups", config_groups_help)


def without_run_dir(argv: Sequence[str]) -> list[str]:
    """`argv` of predict.py or export.py, plus the overrides that keep Hydra from making a run
    dir (`outputs/<command>/<time>/` with `.hydra/` and a log) when `output=` names the file
    to write: that folder would hold nothing but Hydra's own files. The log then goes to the
    console only. A `hydra.run.dir` on the command line is kept as given."""
    outputs = [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in ("output", "+output")]
    if (
        not outputs
        or outputs[-1] in ("", "null")
        or any(a.startswith("hydra.run.dir=") for a in argv)
    ):
        return list(argv)
    return [
        *argv,
        "hydra.run.dir=.",  # the working directory, which exists: nothing is created
        "hydra.output_subdir=null",
        "hydra.job_logging.root.handlers=[console]",
        "~hydra.job_logging.handlers.file",  # a FileHandler opens its file even unused
    ]
