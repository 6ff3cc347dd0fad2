"""factedit in the browser: `python src/app.py` (make app) serves one page to trace, edit, undo, save, load and
compare on a model held in memory (docs/app.md)."""

from factedit.app.server import make_server, serve_in_thread
from factedit.app.state import App

__all__ = ["App", "make_server", "serve_in_thread"]
