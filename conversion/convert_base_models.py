"""Build an initial LightBagel pipeline folder from Qwen2.5-VL and Wan2.2-TI2V-5B.

Same as `lightbagel convert base ...`; run with --help for the options, and see docs/conversion.md.
"""

import sys

from diffusers_lightbagel.conversion import main


if __name__ == "__main__":
    sys.exit(main(["base", *sys.argv[1:]]))
