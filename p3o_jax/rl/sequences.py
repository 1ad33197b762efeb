"""Teacher-forced quantities on (query, response) rows, shared by rollout and every trainer.

A row is a left-padded query [N, P] followed by a right-padded response [N, R]. Positions
come from the concatenated mask, so left padding and padding after EOS are both handled
(docs/pitfalls.md, 2, 3). The query may also come once per prompt ([N / K, P]) before its K
responses: the prompt is then computed once, not K times (`decoder.prefixed_forward`). Log-probs use logits / temperature, exactly as the sampler does (docs/pitfalls.md, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from p3o_jax.models import decoder


def _concat(query, query_mask, response, response_mask):
  tokens = jnp.concatenate([query, response], axis=1)
  mask = jnp.concatenate([query_mask, response_mask], axis=1).astype(jnp.int32)
  return tokens, mask


def response_hidden(graph, params, query, query_mask, response, response_mask):
  """The model and the hidden states at the positions that predict each response token [N, R, D].

  query [B, P] with B = N (one per row) or B = N / K (one per prompt, each prompt's K responses
  in consecutive rows: the prompt is computed once, see `decoder.suffixes_per_prefix`).
  """
  # Position t predicts token t + 1: the last query slot (always real: left padding) predicts the
  # first response token, and the last response token predicts nothing, so it is not run.
  k = decoder.suffixes_per_prefix(query, response)
  P = query.shape[1]
  response, response_mask = response[:, :-1], response_mask[:, :-1]
  if k == 1 or P == 1:
    tokens, mask = _concat(jnp.repeat(query, k, axis=0), jnp.repeat(query_mask, k, axis=0), response, response_mask)
    model, hidden = decoder.forward(graph, params, tokens, mask)
    return model, hidden[:, P - 1:]
  # The last query token goes with the responses: the prompt's other tokens then only feed the
  # keys and values the responses attend to, nothing reads their last layer's output, and XLA
  # leaves out that layer's attention and MLP on them, forward and backward (measured: the
  # log-prob forward about 20% faster at 2-4 layers; bench/prompt_once.py at a TL;DR-like shape).
  suffix, suffix_mask = _concat(jnp.repeat(query[:, -1:], k, axis=0), jnp.repeat(query_mask[:, -1:], k, axis=0),
                                response, response_mask)
  model, _, hidden = decoder.prefixed_forward(graph, params, query[:, :-1], query_mask[:, :-1], suffix, suffix_mask)
  return model, hidden


def response_logprobs_and_hidden(graph, params, query, query_mask, response, response_mask,
                                 temperature: float = 1.0):
  """Per-token log p(response_t | query, response_<t) [N, R] (0 at padding), the model, and
  the hidden states at the positions that predict each response token [N, R, D]."""
  model, hidden = response_hidden(graph, params, query, query_mask, response, response_mask)
  logits = model.logits(hidden) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp, response[..., None], axis=-1)[..., 0]
  return logp * response_mask, model, hidden


def response_logprobs(graph, params, query, query_mask, response, response_mask, temperature=1.0):
  return response_logprobs_and_hidden(graph, params, query, query_mask, response, response_mask,
                                      temperature)[0]


def response_entropy(model, hidden, response_mask, temperature=1.0):
  """Mean per-token entropy of the policy over the response (masked)."""
  logp = jax.nn.log_softmax(model.logits(hidden) / temperature, axis=-1)
  entropy = -(jnp.exp(logp) * logp).sum(-1)
  return (entropy * response_mask).sum() / jnp.maximum(response_mask.sum(), 1)


def sequence_scores(graph, params, tokens, mask):
  """Scalar head read at the last real token of each row: [N] (reward models). The last layer
  runs on that token alone (`decoder.Decoder.__call__`, outputs_at)."""
  model, hidden = decoder.forward(graph, params, tokens, mask, outputs_at=decoder.score_positions(mask)[:, None])
  return model.scalar(hidden)[:, 0]


def response_scores(graph, params, query, query_mask, response, response_mask):
  """Scalar head at the last real token of query + response: [N] (query as in `response_hidden`).

  The query stays whole here: moving its last token to the responses (as `response_hidden`
  does) measured 2-20% slower for reward models on CPU. The last layer runs on one token of
  each pass alone: the query's last (left padding puts it last) and each response's last real
  one (`decoder.Decoder.__call__`, outputs_at), and the score is the response's, or the query's
  where the response is empty."""
  k = decoder.suffixes_per_prefix(query, response)
  if k == 1:
    return sequence_scores(graph, params, *_concat(query, query_mask, response, response_mask))
  B, P = query.shape
  query_last = jnp.full((B, 1), P - 1, jnp.int32)
  response_last = decoder.score_positions(response_mask)[:, None]
  model, query_hidden, response_hidden = decoder.prefixed_forward(
      graph, params, query, query_mask, response, response_mask, query_last, response_last)
  query_score = jnp.repeat(model.scalar(query_hidden)[:, 0], k, axis=0)
  return jnp.where(response_mask.astype(bool).any(-1), model.scalar(response_hidden)[:, 0], query_score)


def response_values(model, hidden):
  """Value head on the hidden states that precede each response token: [N, R]."""
  return model.scalar(hidden)
