"""Write a LightBagel training checkpoint into a pipeline folder based on an existing LightBagel folder.

Same as `lightbagel convert checkpoint ...`; run with --help for the options, and see docs/conversion.md.
"""

import sys

from diffusers_lightbagel.conversion import main


if __name__ == "__main__":
    sys.exit(main(["checkpoint", *sys.argv[1:]]))
