"""The config: the schema of every key (`schema`; allowed values and ranges in `values`) and the
checks that refuse a wrong key, option or type with one message (`check` for a command line,
`validate` for a config, `messages` for what they say). Importing this package registers the
schema in Hydra's ConfigStore, which conf/ needs before it composes."""

from finetune.config.check import check_command_line, check_overrides, expand_home
from finetune.config.help import register_help_resolver, without_run_dir
from finetune.config.messages import CONF_DIR, ConfigError
from finetune.config.schema import SCHEMAS, register
from finetune.config.validate import check_fields, validate

register()
register_help_resolver()

__all__ = [
    "CONF_DIR",
    "SCHEMAS",
    "ConfigError",
    "check_command_line",
    "check_fields",
    "check_overrides",
    "expand_home",
    "register",
    "register_help_resolver",
    "validate",
    "without_run_dir",
]
