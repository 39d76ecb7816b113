"""Quality of a quant file: how far its next-token distributions drift from a reference's on a text.

Computed as llama-perplexity's `--kl-divergence` computes it (tools/perplexity/perplexity.cpp of the llama.cpp
that llama-cpp-python vendors), so the figures can be checked against it:

- the text is tokenized once (BOS added when the vocabulary adds one) and cut into chunks of `ctx` tokens;
  the last partial chunk is dropped; token 0 of every chunk is replaced by BOS when the vocabulary adds one;
- in each chunk the first half is context: positions `first = ctx // 2` .. `ctx - 2` are scored, each
  predicting the next token;
- per position, KLD(reference || model) = sum over tokens of p_ref * (log p_ref - log p_model), leaving out
  tokens whose reference log-probability is -16 or less (as llama-perplexity does); "same top" counts the
  positions where both argmaxes agree; PPL uses the log-probability of the actual next token.
- statistics as llama-perplexity prints them: mean KLD with its standard error, median, 99th percentile
  (linear interpolation), same-top share with its standard error, PPL of both, ln(PPL(Q)/PPL(ref)).

The reference is reduced to what these measures need (a "reference logits" file, .npz): per scored position
the `top_k` most likely tokens and their log-probabilities, the probability left outside them (`tail`),
`tail_samples` tokens drawn from that tail in proportion to their probability, and the log-probability of the
actual next token. The top-k terms of the KLD are exact; the tail's share is an importance-sampling estimate
with a control variate of known mean (unbiased, and quiet even for a near-lossless quant). `top_k = 0` keeps
the whole vocabulary (exact). Against all 262,144 log-probabilities of Gemma 3 270M, the default (256 + 256)
gives the mean KLD within 0.15 %. A live reference pass and a saved file give the same figures, because both
go through the same summary.

The rooms: the arithmetic (tuner/quality/kld.py), the reference logits file and the text
(tuner/quality/logits.py), results, cache and the regression verdict (tuner/quality/results.py), the
worker-side pass (tuner/quality/evaluate.py), the budget, a study's figures and the measurement that
drives the passes (tuner/quality/measure.py).

Every pass runs in a worker process (`tuner.measure.runner.Runner.run_job`), so an OOM or a crash is a recorded
failure with its cause. Results are cached by model hash + reference + text + ctx + KV types.
"""
