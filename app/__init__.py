"""Process level: settings, CLI, Faust app, metrics, model store."""
