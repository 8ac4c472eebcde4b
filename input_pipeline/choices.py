"""The one check of a setting against its allowed values, used by every module.

The module that uses a choice owns its tuple of allowed values (for example
`input_pipeline.cache.CACHE_MODES`, `reid_jax.models.NECKS`,
`reid_jax.train_step.LOSS_TYPES`) and checks it with `check_choice`;
`reid_jax.config_lib.validate` imports the same tuples to check a config at start-up.
The check lives here, at the bottom of the import graph (`reid_jax` and `eval`
import `input_pipeline`, never the reverse; this module imports nothing of the
project), so that every package raises the same message.
"""

from collections.abc import Sequence
from typing import Any


def check_choice(field: str, value: Any, allowed: Sequence[Any],
                 error: type[Exception] = ValueError) -> None:
  """Raises `error` naming `field` when `value` is not one of `allowed`.

  Args:
    field: the setting, named as a user sets it (e.g. 'config.model.neck').
    value: the value given.
    allowed: the accepted values, in the order the message lists them.
    error: the exception class to raise (ValueError or a subclass, e.g.
      `reid_jax.config_lib.ConfigError`, `input_pipeline.reader_utils.DatasetError`).

  Raises:
    error: `value` is not in `allowed`, with the message
      "{field} must be one of 'a', 'b'; got {field}='c'."
  """
  if value not in allowed:
    raise error(f'{field} must be one of {", ".join(map(repr, allowed))}; '
                f'got {field}={value!r}.')
