"""The built-in demo (`make demo`): a tiny model built offline learns the bundled task through train.py, is merged,
and answers held-out prompts; see finetune/demo.py."""

import sys

from finetune.demo import main

if __name__ == "__main__":
    sys.exit(main())
