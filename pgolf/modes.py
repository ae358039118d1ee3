"""The evaluation modes a config asks for (sliding windows, TTT), shared by `pgolf run` and the
generated submission script; each mode is the keywords of one ``evaluate_artifact`` call."""
from __future__ import annotations


def eval_modes(cfg) -> list[dict]:
    """The evaluation modes a config asks for, beyond the trainer's plain post-quantization score."""
    modes = []
    if cfg.eval_stride and cfg.eval_stride < (cfg.eval_seq_len or cfg.train_seq_len):
        modes.append({"mode": "sliding", "stride": cfg.eval_stride})
    if cfg.eval_ttt:
        from pgolf_eval.ttt import TTTConfig, parse_targets

        window = cfg.eval_seq_len or cfg.train_seq_len
        ttt = TTTConfig(kind=cfg.eval_ttt, rank=cfg.eval_ttt_rank, lr=cfg.eval_ttt_lr or None,
                        epochs=cfg.eval_ttt_epochs, chunk=min(cfg.eval_ttt_chunk, window),
                        targets=parse_targets(cfg.eval_ttt_targets),
                        from_start=cfg.eval_ttt_from_start, scope=cfg.eval_ttt_scope or None,
                        phase_tokens=cfg.eval_ttt_phase_tokens, phase_epochs=cfg.eval_ttt_phase_epochs,
                        phase_lr=cfg.eval_ttt_phase_lr or None, phase_batch=cfg.eval_ttt_phase_batch,
                        parallel_docs=cfg.eval_ttt_parallel_docs)
        modes.append({"mode": "ttt", "ttt": ttt})
    return modes


def check_eval_modes(cfg, modes: list[dict]) -> None:
    """Run before training: a bad TTT setting (a misspelt target) fails now, not after the training
    budget is spent. The model is built on the meta device (no memory)."""
    import torch

    from pgolf_eval.ttt import select_targets
    from pgolf_train.model import GPT

    for m in modes:
        if "ttt" in m and m["ttt"].kind == "lora":
            with torch.device("meta"):
                select_targets(GPT(cfg.model_config()), m["ttt"].targets)
