"""The web UI (Gradio): a thin face over the engine, like the HTTP server.

Every tab turns its form into the engine's JobSpec (forms.py: the pipe(...) arguments the CLI and the HTTP API
send too) and follows the job's events (runs.py); results are PNGs carrying the CLI's parameters (records.py).
Training runs `qistudio train` as a subprocess (training.py). app.py builds the tabs; `qistudio ui` (cli/ui.py)
serves them alone, and `qistudio serve` mounts them at /ui (mount.py). Gradio is imported only here and below,
never by the library or the other faces.
"""
