"""The one error type for mistakes a user can fix.

Raise `UserError` for a wrong flag, config key, file or value, with a message that names it and
says what would work ("config.batch_size=6 does not divide over data x fsdp = 4 devices; use 4
or 8"). The command lines print it as one line, `error: <message>`, and exit 1 without a
traceback, before any compilation where possible. Any other exception is a bug and keeps its
traceback.

It subclasses ValueError so that library callers that catch ValueError keep working.
"""


class UserError(ValueError):
  """A mistake in the user's input; the message is one line that names it and the fix."""
