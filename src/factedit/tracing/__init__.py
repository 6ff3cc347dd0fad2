"""Causal tracing: where in the network a model recalls a fact (ROME §2).

    tokens.py        subject_token_range: the prompt tokens that spell the subject
    causal_trace.py  clean / corrupted / restored runs, batched restorations -> (tokens × layers) scores
    aggregate.py     average indirect effects over CounterFact facts (Lightning predict)
    plots.py         heatmaps and AIE curves; run.py: what src/trace.py runs
"""
from factedit.tracing.causal_trace import TraceResult, trace_fact
from factedit.tracing.tokens import subject_token_range

__all__ = ["TraceResult", "subject_token_range", "trace_fact"]
