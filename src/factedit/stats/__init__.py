"""Key statistics C = E[k kᵀ] of the rewrite module's input, estimated over Wikipedia text.

    compute_second_moment(model, tokenizer, layers, source=..., max_tokens=...) -> {layer: path}
    load_second_moment(model, layer) -> second_moment: (d_mlp, d_mlp) float32 on CPU
    second_moment_for(model, tokenizer, layer, cfg.stats) -> the same, computed first when stats.auto
"""
from factedit.stats.collect import StatsCollector, compute_second_moment
from factedit.stats.files import load_second_moment, second_moment_for, stats_path
from factedit.stats.second_moment import SecondMoment

__all__ = ["SecondMoment", "StatsCollector", "compute_second_moment", "load_second_moment", "second_moment_for", "stats_path"]
