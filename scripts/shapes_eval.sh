#!/usr/bin/env bash
# Print the ShapesEval table of the shipped shapes demo model (or of the pipeline folder given with --model).
# Extra arguments go to `python -m diffusers_lightbagel.demo.shapes_eval`; see its --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${PYTHON:-$ROOT/.venv/bin/python}" -m diffusers_lightbagel.demo.shapes_eval "$@"
