"""`pgolf train` and `pgolf quantize`: the trainer's and quantizer's commands, handed the evaluator
(pgolf_eval sits above pgolf_train, so the commands are put together here).
``torchrun --standalone --nproc_per_node=N -m pgolf train --config NAME ...`` trains on N processes."""
from __future__ import annotations


def register(sub) -> None:
    from pgolf_eval.scorer import Scorer
    from pgolf_train import quantize, trainer

    trainer.add_parser(sub, Scorer)
    quantize.add_parser(sub, Scorer)
