"""The wiring: builds models, teachers, distillers and trainers from a config, and runs the command-line entry
points (`tools/`) with one-line errors. It sits above every other package; nothing in the package imports it."""
