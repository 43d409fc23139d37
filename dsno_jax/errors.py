"""The one exception type for mistakes the user fixes from the message alone."""


class UserError(ValueError):
  """A config value or an input (file, data set, checkpoint) that cannot work, with a message
  naming it and what to do; `python -m dsno_jax.main` prints that message alone, no traceback.

  A ValueError, so that callers catching bad values keep catching it.
  """
