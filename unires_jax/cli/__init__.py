"""Command-line programs: unires-train, -eval, -demo, -convert, -segment, -propose, -serve,
-summary (one shared set of flags, and how a program ends on an error, in `common`)."""
