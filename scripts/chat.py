"""Chat with a model trained by train.py (an adapter, full or merged output directory); see finetune/outputs/chat.py.

    python scripts/chat.py OUT_DIR --prompt "What is the capital of France?"
"""

import sys

from finetune.outputs.chat import main

if __name__ == "__main__":
    sys.exit(main())
