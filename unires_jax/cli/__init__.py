"""Command-line programs: unires-train, unires-eval, unires-demo."""
