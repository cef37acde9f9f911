"""`python -m paligemma.finetune ARGS`, with one fault injected where a test wants it (run directly or by torchrun).

    FAULT=kill   FAULT_RANK=1 FAULT_STEP=3   that rank SIGKILLs itself as it starts step 3 (0-based), mid-run:
                                             its peers are then waiting for it in the step's first collective
    FAULT=raise  FAULT_RANK=1 FAULT_STEP=1   that rank raises a PaliGemmaError there instead

Only the first attempt is faulted: after torchrun restarts the group (`--max-restarts`), the run goes on unharmed.
"""

import os
import signal
import sys

from paligemma import PaliGemmaError
from paligemma.cli import main
from paligemma.training import finetune

fault, rank, at = os.environ["FAULT"], int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_STEP"])
first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
step_loss = finetune.step_loss


def faulty_step_loss(run, step):
    if first_attempt and step == at and run.world.rank == rank:
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise PaliGemmaError(f"injected fault at step {step}")
    return step_loss(run, step)


finetune.step_loss = faulty_step_loss
sys.exit(main(["finetune", *sys.argv[1:]]))
