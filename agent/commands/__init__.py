"""Remote commands: parameter models, the dispatcher and one handler per command."""
