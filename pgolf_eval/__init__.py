"""pgolf_eval: artifact → model → exact val bpb (plain, sliding, document-isolated, long-context, legal TTT)."""
from .evaluate import EvalResult, evaluate_artifact, evaluate_tokens
from .loader import EvalWarning, model_from_artifact
from .sliding import WindowPlan, document_segments, plan_windows
from .ttt import TTTConfig

__all__ = ["EvalResult", "EvalWarning", "TTTConfig", "WindowPlan", "document_segments", "evaluate_artifact",
           "evaluate_tokens", "model_from_artifact", "plan_windows"]
