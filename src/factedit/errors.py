"""One exception type for every mistake a user can fix; entry scripts print it as one line."""

import functools
import sys


class FacteditError(Exception):
    """A problem with the user's input or environment. The message names the problem and the fix."""


def exit_on_user_error(main):
    """Wrap an entry point: a FacteditError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FacteditError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper
