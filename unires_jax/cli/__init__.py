"""Command-line programs: unires-train, -eval, -demo, -convert, -segment, -summary (one shared
set of flags in `common`)."""
