"""The forward passes that training, evaluation and the server share (import from the submodules).

- `forward`: calling the model up to its final hidden states, the output layer, the KV-cache helpers and the
  shared-prefix batching of few-shot requests.
- `loss`: the training objective (`response_loss`, the output layer in checkpointed chunks), `heldout_loss` and
  the right-padding collate (`pad_batch`) both use.
- `score`: log-likelihoods of continuations (`loglikelihood_detailed`) and of prompt tokens.
- `decode`: batched decoding with a left-padded KV cache (`prefill`, `decode_step`, rows joining and leaving),
  token choice (`choose_tokens`), and evaluation's greedy generation on the same steps.
- `text`: the incremental detokenizer (`TextStream`) and the stop-sequence cutter (`cut_pieces`).
"""

# Defined here rather than in `loss`: the data package labels prompt tokens with it without importing torch.
IGNORE_INDEX = -100  # label of positions that carry no loss
