"""Upload a finished training folder to the Hugging Face Hub (again): the command the training scripts print when
their final upload fails (:func:`diffusers_stf.hub.push.main`).

    python -m diffusers_stf.push OUTPUT_DIR --hub_model_id namespace/name [--private] [--hub_token TOKEN]
"""

import sys

from .hub.push import main

if __name__ == "__main__":
    main(sys.argv[1:])
