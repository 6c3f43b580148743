"""Run train.py's command line, then write this rank's sha256 of the trained weights (its state dict)
to DIGESTS/rank<RANK>.sha256, so a test can check that every rank of a torchrun job ended with the
same model. The check lives here, not in train.py: it is the tests' question, not every user's cost.

    torchrun --nproc_per_node=2 tests/ddp_weights_digest.py DIGESTS --data ... (train.py's options)
"""

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402 (after the path to the repo)

import train  # noqa: E402


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    digests = Path(sys.argv[1])
    result = train.cli_main(sys.argv[2:])
    digests.mkdir(parents=True, exist_ok=True)
    (digests / f"rank{os.environ.get('RANK', 0)}.sha256").write_text(weights_digest(result["model"]) + "\n")
