"""The config: the schema of every key (`schema`) and the check that refuses a wrong key, option
or type with one message (`check`). Importing this package registers the schema in Hydra's
ConfigStore, which conf/ needs before it composes."""

from finetune.config.check import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    check_overrides,
    expand_home,
    validate,
)
from finetune.config.schema import SCHEMAS, register

register()

__all__ = [
    "CONF_DIR",
    "SCHEMAS",
    "ConfigError",
    "check_command_line",
    "check_overrides",
    "expand_home",
    "register",
    "validate",
]
