"""SeqIO tasks and mixtures of dsi_jax, registered at import (`import dsi_jax.tasks`).

Installed as `dsi_jax.tasks` (a collision-free name), so a gin file can say
`import dsi_jax.tasks` and name the tasks. See `core` for the task layout and the public
`register_dsi_tasks` helper, and `datasets` for the corpora registered here.
"""

from dsi_jax.tasks.core import (
  CorpusData,
  DocidVocabulary,
  DSIFeatureConverter,
  corpus_data,
  output_features,
  register_dsi_tasks,
  registered_corpora,
  retrieval_data,
)
from dsi_jax.tasks.pseudo_queries import PseudoQueries, add_pseudo_queries

__all__ = [
  "CorpusData",
  "DSIFeatureConverter",
  "DocidVocabulary",
  "PseudoQueries",
  "add_pseudo_queries",
  "corpus_data",
  "output_features",
  "register_dsi_tasks",
  "registered_corpora",
  "retrieval_data",
]

from dsi_jax.tasks import datasets  # noqa: E402  (registers the corpora; needs core first)

datasets.register_all()
