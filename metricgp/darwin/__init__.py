"""DarwinLM / EvoPress level search: a database of per-module pruning levels, searched by evolution.

Two phases (EvoPress, DarwinLM):

1. **Database** (`database.py`, `unstructured.py`): every prunable module gets levels 0..max of
   removed structures, with the same parameter step per level within a module type, so a level
   switch between two modules of one type keeps the total size exact. Stored compactly: the
   importance order of each module's units, never weight copies.
2. **Search** (`search.py`): a (1+lambda) evolution over integer level vectors (`levels.py`),
   offspring by level-switch mutation (`mutation.py`), scored by KL to the dense model through
   staged selection (`stages.py`), optionally with brief fine-tuning of every survivor before it
   is scored (training-aware, DarwinLM). Candidates are evaluated by masking only the modules
   whose level changed (`fitness.py`), through the metric search's backends (serial or Ray).

A metric prior (`prior.py`) can shape the start genome, bias the mutation and screen offspring
before any forward pass. `run.py` drives a run directory (checkpoint, resume, log, plots) and
`final.py` turns the winner into a physically smaller, reloadable model.
"""
