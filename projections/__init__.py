"""Functions of the event stream: replay into sessions (and later snapshots, read models, hooks)."""
