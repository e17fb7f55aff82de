"""Run train.py's main in one process of a `torchrun` job and keep that process's final weights.

Used by tests/test_train.py: every rank writes rank<R>.pt, so the test can check they are identical.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402

weights_dir = Path(sys.argv[1])
model, _ = train.main(sys.argv[2:])
torch.save(model.state_dict(), weights_dir / f"rank{os.environ['RANK']}.pt")
