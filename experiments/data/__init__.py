"""Dataset generators shared by the experiments (and by the organisms' recipes that train on them).

- `needles`: needle-in-a-haystack prompts (Retrieval Head, Wu et al. 2024) over a word vocabulary,
  tokenised by any tokenizer: a distractor context, a key/value needle at a chosen depth, and a final
  query after which the model should reproduce the value span.
- `ioi`: indirect-object-identification prompts (Wang et al. 2023).
- `kg`: a synthetic knowledge graph: single-hop facts, two-hop queries, context that conflicts with
  memory, identity lines (Hopping Too Late; PH3).
"""
