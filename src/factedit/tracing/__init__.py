"""Causal tracing: where in the network a model recalls a fact (ROME §2). Subject tokens: factedit.tokens.

causal_trace.py  clean / corrupted / restored runs, batched restorations -> (tokens × layers) scores
aggregate.py     average indirect effects over CounterFact facts (Lightning predict)
plots.py         heatmaps and AIE curves; run.py: what src/trace.py runs
"""

from factedit.tokens import subject_token_range
from factedit.tracing.causal_trace import TraceResult, trace_fact

__all__ = ["TraceResult", "subject_token_range", "trace_fact"]
